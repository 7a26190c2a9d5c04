"""Views of a normalised shape rendered with Blender (bpy), plus cameras and depth.

Conventions (docs/CONTRACTS.md): world_mat (4, 4) maps canonical coordinates to OpenCV camera
coordinates (x right, y down, z forward); camera_mat (3, 3) holds intrinsics in pixels with pixel
centres at integer coordinates, so pixel (row r, col c) is centred at (u, v) = (c, r).
Cameras orbit the origin with the canonical +z axis up (CAPOD and Blender are z-up), each with
its own lens and as far as that lens needs for the whole canonical box [-0.5, 0.5]^3 to be in the
frame (backend.camera holds the pinhole maths).

The numpy camera functions are pure and testable without Blender; BlenderRenderer holds one
Blender scene per process and is reused for every shape that process renders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backend.camera import BLENDER_FROM_OPENCV, fitting_distance, intrinsics, look_at, pixel_rays
from training import looks

FOCAL_MM = 50.0
SENSOR_MM = 36.0
# Focal lengths of the renders, as a fraction of the image width: from a wide phone camera to a
# short telephoto, so image models do not learn one perspective.
FOCAL_FRACTION_RANGE = (0.9, 2.2)
# From slightly below to steeply above: photos of objects are mostly taken from above.
ELEVATION_RANGE_DEG = (-15.0, 70.0)
UP = np.array([0.0, 0.0, 1.0])


def random_cameras(rng: np.random.Generator, views: int, image_size: int,
                   focal_range: tuple[float, float] = FOCAL_FRACTION_RANGE) -> tuple[np.ndarray, np.ndarray]:
    """(views, 4, 4) world->camera matrices at random azimuth / elevation around the origin and
    (views, 3, 3) intrinsics with a random focal length each, log-uniform in focal_range (fractions
    of the width); each camera is as far as its lens needs for the whole canonical box to fit."""
    azimuth = rng.uniform(0.0, 2 * np.pi, views)
    elevation = np.radians(rng.uniform(*ELEVATION_RANGE_DEG, views))
    focal = np.exp(rng.uniform(np.log(focal_range[0]), np.log(focal_range[1]), views))
    distance = np.array([fitting_distance(f) for f in focal])
    eyes = distance[:, None] * np.stack(
        [np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation)], axis=1
    )
    world_mats = np.stack([look_at(eye) for eye in eyes])
    camera_mats = np.stack([intrinsics(image_size, f) for f in focal])
    return world_mats, camera_mats


def framing_view(vertices: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """(4, 4) world->camera (OpenCV) of a FOCAL_MM camera looking along direction (3,) at the
    bounding box of vertices (V, 3), far enough for the whole box to be in the frame."""
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    centre, radius = (low + high) / 2, float(np.linalg.norm(high - low)) / 2
    distance = fitting_distance(FOCAL_MM / SENSOR_MM, radius=max(radius, 1e-3))
    return look_at(centre - distance * direction / np.linalg.norm(direction), centre)


class BlenderRenderer:
    """One Blender scene (Workbench engine, transparent film) that renders shape after shape.

    Workbench: fast on CPU-only machines (software OpenGL) and still shaded like a real render;
    each view gets a random look (training.looks) and its own lens.
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
        self.matcaps = [light.name for light in bpy.context.preferences.studio_lights if light.type == "MATCAP"]

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

    def picture(self, vertices: np.ndarray, faces: np.ndarray, world_mat: np.ndarray, path: Path,
                colours: np.ndarray | None = None):
        """A PIL image (RGBA, written to path) of the mesh vertices (V, 3), faces (F, 3) through a
        FOCAL_MM camera at world_mat (4, 4), studio-lit: grey, or in its vertex colours (V, 3|4) sRGB."""
        from mathutils import Matrix
        from PIL import Image

        self.set_mesh(np.asarray(vertices, np.float32), np.asarray(faces, np.int32))
        shading = self.scene.display.shading
        shading.light, shading.color_type = "STUDIO", "SINGLE"
        shading.single_color = (0.75, 0.75, 0.78)
        if colours is not None:
            colours = np.asarray(colours, np.float32)
            rgba = np.concatenate([colours[:, :3], np.ones((len(colours), 1), np.float32)], axis=1)
            attribute = self.mesh_object.data.color_attributes.new("colour", "FLOAT_COLOR", "POINT")
            attribute.data.foreach_set("color_srgb", np.ascontiguousarray(rgba).ravel())
            self.mesh_object.data.color_attributes.active_color = attribute
            shading.color_type = "VERTEX"
        shading.show_cavity, shading.show_shadows, shading.show_specular_highlight = True, False, True
        self.camera.data.lens = FOCAL_MM
        self.camera.matrix_world = Matrix(np.linalg.inv(BLENDER_FROM_OPENCV @ world_mat).tolist())
        self.scene.render.filepath = str(path)
        self.bpy.ops.render.render(write_still=True)
        return Image.open(path)

    def apply_look(self, look: looks.Look) -> None:
        """Show the current mesh in a look (training.looks.draw_look)."""
        shading = self.scene.display.shading
        shading.light = look.lighting
        if look.lighting != "FLAT":
            lights = self.matcaps if look.lighting == "MATCAP" else self.studio_lights
            shading.studio_light = lights[look.light]
        if look.lighting == "STUDIO":
            shading.studiolight_rotate_z = look.light_rotation
        shading.single_color = look.colour
        if look.pattern is not None:
            self._paint(look.pattern)
            shading.color_type = "VERTEX"
        else:
            shading.color_type = "SINGLE"
        shading.show_specular_highlight = look.specular
        shading.show_cavity = look.cavity
        shading.show_shadows = look.shadows
        shading.shadow_intensity = look.shadow_intensity

    def polygons(self) -> np.ndarray:
        """(P, 3) vertex indices of the shown mesh's triangles, in Blender's numbering (set_mesh's
        validation may have dropped degenerate faces): the faces a Pattern's "faces" kind counts."""
        mesh = self.mesh_object.data
        corners = np.empty(len(mesh.loops), dtype=np.int32)
        mesh.loops.foreach_get("vertex_index", corners)
        return corners.reshape(-1, 3)

    def _paint(self, pattern: looks.Pattern) -> None:
        """Face-corner colours of the pattern (printed labels, wood, painted parts)."""
        mesh = self.mesh_object.data
        polygons = self.polygons()
        positions = np.empty(3 * len(mesh.vertices), dtype=np.float32)
        mesh.vertices.foreach_get("co", positions)
        points = positions.reshape(-1, 3)[polygons.ravel()]
        corner_face = np.repeat(np.arange(len(polygons)), 3)
        colours = looks.painted(pattern, looks.pattern_weights(pattern, points, corner_face, len(polygons)))
        rgba = np.concatenate([colours, np.ones((len(colours), 1))], axis=1).astype(np.float32)
        attribute = mesh.color_attributes.get("pattern") or mesh.color_attributes.new("pattern", "FLOAT_COLOR", "CORNER")
        attribute.data.foreach_set("color", rgba.ravel())
        mesh.color_attributes.active_color = attribute

    def render_views(
        self,
        vertices: np.ndarray,
        faces: np.ndarray,
        world_mats: np.ndarray,
        camera_mats: np.ndarray,
        rng: np.random.Generator,
        image_dir: Path,
    ) -> tuple[np.ndarray, list[looks.Look]]:
        """Render one RGBA PNG per camera into image_dir (000.png, ...), each in a random look;
        return depth (V, S, S) and the looks.

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
        drawn = []
        for view, world_mat in enumerate(world_mats):
            drawn.append(looks.draw_look(rng, len(self.studio_lights), len(self.matcaps)))
            self.apply_look(drawn[-1])
            self.camera.data.lens = float(camera_mats[view][0, 0] / size * SENSOR_MM)
            self.camera.matrix_world = Matrix(np.linalg.inv(BLENDER_FROM_OPENCV @ world_mat).tolist())
            path = image_dir / f"{view:03d}.png"
            self.scene.render.filepath = str(path)
            self.bpy.ops.render.render(write_still=True)
            alpha = np.asarray(Image.open(path))[:, :, 3]
            depth[view] = ray_cast_depth(tree, world_mat, camera_mats[view], alpha > 0)
        return depth, drawn


class CyclesRenderer(BlenderRenderer):
    """Photo-like renders (Cycles path tracing, transparent film): a glossy principled material
    of a random colour, a sun casting shadows and a sky-coloured fill, smooth shading. Slower than
    Workbench; used for benchmarks and galleries, where pictures must look like photos."""

    def __init__(self, image_size: int, samples: int = 32):
        super().__init__(image_size)
        bpy = self.bpy
        scene = self.scene
        scene.render.engine = "CYCLES"
        scene.cycles.device = "CPU"
        scene.cycles.samples = samples
        scene.cycles.use_denoising = True
        scene.view_settings.view_transform = "Standard"
        world = bpy.data.worlds.new("occnet_world")
        world.use_nodes = True
        world.node_tree.nodes["Background"].inputs["Color"].default_value = (0.55, 0.6, 0.7, 1.0)
        world.node_tree.nodes["Background"].inputs["Strength"].default_value = 0.6
        scene.world = world
        sun = bpy.data.objects.new("occnet_sun", bpy.data.lights.new("occnet_sun", "SUN"))
        sun.data.energy = 3.5
        sun.data.angle = 0.2
        scene.collection.objects.link(sun)
        self.sun = sun
        self.material = bpy.data.materials.new("occnet_material")
        self.material.use_nodes = True

    def render_photo(self, vertices: np.ndarray, faces: np.ndarray, world_mat: np.ndarray, camera_mat: np.ndarray,
                     rng: np.random.Generator, path: Path) -> None:
        """One RGBA PNG of the mesh (V, 3), (F, 3) through camera (4, 4), (3, 3) at path."""
        import colorsys

        from mathutils import Euler, Matrix

        self.set_mesh(vertices, faces)
        mesh = self.mesh_object.data
        mesh.polygons.foreach_set("use_smooth", np.ones(len(mesh.polygons), dtype=bool))
        mesh.materials.append(self.material)
        shader = self.material.node_tree.nodes["Principled BSDF"]
        hue, saturation, value = rng.random(), rng.uniform(0.2, 0.8), rng.uniform(0.4, 0.9)
        shader.inputs["Base Color"].default_value = (*colorsys.hsv_to_rgb(hue, saturation, value), 1.0)
        shader.inputs["Roughness"].default_value = float(rng.uniform(0.2, 0.7))
        shader.inputs["Metallic"].default_value = float(rng.random() < 0.2)
        self.sun.rotation_euler = Euler((float(rng.uniform(0.3, 0.9)), 0.0, float(rng.uniform(0, 2 * np.pi))))
        self.camera.data.lens = float(camera_mat[0, 0] / self.image_size * SENSOR_MM)
        self.camera.matrix_world = Matrix(np.linalg.inv(BLENDER_FROM_OPENCV @ world_mat).tolist())
        self.scene.render.filepath = str(path)
        self.bpy.ops.render.render(write_still=True)


def ray_cast_depth(tree, world_mat: np.ndarray, camera_mat: np.ndarray, mask: np.ndarray,
                   last: bool = False) -> np.ndarray:
    """(S, S) camera z of the first hit through each masked pixel's centre (last: of the last hit,
    where the ray finally leaves the shape, found by casting back from beyond it); inf where none."""
    from mathutils import Vector

    depth = np.full(mask.shape, np.inf, dtype=np.float32)
    pixels = np.argwhere(mask)
    if len(pixels) == 0:
        return depth
    origin, directions = pixel_rays(world_mat, camera_mat, pixels.astype(np.float64))
    if last:
        # The canonical box lies within sqrt(3)/2 of the origin: start a unit past it.
        beyond = np.linalg.norm(origin) + 2.0
        starts, directions = origin + beyond * directions, -directions
    else:
        starts = np.broadcast_to(origin, directions.shape)
    hits = np.full((len(pixels), 3), np.nan)
    for i, (start, direction) in enumerate(zip(starts.tolist(), directions.tolist())):
        location = tree.ray_cast(Vector(start), Vector(direction))[0]
        if location is not None:
            hits[i] = location
    hit = ~np.isnan(hits[:, 0])
    z = hits[hit] @ world_mat[2, :3] + world_mat[2, 3]
    depth[pixels[hit, 0], pixels[hit, 1]] = z
    return depth


def back_depth(vertices: np.ndarray, faces: np.ndarray, world_mats: np.ndarray, camera_mats: np.ndarray,
               front: np.ndarray) -> np.ndarray:
    """(V, S, S) camera z where each pixel's ray last leaves the mesh (V, 3), (F, 3), for the
    pixels where the front depth (V, S, S) found a surface; inf elsewhere."""
    from mathutils.bvhtree import BVHTree

    tree = BVHTree.FromPolygons(vertices.tolist(), faces.tolist(), all_triangles=True)
    return np.stack([ray_cast_depth(tree, world_mat, camera_mat, np.isfinite(depth), last=True)
                     for world_mat, camera_mat, depth in zip(world_mats, camera_mats, front)])


_RENDERER: BlenderRenderer | None = None


def renderer_for(image_size: int) -> BlenderRenderer:
    """The process's Blender scene, created on first use and kept (one scene per worker)."""
    global _RENDERER
    if _RENDERER is None or _RENDERER.image_size != image_size:
        _RENDERER = BlenderRenderer(image_size)
    return _RENDERER
