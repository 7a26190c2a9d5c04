"""Operators: Mesh from Point Cloud, Mesh from Image, Cancel.

How a request flows without blocking Blender:
* ``invoke`` (buttons, operator search) gathers the input on the main thread, sends it to the
  backend child process and returns RUNNING_MODAL; the client's reader thread receives frames;
  a window-manager timer calls ``pump()`` on the main thread, which applies progress and, at the
  end, builds the object. The operator then finishes, so the new object is one undo step.
* ``execute`` (scripts, ``EXEC_DEFAULT``, redo, background mode where timers never fire) runs the
  same request and pumps synchronously until it is done.
"""

import os
import time

import bpy
import numpy as np
from bpy.props import EnumProperty, FloatProperty, IntProperty, StringProperty

from . import client as client_mod
from . import mesh_builder, pointio, wire
from .client import BackendClient, BackendError
from .preferences import device_option, get_prefs, venv_dir, venv_python

E_INPUT = "bad_input"
POLL_INTERVAL_S = 0.05


class InputProblem(Exception):
    pass


class Job:
    def __init__(self, request, kind, name, origin=None, location=None, label=""):
        self.request = request
        self.kind = kind
        self.name = name
        self.origin = origin
        self.location = location
        self.label = label


class Runtime:
    """Module state shared by the operators and the panel (main thread only)."""

    def __init__(self):
        self.client = None
        self.job = None
        self.last_error = ""
        self.last_info = ""
        self.detected_python = None

    @property
    def busy(self):
        return self.job is not None


runtime = Runtime()


def _log_backend(line):
    if os.environ.get("OCCNET_DEBUG"):
        print("[occnet-backend]", line)


def resolve_python(prefs):
    if prefs.python_path:
        path = bpy.path.abspath(prefs.python_path)
        if not os.path.isfile(path):
            raise BackendError(wire.E_BACKEND_START,
                               f"the Backend Python {path!r} in the add-on preferences does not exist")
        return path
    if runtime.detected_python:
        return runtime.detected_python
    extra = []
    vpy = venv_python(venv_dir())
    if os.path.isfile(vpy):
        extra.append(vpy)
    res = client_mod.detect_interpreter(extra)
    if not res["ok"]:
        raise BackendError(wire.E_BACKEND_START,
                           res["error"] + ". Set the Backend Python in the add-on preferences "
                           "or use 'Set Up Backend Environment'")
    runtime.detected_python = res["path"]
    return res["path"]


def server_args(prefs):
    """Start-up options for the backend: load the configured models while it waits."""
    args = []
    for kind, ck in (("points", prefs.checkpoint_points), ("image", prefs.checkpoint_image)):
        args += ["--preload", f"{kind}:{bpy.path.abspath(ck)}" if ck else kind]
    return args


def get_client(prefs):
    python = resolve_python(prefs)
    if runtime.client is not None and runtime.client.python != python:
        runtime.client.stop()
        runtime.client = None
    if runtime.client is None:
        runtime.client = BackendClient(python=python, log=_log_backend)
    if not runtime.client.alive:
        runtime.client.args = server_args(prefs)
    return runtime.client


PRESTART_WAIT_S = 120.0
_prestart_deadline = [0.0]


def _prestart_timer():
    """UI only: start the backend soon after Blender starts, so the first request does not pay
    for Python + torch start-up and model loading. Waits for the interpreter detection."""
    prefs = get_prefs()
    if not getattr(prefs, "start_with_blender", False) or runtime.client is not None:
        return None
    if not prefs.python_path and runtime.detected_python is None:
        return 0.5 if time.monotonic() < _prestart_deadline[0] else None
    try:
        get_client(prefs).start()
    except BackendError as exc:  # shown when the user generates something
        _log_backend(f"prestart failed: {exc}")
    return None


def shutdown_backend():
    """Stop the backend process (disabling the add-on, tests)."""
    if runtime.job is not None and runtime.client is not None:
        runtime.client.cancel(runtime.job.request)
    runtime.job = None
    if runtime.client is not None:
        runtime.client.stop()
        runtime.client = None


def pump():
    """Apply the frames the reader thread received (main thread). Returns finished requests."""
    if runtime.client is None:
        return []
    return runtime.client.poll()


# -- gathering input ------------------------------------------------------------------------

MESH_LIKE = {"MESH", "CURVE", "SURFACE", "FONT", "META"}
ATTRIBUTE_GEOMETRY = {"POINTCLOUD", "CURVES"}


