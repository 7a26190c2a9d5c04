"""Operators: Mesh from Point Cloud, Mesh from Image, Mesh from Fitted Field, Reconstruct Files (drag and drop onto the
viewport), Import Point Cloud, Cancel, Stop Backend. They gather the input (gather.py), run a job
in the add-on's session (runtime.py, session.py) and turn domain errors into reports.

How a request flows without blocking Blender:
* ``invoke`` (buttons, operator search) sends the request and returns RUNNING_MODAL; the client's
  reader thread receives frames; a window-manager timer calls ``modal``, which pumps the session
  on the main thread and, at the end, builds the object. The operator then finishes, so the new
  object is one undo step.
* ``execute`` (scripts, ``EXEC_DEFAULT``, redo, background mode where timers never fire) runs the
  same request and pumps synchronously until it is done.
"""

import os
from dataclasses import dataclass

import bpy
import numpy as np
from bpy.props import CollectionProperty, EnumProperty, FloatProperty, IntProperty, StringProperty

from . import filetypes, gather, mesh_builder, request_options
from .client import BackendError
from .interpreter import InterpreterProblem
from .preferences import get_prefs, snap_face_budget
from .runtime import read_image, read_points, request_options_for, session, start_job
from .session import POLL_INTERVAL_S

# what the user can fix; each becomes an error report instead of a traceback
DOMAIN_ERRORS = (gather.InputProblem, request_options.OptionError, InterpreterProblem)


def _redraw(context):
    for window in getattr(context.window_manager, "windows", []):
        for area in window.screen.areas:
            if area.type in {"VIEW_3D", "PROPERTIES"}:
                area.tag_redraw()


def _wait_with_progress(context):
    """Pump until the job is done, with the window manager's progress cursor when there is a UI."""
    wm = context.window_manager
    show = bool(getattr(wm, "windows", None)) and not bpy.app.background
    if not show:
        session.wait()
        return
    wm.progress_begin(0, 100)
    try:
        session.wait(on_progress=lambda request: wm.progress_update(int(request.fraction * 100)))
    finally:
        wm.progress_end()


@dataclass
class Gathered:
    """What a generate operator's ``gather`` found: the input (kind "points" or "image", its array
    and colours or mask; "none", no array: a fitted field), the result's name and where it goes
    (the points' origin, or the cursor)."""
    kind: str
    data: np.ndarray | None
    name: str
    colors: np.ndarray | None = None
    origin: np.ndarray | None = None
    location: tuple | None = None
    mask: np.ndarray | None = None
    focal_length: float | None = None
    keep_stray: bool = False   # points: modelled vertices, none of them stray (gather.modelled)


class _Generate:
    """Shared by the two generate operators (subclasses implement ``gather``)."""

    resolution: EnumProperty(name="Resolution", items=request_options.resolution_items(),
                             default=str(request_options.DEFAULT_RESOLUTION),
                             description="Marching-cubes grid resolution per axis "
                                         "(default from the add-on preferences)")
    threshold: FloatProperty(name="Threshold", default=request_options.DEFAULT_THRESHOLD,
                             min=request_options.THRESHOLD_MIN, max=request_options.THRESHOLD_MAX,
                             description="Occupancy probability of the surface")
    max_faces: IntProperty(name="Face Budget", default=request_options.NO_FACE_BUDGET, min=0,
                           update=snap_face_budget,
                           description="Simplify to at most this many faces (0: no limit)")
    checkpoint: StringProperty(name="Checkpoint", subtype="FILE_PATH",
                               description="Model file; empty: from the add-on preferences, "
                                           "then the shipped default")

    _timer = None

    @classmethod
    def poll(cls, context):
        return not session.busy

    def _options(self, context, kind, focal_length=None, keep_stray=False):
        prefs = get_prefs(context)
        for prop, pref in (("resolution", "default_resolution"), ("threshold", "threshold"),
                           ("max_faces", "max_faces")):
            if not self.properties.is_property_set(prop):
                setattr(self, prop, getattr(prefs, pref))
        return request_options_for(prefs, kind, int(self.resolution), self.threshold,
                                   self.max_faces, self.checkpoint, focal_length=focal_length, keep_stray=keep_stray)

    def _start(self, context):
        try:
            found = self.gather(context)
            start_job(context, found.kind, found.data,
                      self._options(context, found.kind, found.focal_length, found.keep_stray),
                      found.name, origin=found.origin, location=found.location, label=self.bl_label,
                      colors=found.colors, mask=found.mask)
        except DOMAIN_ERRORS as exc:
            session.fail(str(exc))
            self.report({"ERROR"}, str(exc))
            return False
        except BackendError as exc:
            session.fail(f"{exc.message} [{exc.code}]")
            self.report({"ERROR"}, exc.message)
            return False
        return True

    def _finish(self, context):
        outcome = session.finish_job(context)
        _redraw(context)
        if outcome.cancelled:
            self.report({"WARNING"}, session.last_info)
            return {"CANCELLED"}
        if outcome.error:
            self.report({"ERROR"}, outcome.error)
            return {"CANCELLED"}
        self.report({"WARNING"} if "\nWarning: " in session.last_info else {"INFO"}, session.last_info)
        return {"FINISHED"}

    def execute(self, context):
        if not self._start(context):
            return {"CANCELLED"}
        _wait_with_progress(context)
        return self._finish(context)

    def invoke(self, context, event):
        if bpy.app.background or context.window is None:
            return self.execute(context)
        if not self._start(context):
            return {"CANCELLED"}
        wm = context.window_manager
        self._timer = wm.event_timer_add(POLL_INTERVAL_S * 2, window=context.window)
        wm.modal_handler_add(self)
        _redraw(context)
        return {"RUNNING_MODAL"}

    def _remove_timer(self, context):
        if self._timer is not None:
            context.window_manager.event_timer_remove(self._timer)
            self._timer = None

    def modal(self, context, event):
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        job = session.job
        if job is None:  # the add-on was disabled or the backend stopped under us
            self._remove_timer(context)
            return {"CANCELLED"}
        session.pump()
        _redraw(context)
        if job.request.done:
            self._remove_timer(context)
            return self._finish(context)
        return {"PASS_THROUGH"}

    def cancel(self, context):
        """Blender aborts the modal operator (file load, quit): cancel the backend work."""
        self._remove_timer(context)
        session.abandon()


