"""Export Cameras for DVR: the scene's cameras as ``cameras.json`` (and, optionally, each camera's
view rendered with a transparent film as PNG beside it), a folder that ``python -m training.dvr``
fits directly (its ``{"data": {"folder": ...}}``, read by ``training.posed_images``).

One camera convention, that of ``backend.camera`` (docs/CONTRACTS.md, "Cameras"): ``world_mat``
(4, 4) maps world points to OpenCV camera coordinates (x right, y down, z forward), ``camera_mat``
(3, 3) holds intrinsics in pixels, pixel (row r, col c) centred at (u, v) = (c, r). Blender's
camera looks down its -z with +y up, so world_mat = BLENDER_FROM_OPENCV @ inverse(matrix_world)
(the same diagonal flips the axes both ways). The add-on never imports the backend: the few lines
of that convention are here, and the tests hold them to ``training.posed_images``.
"""

import json
import os

import bpy
import numpy as np
from bpy.props import BoolProperty, StringProperty

BLENDER_FROM_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])
CAMERAS_FILE = "cameras.json"


class CameraProblem(ValueError):
    """A camera or scene this export cannot describe; the message says what to change."""


def opencv_world_mat(matrix_world: np.ndarray) -> np.ndarray:
    """A Blender camera's matrix_world (4, 4) -> world_mat (4, 4), world to OpenCV camera
    coordinates. Scale in matrix_world is dropped (a camera's scale does not change its view)."""
    rotation = matrix_world[:3, :3] / np.linalg.norm(matrix_world[:3, :3], axis=0)
    camera_to_world = np.eye(4)
    camera_to_world[:3, :3], camera_to_world[:3, 3] = rotation, matrix_world[:3, 3]
    return BLENDER_FROM_OPENCV @ np.linalg.inv(camera_to_world)


def intrinsics(lens_mm: float, sensor_mm: float, sensor_fit: str, width: int, height: int,
               shift_x: float = 0.0, shift_y: float = 0.0) -> np.ndarray:
    """camera_mat (3, 3) in pixels of a perspective camera rendering width x height square pixels.

    sensor_fit as Blender's ("AUTO": sensor_mm spans the larger side; "HORIZONTAL": the width;
    "VERTICAL": the height); sensor_mm is the sensor size along that side. Shifts are fractions of
    that side, positive moving the frame right / up (so the principal point left / down)."""
    horizontal = sensor_fit == "HORIZONTAL" or (sensor_fit == "AUTO" and width >= height)
    side = width if horizontal else height
    focal = lens_mm / sensor_mm * side
    return np.array([[focal, 0.0, (width - 1) / 2 - shift_x * side],
                     [0.0, focal, (height - 1) / 2 + shift_y * side],
                     [0.0, 0.0, 1.0]])


def render_size(scene) -> tuple[int, int]:
    """(width, height) in pixels of the scene's renders; refuses non-square pixels."""
    render = scene.render
    if render.pixel_aspect_x != render.pixel_aspect_y:
        raise CameraProblem("Set the render's pixel aspect to 1:1 (the cameras' convention has square pixels)")
    scale = render.resolution_percentage / 100
    return round(render.resolution_x * scale), round(render.resolution_y * scale)


def camera_entry(camera, width: int, height: int, image: str) -> dict:
    """One view of cameras.json for a camera object."""
    data = camera.data
    if data.type != "PERSP":
        raise CameraProblem(f"Camera {camera.name!r} is {data.type.lower()}: only perspective cameras are exported")
    sensor = data.sensor_height if data.sensor_fit == "VERTICAL" else data.sensor_width
    camera_mat = intrinsics(data.lens, sensor, data.sensor_fit, width, height, data.shift_x, data.shift_y)
    world_mat = opencv_world_mat(np.array(camera.matrix_world, dtype=np.float64))
    return {"image": image, "camera": camera.name, "world_mat": world_mat.tolist(), "camera_mat": camera_mat.tolist()}


def chosen_cameras(context, selected_only: bool) -> list:
    """The scene's camera objects (the selected ones when selected_only), by name."""
    objects = context.selected_objects if selected_only else context.scene.objects
    cameras = sorted((o for o in objects if o.type == "CAMERA"), key=lambda o: o.name)
    if not cameras:
        raise CameraProblem("Select at least one camera" if selected_only else "The scene has no cameras")
    return cameras


def render_views(scene, cameras: list, paths: list) -> None:
    """Render each camera's view to its PNG path (RGBA, transparent film: alpha is the mask);
    the scene's camera and output settings are restored afterwards."""
    render, settings = scene.render, scene.render.image_settings
    saved = (scene.camera, render.filepath, render.film_transparent, settings.file_format, settings.color_mode)
    try:
        render.film_transparent = True
        settings.file_format, settings.color_mode = "PNG", "RGBA"
        for camera, path in zip(cameras, paths):
            scene.camera = camera
            render.filepath = path
            bpy.ops.render.render(write_still=True)
    finally:
        scene.camera, render.filepath, render.film_transparent = saved[:3]
        settings.file_format, settings.color_mode = saved[3:]


def export_cameras(context, folder: str, selected_only: bool, render: bool) -> int:
    """Write folder/cameras.json (and the renders); returns the number of views."""
    cameras = chosen_cameras(context, selected_only)
    width, height = render_size(context.scene)
    names = [f"{number:03d}.png" for number in range(len(cameras))]
    views = [camera_entry(camera, width, height, name) for camera, name in zip(cameras, names)]
    os.makedirs(folder, exist_ok=True)
    if render:
        render_views(context.scene, cameras, [os.path.join(folder, name) for name in names])
    with open(os.path.join(folder, CAMERAS_FILE), "w") as f:
        json.dump({"views": views}, f, indent=1)
    return len(views)


class OCCNET_OT_export_cameras(bpy.types.Operator):
    """Write the scene's cameras as cameras.json for DVR fitting (python -m training.dvr), with each
    camera's view rendered on a transparent film beside it"""
    bl_idname = "occnet.export_cameras"
    bl_label = "Export Cameras for DVR"
    bl_options = {"REGISTER"}

    directory: StringProperty(name="Folder", subtype="DIR_PATH")
    selected_only: BoolProperty(name="Selected Cameras Only", default=False,
                                description="Export the selected cameras only (else every camera of the scene)")
    render: BoolProperty(name="Render Views", default=True,
                         description="Render each camera's view as a PNG with alpha (the mask) beside "
                                     "cameras.json; off: put your own pictures there under the same names")

    def execute(self, context):
        if not self.directory:
            self.report({"ERROR"}, "Choose a folder")
            return {"CANCELLED"}
        folder = bpy.path.abspath(self.directory)
        try:
            count = export_cameras(context, folder, self.selected_only, self.render)
        except (CameraProblem, OSError) as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        self.report({"INFO"}, f"{count} cameras written to {os.path.join(folder, CAMERAS_FILE)}")
        return {"FINISHED"}

    def invoke(self, context, event):
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}


def _export_menu_func(self, context):
    self.layout.operator(OCCNET_OT_export_cameras.bl_idname, text="Cameras for DVR (OccNet, cameras.json)")


def register():
    bpy.utils.register_class(OCCNET_OT_export_cameras)
    bpy.types.TOPBAR_MT_file_export.append(_export_menu_func)


def unregister():
    bpy.types.TOPBAR_MT_file_export.remove(_export_menu_func)
    bpy.utils.unregister_class(OCCNET_OT_export_cameras)