def object_points(obj, depsgraph):
    """World-space points of one object, modifiers applied; None for types without points."""
    ev = obj.evaluated_get(depsgraph)
    if obj.type in ATTRIBUTE_GEOMETRY:
        attr = ev.data.attributes.get("position")
        if attr is None:
            return np.zeros((0, 3), np.float32)
        buf = np.empty(len(attr.data) * 3, np.float32)
        attr.data.foreach_get("vector", buf)
    elif obj.type in MESH_LIKE:
        me = ev.to_mesh()
        try:
            if me is None:
                return np.zeros((0, 3), np.float32)
            buf = np.empty(len(me.vertices) * 3, np.float32)
            me.vertices.foreach_get("co", buf)
        finally:
            ev.to_mesh_clear()
    else:
        return None
    pts = buf.reshape(-1, 3).astype(np.float64)
    m = np.array(ev.matrix_world, dtype=np.float64)
    return (pts @ m[:3, :3].T + m[:3, 3]).astype(np.float32)


def selected_points(context):
    depsgraph = context.evaluated_depsgraph_get()
    chunks, names = [], []
    for obj in context.selected_objects:
        pts = object_points(obj, depsgraph)
        if pts is not None and len(pts):
            chunks.append(pts)
            names.append(obj.name)
    if not chunks:
        raise InputProblem("Select mesh, point-cloud or curve objects with vertices "
                           "(or choose a point-cloud file)")
    return np.concatenate(chunks), names