class OCCNET_OT_mesh_from_points(_Generate, bpy.types.Operator):
    """Reconstruct a watertight mesh from the selected objects' vertices or a point-cloud file"""
    bl_idname = "occnet.mesh_from_points"
    bl_label = "Mesh from Point Cloud"
    bl_options = {"REGISTER", "UNDO"}

    source: EnumProperty(name="Source", items=[
        ("SELECTED", "Selected Objects", "Vertices of the selected mesh, point-cloud and curve "
                                         "objects, in world space with modifiers applied"),
        ("FILE", "File", f"A point-cloud file ({', '.join(filetypes.POINT_EXTENSIONS)})"),
    ], default="SELECTED")
    filepath: StringProperty(name="File", subtype="FILE_PATH")

    def gather(self, context):
        if self.source == "FILE":
            if not self.filepath:
                raise gather.InputProblem("Choose a point-cloud file")
            pts, colors = gather.load_points_file(self.filepath, lambda path: read_points(context, path))
            name, keep_stray = gather.file_result_name(self.filepath), False
        else:
            pts, colors, names = gather.selected_points(context)
            pts = gather.check_point_count(pts)
            name = (names[0] if len(names) == 1 else "PointCloud") + "_occnet"
            keep_stray = gather.modelled(context)
        return Gathered("points", pts, name, colors=colors, origin=gather.bbox_center(pts), keep_stray=keep_stray)


class OCCNET_OT_mesh_from_image(_Generate, bpy.types.Operator):
    """Reconstruct a mesh from a single image (an image datablock or an image file); the result
    is placed at the 3D cursor"""
    bl_idname = "occnet.mesh_from_image"
    bl_label = "Mesh from Image"
    bl_options = {"REGISTER", "UNDO"}

    source: EnumProperty(name="Source", items=[
        ("IMAGE", "Image", "An image datablock of this file"),
        ("FILE", "File", "An image file"),
    ], default="IMAGE")
    image: StringProperty(name="Image", description="Name of the image datablock "
                                                    "(empty: the image open in an Image Editor)")
    filepath: StringProperty(name="File", subtype="FILE_PATH")
    mask: StringProperty(name="Mask", description="Name of an image datablock holding the object's mask "
                                                  "(white or opaque = object); empty: the picture's alpha, "
                                                  "else an automatic estimate")
    focal_length: FloatProperty(name="Focal Length", default=request_options.UNKNOWN_FOCAL_LENGTH, min=0.0,
                                max=request_options.FOCAL_LENGTH_MAX, unit="CAMERA",
                                description="35 mm equivalent focal length of the lens that took the picture "
                                            "(0: from the file's EXIF, else 50 mm)")

    def _image(self, context):
        if self.image:
            return self._datablock(self.image)
        scene_img = getattr(context.scene, "occnet_image", None)
        if scene_img is not None:
            return scene_img
        for area in getattr(context.screen, "areas", []):
            if area.type == "IMAGE_EDITOR" and area.spaces.active.image is not None:
                return area.spaces.active.image
        raise gather.InputProblem("Choose an image (or an image file)")

    @staticmethod
    def _datablock(name):
        img = bpy.data.images.get(name)
        if img is None:
            raise gather.InputProblem(f"There is no image named {name!r}")
        return img

    def gather(self, context):
        focal_length = None
        if self.source == "FILE":
            if not self.filepath:
                raise gather.InputProblem("Choose an image file")
            pixels, focal_length = gather.load_image_file(self.filepath, lambda path: read_image(context, path))
            name = gather.file_result_name(self.filepath)
        else:
            img = self._image(context)
            pixels = gather.image_pixels(img)
            name = os.path.splitext(img.name)[0] + "_occnet"
        mask = gather.image_pixels(self._datablock(self.mask)) if self.mask else None
        return Gathered("image", pixels, name, location=tuple(context.scene.cursor.location), mask=mask,
                   focal_length=self.focal_length or focal_length)


