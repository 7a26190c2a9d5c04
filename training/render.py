"""Views of a normalised shape rendered with Blender (bpy), plus cameras and depth.

Conventions (docs/CONTRACTS.md): world_mat (4, 4) maps canonical coordinates to OpenCV camera
coordinates (x right, y down, z forward); camera_mat (3, 3) holds intrinsics in pixels with pixel
centres at integer coordinates, so pixel (row r, col c) is centred at (u, v) = (c, r).
Cameras orbit the origin at a fixed distance with the canonical +z axis up (CAPOD and Blender
are z-up), far enough that the whole canonical box [-0.5, 0.5]^3 is always in the frame.

The numpy camera functions are pure and testable without Blender; BlenderRenderer holds one
Blender scene per process and is reused for every shape that process renders.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

FOCAL_MM = 50.0
SENSOR_MM = 36.0
# Distance at which the bounding sphere of the canonical box (radius sqrt(3)/2) just fits the
# field of view, plus a small margin: the object never leaves the frame and fills it as much as
# that guarantee allows.
CAMERA_DISTANCE = (math.sqrt(3) / 2) / math.sin(math.atan(SENSOR_MM / (2 * FOCAL_MM))) * 1.02
ELEVATION_RANGE_DEG = (-20.0, 55.0)
UP = np.array([0.0, 0.0, 1.0])

# Blender cameras look down -z with y up; OpenCV looks down +z with y down.
BLENDER_FROM_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])


def intrinsics(image_size: int, focal_mm: float = FOCAL_MM, sensor_mm: float = SENSOR_MM) -> np.ndarray:
    """(3, 3) pinhole intrinsics in pixels of a square S x S image, principal point at the centre."""
    focal_px = focal_mm / sensor_mm * image_size
    centre = (image_size - 1) / 2.0  # integer pixel centres (OpenCV)
    return np.array([[focal_px, 0.0, centre], [0.0, focal_px, centre], [0.0, 0.0, 1.0]])


def look_at(eye: np.ndarray, target: np.ndarray = np.zeros(3), up: np.ndarray = UP) -> np.ndarray:
    """(4, 4) world->camera matrix, OpenCV axes, of a camera at eye (3,) looking at target (3,)."""
    forward = target - eye
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, up)
    right = right / np.linalg.norm(right)
    down = np.cross(forward, right)
    world_mat = np.eye(4)
    world_mat[:3, :3] = np.stack([right, down, forward])
    world_mat[:3, 3] = -world_mat[:3, :3] @ eye
    return world_mat


def random_cameras(rng: np.random.Generator, views: int, distance: float = CAMERA_DISTANCE) -> np.ndarray:
    """(views, 4, 4) world->camera matrices at random azimuth / elevation around the origin."""
    azimuth = rng.uniform(0.0, 2 * np.pi, views)
    elevation = np.radians(rng.uniform(*ELEVATION_RANGE_DEG, views))
    eyes = distance * np.stack(
        [np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation)], axis=1
    )
    return np.stack([look_at(eye) for eye in eyes])


def project(world_mat: np.ndarray, camera_mat: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates uv (N, 2) (u = column, v = row) and camera depth z (N,) of points (N, 3)."""
    cam = points @ world_mat[:3, :3].T + world_mat[:3, 3]
    z = cam[:, 2]
    uv = (cam @ camera_mat.T)[:, :2] / z[:, None]
    return uv, z