def image_pixels(image):
    """(H, W, 4) uint8 pixels of an image datablock, row 0 = top."""
    w, h = image.size
    if w == 0 or h == 0:
        raise InputProblem(f"Image {image.name!r} has no pixels (is its file missing?)")
    c = image.channels
    buf = np.empty(w * h * c, np.float32)
    image.pixels.foreach_get(buf)
    px = buf.reshape(h, w, c)[::-1]
    if image.is_float and c >= 3:
        # float buffers hold scene-linear values; the models were trained on sRGB images
        rgb = np.clip(px[:, :, :3], 0.0, 1.0)
        rgb = np.where(rgb <= 0.0031308, rgb * 12.92, 1.055 * np.power(rgb, 1 / 2.4) - 0.055)
        px = np.concatenate([rgb, px[:, :, 3:]], axis=2)
    if c == 1:
        px = np.repeat(px, 3, axis=2)
    elif c == 2:
        px = np.concatenate([np.repeat(px[:, :, :1], 3, axis=2), px[:, :, 1:2]], axis=2)
    elif c > 4:
        px = px[:, :, :4]
    return (np.clip(px, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def load_image_file(path):
    """Pixels of an image file, read through Blender without leaving a datablock behind."""
    path = bpy.path.abspath(path)
    if not os.path.isfile(path):
        raise InputProblem(f"Image file {path!r} does not exist")
    try:
        img = bpy.data.images.load(path, check_existing=False)
    except RuntimeError as exc:
        raise InputProblem(f"Cannot read image {path!r}: {exc}") from None
    try:
        return image_pixels(img)
    finally:
        bpy.data.images.remove(img)


def load_points_file(path):
    try:
        return pointio.load_points(bpy.path.abspath(path))
    except pointio.PointFileError as exc:
        raise InputProblem(str(exc)) from None


# -- running a job --------------------------------------------------------------------------

def start_job(context, kind, array, options, name, origin=None, location=None, label=""):
    """Send a reconstruction to the backend (starting it if needed); sets ``runtime.job``."""
    prefs = get_prefs(context)
    cl = get_client(prefs)
    runtime.last_error = ""
    runtime.last_info = ""
    req = cl.reconstruct(kind, array, options)
    runtime.job = Job(req, kind, name, origin, location, label)
    return runtime.job


def finish_job(context):
    """Apply the finished ``runtime.job``: build the object or record the error.
    Returns (object or None, error message or None)."""
    job = runtime.job
    runtime.job = None
    req = job.request
    if req.error is not None:
        err = req.error
        if err.code == wire.E_CANCELLED:
            runtime.last_error = ""
            runtime.last_info = f"{job.label or 'Reconstruction'} cancelled"
            return None, "cancelled"
        runtime.last_error = f"{err.message} [{err.code}]"
        return None, runtime.last_error
    t0 = time.perf_counter()
    try:
        obj = mesh_builder.object_from_result(context, job.name, req.result, origin=job.origin,
                                              location=job.location)
    except mesh_builder.MeshDataError as exc:
        runtime.last_error = f"The backend's mesh cannot be used: {exc}"
        return None, runtime.last_error
    stats = req.result.get("stats", {})
    build_s = time.perf_counter() - t0
    secs = stats.get("server_seconds")
    runtime.last_info = (f"{obj.name}: {len(obj.data.vertices)} vertices, "
                         f"{len(obj.data.polygons)} faces"
                         + (f", {secs:.2f} s in the backend" if isinstance(secs, (int, float)) else "")
                         + f", {build_s:.2f} s to build")
    return obj, None


def wait_for_job(context):
    """Pump synchronously until the current job is done (background mode, EXEC)."""
    wm = context.window_manager
    show = bool(getattr(wm, "windows", None)) and not bpy.app.background
    if show:
        wm.progress_begin(0, 100)
    try:
        cl = runtime.client
        req = runtime.job.request
        while not req.done:
            cl.poll(timeout=POLL_INTERVAL_S)
            if show:
                wm.progress_update(int(req.fraction * 100))
    finally:
        if show:
            wm.progress_end()


def _redraw(context):
    wm = context.window_manager
    for window in getattr(wm, "windows", []):
        for area in window.screen.areas:
            if area.type in {"VIEW_3D", "PROPERTIES"}:
                area.tag_redraw()


class _Generate:
    """Shared by the two generate operators (subclasses implement ``gather``)."""

    resolution: IntProperty(name="Resolution", default=128, min=32, max=512,
                            description="Marching-cubes grid resolution per axis: 32, 64, 128, 256 or 512 "
                                        "(default from the add-on preferences)")
    threshold: FloatProperty(name="Threshold", default=0.5, min=0.01, max=0.99,
                             description="Occupancy probability of the surface")
    max_faces: IntProperty(name="Face Budget", default=0, min=0,
                           description="Simplify to at most this many faces (0: no limit)")
    checkpoint: StringProperty(name="Checkpoint", subtype="FILE_PATH",
                               description="Model file; empty: from the add-on preferences, "
                                           "then the shipped default")

    _timer = None

    @classmethod
    def poll(cls, context):
        return not runtime.busy

    def request_options(self, context, kind):
        prefs = get_prefs(context)
        for prop, pref in (("resolution", "default_resolution"), ("threshold", "threshold"),
                           ("max_faces", "max_faces")):
            if not self.properties.is_property_set(prop):
                setattr(self, prop, getattr(prefs, pref))
        ck = self.checkpoint or (prefs.checkpoint_points if kind == "points" else prefs.checkpoint_image)
        return wire.options_dict(checkpoint=bpy.path.abspath(ck) if ck else None,
                                 resolution=self.resolution, threshold=self.threshold,
                                 max_faces=self.max_faces or None, device=device_option(prefs),
                                 normals=prefs.use_normals, refine=prefs.refine_points)

    def _start(self, context):
        try:
            kind, array, name, origin, location = self.gather(context)
            start_job(context, kind, array, self.request_options(context, kind), name, origin, location,
                      label=self.bl_label)
        except InputProblem as exc:
            runtime.last_error = str(exc)
            self.report({"ERROR"}, str(exc))
            return False
        except BackendError as exc:
            runtime.last_error = f"{exc.message} [{exc.code}]"
            self.report({"ERROR"}, exc.message)
            return False
        return True

    def _finish(self, context):
        obj, err = finish_job(context)
        _redraw(context)
        if err == "cancelled":
            self.report({"WARNING"}, runtime.last_info)
            return {"CANCELLED"}
        if err:
            self.report({"ERROR"}, err)
            return {"CANCELLED"}
        self.report({"INFO"}, runtime.last_info)
        return {"FINISHED"}

    def execute(self, context):
        if not self._start(context):
            return {"CANCELLED"}
        wait_for_job(context)
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
        job = runtime.job
        if job is None:  # the add-on was disabled or the backend stopped under us
            self._remove_timer(context)
            return {"CANCELLED"}
        pump()
        _redraw(context)
        if job.request.done:
            self._remove_timer(context)
            return self._finish(context)
        return {"PASS_THROUGH"}

    def cancel(self, context):
        """Blender aborts the modal operator (file load, quit): cancel the backend work."""
        self._remove_timer(context)
        if runtime.job is not None and runtime.client is not None:
            runtime.client.cancel(runtime.job.request)
        runtime.job = None


class OCCNET_OT_mesh_from_points(_Generate, bpy.types.Operator):
    """Reconstruct a watertight mesh from the selected objects' vertices or a point-cloud file"""
    bl_idname = "occnet.mesh_from_points"
    bl_label = "Mesh from Point Cloud"
    bl_options = {"REGISTER", "UNDO"}

    source: EnumProperty(name="Source", items=[
        ("SELECTED", "Selected Objects", "Vertices of the selected mesh, point-cloud and curve "
                                         "objects, in world space with modifiers applied"),
        ("FILE", "File", "A point-cloud file (.ply, .xyz, .txt, .pts, .csv, .npy, .npz, .obj)"),
    ], default="SELECTED")
    filepath: StringProperty(name="File", subtype="FILE_PATH")

    def gather(self, context):
        if self.source == "FILE":
            if not self.filepath:
                raise InputProblem("Choose a point-cloud file")
            pts = load_points_file(self.filepath)
            name = os.path.splitext(os.path.basename(self.filepath))[0] + "_occnet"
        else:
            pts, names = selected_points(context)
            name = (names[0] if len(names) == 1 else "PointCloud") + "_occnet"
        if len(pts) < 3:
            raise InputProblem(f"A point cloud needs at least 3 points, got {len(pts)}")
        return "points", pts, name, pointio.bbox_center(pts), None


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

    def _image(self, context):
        if self.image:
            img = bpy.data.images.get(self.image)
            if img is None:
                raise InputProblem(f"There is no image named {self.image!r}")
            return img
        scene_img = getattr(context.scene, "occnet_image", None)
        if scene_img is not None:
            return scene_img
        for area in getattr(context.screen, "areas", []):
            if area.type == "IMAGE_EDITOR" and area.spaces.active.image is not None:
                return area.spaces.active.image
        raise InputProblem("Choose an image (or an image file)")

    def gather(self, context):
        if self.source == "FILE":
            if not self.filepath:
                raise InputProblem("Choose an image file")
            pixels = load_image_file(self.filepath)
            name = os.path.splitext(os.path.basename(self.filepath))[0] + "_occnet"
        else:
            img = self._image(context)
            pixels = image_pixels(img)
            name = os.path.splitext(img.name)[0] + "_occnet"
        return "image", pixels, name, None, tuple(context.scene.cursor.location)


class OCCNET_OT_cancel(bpy.types.Operator):
    """Stop the running reconstruction"""
    bl_idname = "occnet.cancel"
    bl_label = "Cancel Reconstruction"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context):
        return runtime.busy

    def execute(self, context):
        if runtime.client is not None and runtime.job is not None:
            runtime.client.cancel(runtime.job.request)
        _redraw(context)
        return {"FINISHED"}


class OCCNET_OT_stop_backend(bpy.types.Operator):
    """Stop the backend process (it starts again on the next request)"""
    bl_idname = "occnet.stop_backend"
    bl_label = "Stop Backend"
    bl_options = {"INTERNAL"}

    def execute(self, context):
        shutdown_backend()
        runtime.last_info = "Backend stopped"
        _redraw(context)
        return {"FINISHED"}


classes = (OCCNET_OT_mesh_from_points, OCCNET_OT_mesh_from_image, OCCNET_OT_cancel,
           OCCNET_OT_stop_backend)


def _menu_func(self, context):
    self.layout.separator()
    self.layout.operator(OCCNET_OT_mesh_from_points.bl_idname, icon="OUTLINER_OB_POINTCLOUD")
    self.layout.operator(OCCNET_OT_mesh_from_image.bl_idname, icon="IMAGE_DATA")


def _detect_in_background():
    """Find a backend Python while the user works, so the first Generate does not wait for it."""
    vpy = venv_python(venv_dir())
    extra = [vpy] if os.path.isfile(vpy) else []

    def work():
        try:
            res = client_mod.detect_interpreter(extra)
        except Exception:
            return
        if res.get("ok") and runtime.detected_python is None:
            runtime.detected_python = res["path"]

    import threading
    threading.Thread(target=work, name="occnet-detect", daemon=True).start()


def register():
    for cls in classes:
        bpy.utils.register_class(cls)
    bpy.types.VIEW3D_MT_mesh_add.append(_menu_func)
    if not bpy.app.background:
        if not get_prefs().python_path:
            _detect_in_background()
        _prestart_deadline[0] = time.monotonic() + PRESTART_WAIT_S
        bpy.app.timers.register(_prestart_timer, first_interval=1.0, persistent=True)


def unregister():
    if bpy.app.timers.is_registered(_prestart_timer):
        bpy.app.timers.unregister(_prestart_timer)
    bpy.types.VIEW3D_MT_mesh_add.remove(_menu_func)
    shutdown_backend()
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