class OCCNET_OT_mesh_from_field(_Generate, bpy.types.Operator):
    """Mesh of a field fitted to one object's posed views (python -m training.dvr), with the colours
    of its texture head; placed at the 3D cursor"""
    bl_idname = "occnet.mesh_from_field"
    bl_label = "Mesh from Fitted Field"
    bl_options = {"REGISTER", "UNDO"}

    filepath: StringProperty(name="File", subtype="FILE_PATH",
                             description="The fitted field: model_last.safetensors of python -m training.dvr")
    filter_glob: StringProperty(default="*.safetensors", options={"HIDDEN"})

    def gather(self, context):
        if not self.filepath:
            raise gather.InputProblem("Choose a fitted field (model_last.safetensors of python -m training.dvr)")
        self.checkpoint = self.filepath  # the field is its checkpoint
        folder = os.path.basename(os.path.dirname(os.path.abspath(self.filepath)))
        return Gathered("none", None, f"{folder or 'field'}_occnet", location=tuple(context.scene.cursor.location))

    def invoke(self, context, event):
        if self.filepath or bpy.app.background or context.window is None:
            return super().invoke(context, event)
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}


def chosen_paths(operator):
    """The files an import-style operator was given: directory + files (a drop of several, the
    file browser), else filepath."""
    names = [f.name for f in operator.files if f.name]
    if operator.directory and names:
        return [os.path.join(operator.directory, name) for name in names]
    return [operator.filepath] if operator.filepath else []


class OCCNET_OT_reconstruct_files(bpy.types.Operator):
    """Reconstruct a mesh from each point-cloud or image file (what a drop onto the 3D Viewport runs)"""
    bl_idname = "occnet.reconstruct_files"
    bl_label = "Reconstruct with OccNet"
    bl_options = {"REGISTER", "UNDO"}

    filepath: StringProperty(name="File", subtype="FILE_PATH", options={"SKIP_SAVE"})
    directory: StringProperty(subtype="DIR_PATH", options={"SKIP_SAVE", "HIDDEN"})
    files: CollectionProperty(type=bpy.types.OperatorFileListElement, options={"SKIP_SAVE", "HIDDEN"})

    @classmethod
    def poll(cls, context):
        return not session.busy

    def run(self, paths, mode):
        """Hand each file to the generate operator of its kind; one file in a UI runs without
        blocking (mode INVOKE_DEFAULT), several run one after the other."""
        kinds = [filetypes.input_kind(p) for p in paths]
        unsupported = [p for p, kind in zip(paths, kinds) if kind is None]
        if unsupported or not paths:
            self.report({"ERROR"}, f"Not a point cloud or image: {', '.join(unsupported) or 'no file given'}")
            return {"CANCELLED"}
        if len(paths) > 1:
            mode = "EXEC_DEFAULT"
        outcome = set()
        for path, kind in zip(paths, kinds):
            generate = bpy.ops.occnet.mesh_from_points if kind == "points" else bpy.ops.occnet.mesh_from_image
            outcome |= generate(mode, source="FILE", filepath=path)
        return {"FINISHED"} if outcome & {"FINISHED", "RUNNING_MODAL"} else {"CANCELLED"}

    def execute(self, context):
        return self.run(chosen_paths(self), "EXEC_DEFAULT")

    def invoke(self, context, event):
        if not chosen_paths(self):
            context.window_manager.fileselect_add(self)
            return {"RUNNING_MODAL"}
        background = bpy.app.background or context.window is None
        return self.run(chosen_paths(self), "EXEC_DEFAULT" if background else "INVOKE_DEFAULT")