def pixel_rays(world_mat: np.ndarray, camera_mat: np.ndarray, pixels_rc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ray origin (3,) and unit world directions (N, 3) through pixel centres pixels_rc (N, 2) = (row, col)."""
    rotation, translation = world_mat[:3, :3], world_mat[:3, 3]
    homogeneous = np.stack([pixels_rc[:, 1], pixels_rc[:, 0], np.ones(len(pixels_rc))], axis=1)
    directions = np.linalg.solve(camera_mat, homogeneous.T).T @ rotation  # R^T d, row-wise
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return -rotation.T @ translation, directions


class BlenderRenderer:
    """One Blender scene (Workbench engine, transparent film) that renders shape after shape.

    Workbench: fast on CPU-only machines (software OpenGL) and still shaded like a real render;
    each view gets a random studio light, light rotation, object colour and cavity/shadow flags.
    """

    def __init__(self, image_size: int):
        import bpy

        self.bpy = bpy
        self.image_size = image_size
        bpy.ops.wm.read_factory_settings(use_empty=True)
        scene = bpy.context.scene
        scene.render.engine = "BLENDER_WORKBENCH"
        scene.render.resolution_x = scene.render.resolution_y = image_size
        scene.render.resolution_percentage = 100
        scene.render.film_transparent = True
        scene.render.image_settings.file_format = "PNG"
        scene.render.image_settings.color_mode = "RGBA"
        scene.render.image_settings.color_depth = "8"
        scene.view_settings.view_transform = "Standard"
        scene.display.render_aa = "8"
        shading = scene.display.shading
        shading.light = "STUDIO"
        shading.color_type = "SINGLE"
        shading.show_backface_culling = False  # open meshes must look solid from both sides

        camera_data = bpy.data.cameras.new("occnet_camera")
        camera_data.lens = FOCAL_MM
        camera_data.sensor_width = SENSOR_MM
        camera_data.sensor_fit = "HORIZONTAL"
        camera_data.clip_start = 0.01
        camera_data.clip_end = 100.0
        self.camera = bpy.data.objects.new("occnet_camera", camera_data)
        scene.collection.objects.link(self.camera)
        scene.camera = self.camera

        self.mesh_object = bpy.data.objects.new("occnet_shape", bpy.data.meshes.new("occnet_empty"))
        scene.collection.objects.link(self.mesh_object)
        self.scene = scene
        self.studio_lights = [light.name for light in bpy.context.preferences.studio_lights if light.type == "STUDIO"]

    def set_mesh(self, vertices: np.ndarray, faces: np.ndarray) -> None:
        """Replace the shape shown by vertices (V, 3), faces (F, 3); frees the previous mesh."""
        bpy = self.bpy
        mesh = bpy.data.meshes.new("occnet_shape")
        mesh.vertices.add(len(vertices))
        mesh.vertices.foreach_set("co", np.ascontiguousarray(vertices, dtype=np.float32).ravel())
        mesh.loops.add(3 * len(faces))
        mesh.loops.foreach_set("vertex_index", np.ascontiguousarray(faces, dtype=np.int32).ravel())
        mesh.polygons.add(len(faces))
        mesh.polygons.foreach_set("loop_start", np.arange(0, 3 * len(faces), 3, dtype=np.int32))
        mesh.update()
        mesh.validate(clean_customdata=False)  # drops degenerate / duplicate faces Blender dislikes
        previous = self.mesh_object.data
        self.mesh_object.data = mesh
        bpy.data.meshes.remove(previous)

    def _randomise_look(self, rng: np.random.Generator) -> None:
        import colorsys

        shading = self.scene.display.shading
        hue, saturation, value = rng.random(), rng.uniform(0.0, 0.8), rng.uniform(0.45, 0.95)
        shading.single_color = colorsys.hsv_to_rgb(hue, saturation, value)
        if self.studio_lights:
            shading.studio_light = self.studio_lights[rng.integers(len(self.studio_lights))]
        shading.studiolight_rotate_z = float(rng.uniform(-np.pi, np.pi))
        shading.show_cavity = bool(rng.random() < 0.5)
        shading.show_shadows = bool(rng.random() < 0.3)

    def render_views(
        self,
        vertices: np.ndarray,
        faces: np.ndarray,
        world_mats: np.ndarray,
        camera_mat: np.ndarray,
        rng: np.random.Generator,
        image_dir: Path,
    ) -> np.ndarray:
        """Render one RGBA PNG per camera into image_dir (000.png, ...) and return depth (V, S, S).

        Depth is camera z from ray casting the same triangles through each pixel centre where the
        render's alpha is non-zero; inf elsewhere (background, or anti-aliased rims the centre
        ray misses).
        """
        from mathutils import Matrix
        from mathutils.bvhtree import BVHTree
        from PIL import Image

        self.set_mesh(vertices, faces)
        tree = BVHTree.FromPolygons(vertices.tolist(), faces.tolist(), all_triangles=True)
        image_dir.mkdir(parents=True, exist_ok=True)
        size = self.image_size
        depth = np.full((len(world_mats), size, size), np.inf, dtype=np.float32)
        for view, world_mat in enumerate(world_mats):
            self._randomise_look(rng)
            self.camera.matrix_world = Matrix(np.linalg.inv(BLENDER_FROM_OPENCV @ world_mat).tolist())
            path = image_dir / f"{view:03d}.png"
            self.scene.render.filepath = str(path)
            self.bpy.ops.render.render(write_still=True)
            alpha = np.asarray(Image.open(path))[:, :, 3]
            depth[view] = ray_cast_depth(tree, world_mat, camera_mat, alpha > 0)
        return depth


def ray_cast_depth(tree, world_mat: np.ndarray, camera_mat: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(S, S) camera z of the first hit through each masked pixel's centre; inf where none."""
    from mathutils import Vector

    depth = np.full(mask.shape, np.inf, dtype=np.float32)
    pixels = np.argwhere(mask)
    if len(pixels) == 0:
        return depth
    origin, directions = pixel_rays(world_mat, camera_mat, pixels.astype(np.float64))
    origin_vector = Vector(origin.tolist())
    hits = np.full((len(pixels), 3), np.nan)
    for i, direction in enumerate(directions.tolist()):
        location = tree.ray_cast(origin_vector, Vector(direction))[0]
        if location is not None:
            hits[i] = location
    hit = ~np.isnan(hits[:, 0])
    z = hits[hit] @ world_mat[2, :3] + world_mat[2, 3]
    depth[pixels[hit, 0], pixels[hit, 1]] = z
    return depth


_RENDERER: BlenderRenderer | None = None


def renderer_for(image_size: int) -> BlenderRenderer:
    """The process's Blender scene, created on first use and kept (one scene per worker)."""
    global _RENDERER
    if _RENDERER is None or _RENDERER.image_size != image_size:
        _RENDERER = BlenderRenderer(image_size)
    return _RENDERER