class OCCNET_OT_import_point_cloud(bpy.types.Operator):
    """Import point-cloud files (LAS, LAZ, E57, PCD, PLY, XYZ, ...) as objects of vertices with their
    colours, read by the OccNet backend"""
    bl_idname = "occnet.import_point_cloud"
    bl_label = "Import Point Cloud (OccNet)"
    bl_options = {"REGISTER", "UNDO"}

    filepath: StringProperty(name="File", subtype="FILE_PATH", options={"SKIP_SAVE"})
    directory: StringProperty(subtype="DIR_PATH", options={"SKIP_SAVE", "HIDDEN"})
    files: CollectionProperty(type=bpy.types.OperatorFileListElement, options={"SKIP_SAVE", "HIDDEN"})
    filter_glob: StringProperty(default=";".join(f"*{e}" for e in filetypes.POINT_EXTENSIONS), options={"HIDDEN"})

    @classmethod
    def poll(cls, context):
        return not session.busy

    def execute(self, context):
        paths = chosen_paths(self)
        if not paths:
            self.report({"ERROR"}, "Choose a point-cloud file")
            return {"CANCELLED"}
        try:
            for path in paths:
                points, colors = gather.load_points_file(path, lambda p: read_points(context, p))
                origin = np.asarray(gather.bbox_center(points), np.float32).astype(np.float64)
                name = os.path.splitext(os.path.basename(path))[0]
                mesh = mesh_builder.build_point_mesh(name, points - origin, colors)
                mesh_builder.add_object(context, name, mesh, tuple(origin))
                self.report({"INFO"}, f"{name}: {len(points)} points" + (" with colours" if colors is not None else ""))
        except DOMAIN_ERRORS + (BackendError, mesh_builder.MeshDataError) as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        return {"FINISHED"}

    def invoke(self, context, event):
        if chosen_paths(self):
            return self.execute(context)
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}


class OCCNET_FH_reconstruct(bpy.types.FileHandler):
    """Dropping point clouds or images onto the 3D Viewport reconstructs them."""
    bl_idname = "OCCNET_FH_reconstruct"
    bl_label = "Reconstruct with OccNet"
    bl_import_operator = OCCNET_OT_reconstruct_files.bl_idname
    bl_file_extensions = ";".join(filetypes.POINT_EXTENSIONS + filetypes.IMAGE_EXTENSIONS)

    @classmethod
    def poll_drop(cls, context):
        return context.area is not None and context.area.type == "VIEW_3D"


class OCCNET_FH_import_point_cloud(bpy.types.FileHandler):
    """Dropping a point-cloud file offers to import it as points (with colours)."""
    bl_idname = "OCCNET_FH_import_point_cloud"
    bl_label = "Import Point Cloud (OccNet)"
    bl_import_operator = OCCNET_OT_import_point_cloud.bl_idname
    bl_file_extensions = ";".join(filetypes.POINT_EXTENSIONS)

    @classmethod
    def poll_drop(cls, context):
        return context.area is not None and context.area.type == "VIEW_3D"


class OCCNET_OT_cancel(bpy.types.Operator):
    """Stop the running reconstruction"""
    bl_idname = "occnet.cancel"
    bl_label = "Cancel Reconstruction"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context):
        return session.busy

    def execute(self, context):
        session.cancel()
        _redraw(context)
        return {"FINISHED"}


class OCCNET_OT_stop_backend(bpy.types.Operator):
    """Stop the backend process (it starts again on the next request)"""
    bl_idname = "occnet.stop_backend"
    bl_label = "Stop Backend"
    bl_options = {"INTERNAL"}

    def execute(self, context):
        session.shutdown()
        session.last_info = "Backend stopped"
        _redraw(context)
        return {"FINISHED"}


classes = (OCCNET_OT_mesh_from_points, OCCNET_OT_mesh_from_image, OCCNET_OT_mesh_from_field,
           OCCNET_OT_reconstruct_files, OCCNET_OT_import_point_cloud, OCCNET_FH_reconstruct,
           OCCNET_FH_import_point_cloud, OCCNET_OT_cancel, OCCNET_OT_stop_backend)


def _menu_func(self, context):
    self.layout.separator()
    self.layout.operator(OCCNET_OT_mesh_from_points.bl_idname, icon="OUTLINER_OB_POINTCLOUD")
    self.layout.operator(OCCNET_OT_mesh_from_image.bl_idname, icon="IMAGE_DATA")


def _import_menu_func(self, context):
    self.layout.operator(OCCNET_OT_import_point_cloud.bl_idname, text="Point Cloud (OccNet: LAS, E57, PCD, PLY, ...)")
    self.layout.operator(OCCNET_OT_mesh_from_field.bl_idname, text="Fitted Field (OccNet DVR, .safetensors)")


def register():
    for cls in classes:
        bpy.utils.register_class(cls)
    bpy.types.VIEW3D_MT_mesh_add.append(_menu_func)
    bpy.types.TOPBAR_MT_file_import.append(_import_menu_func)


def unregister():
    bpy.types.TOPBAR_MT_file_import.remove(_import_menu_func)
    bpy.types.VIEW3D_MT_mesh_add.remove(_menu_func)
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
