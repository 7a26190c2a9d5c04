"""Add-on preferences: the Python that runs the backend, checkpoints, device, request defaults, and
the operators that detect/check an interpreter and set up a backend environment. The logic lives
in interpreter.py and setup_env.py; this module is the Blender side of it."""

import os
import sys
import threading

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, StringProperty

from . import interpreter, request_options, setup_env, ui_text

ADDON_ID = __package__
BATCH_LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "batch_launcher.py")

DEVICE_ITEMS = [
    ("AUTO", "Automatic", "CUDA if available, then Apple MPS, then the CPU"),
    ("CUDA", "CUDA", "An NVIDIA GPU"),
    ("MPS", "MPS", "Apple silicon GPU"),
    ("CPU", "CPU", "The processor (slowest, always available)"),
]


class _Defaults:
    """Stands in for the preferences when the add-on was registered without addon_utils
    (e.g. ``blender_occnet.register()`` called directly from a script)."""
    python_path = ""
    checkpoint_points = ""
    checkpoint_image = ""
    device = "AUTO"
    default_resolution = str(request_options.DEFAULT_RESOLUTION)
    threshold = request_options.DEFAULT_THRESHOLD
    max_faces = request_options.NO_FACE_BUDGET
    use_normals = False
    refine_points = True
    vertex_colours = True
    start_with_blender = False


def get_prefs(context=None):
    context = context or bpy.context
    addon = context.preferences.addons.get(ADDON_ID)
    if addon is not None and addon.preferences is not None:
        return addon.preferences
    return _Defaults()


def venv_dir():
    if ADDON_ID.startswith("bl_ext."):
        try:
            return bpy.utils.extension_path_user(ADDON_ID, path="venv", create=True)
        except (ValueError, RuntimeError):
            pass
    return os.path.join(bpy.utils.user_resource("DATAFILES", path="blender_occnet", create=True), "venv")


def own_venv_pythons():
    """The add-on's own venv, when Set Up Backend Environment made one."""
    python = setup_env.venv_python(venv_dir())
    return [python] if os.path.isfile(python) else []


def device_option(prefs):
    return None if prefs.device == "AUTO" else prefs.device.lower()


def snap_face_budget(owner, _context):
    """Budgets of 1..3 faces cannot hold a closed mesh: snap them to the smallest one that can."""
    if 0 < owner.max_faces < request_options.MIN_FACE_BUDGET:
        owner.max_faces = request_options.MIN_FACE_BUDGET


# What the last check found (a Probe), shown in the preferences; module state, never saved
check_state = {"result": None, "checking": ""}


def _redraw_preferences():
    for window in getattr(bpy.context.window_manager, "windows", []):
        for area in window.screen.areas:
            if area.type == "PREFERENCES":
                area.tag_redraw()


def _probe_chosen_python(prefs, _context):
    """Check a Backend Python as soon as it is chosen (in a thread: importing torch takes
    seconds), so a Python without torch is flagged before the first request."""
    python = bpy.path.abspath(prefs.python_path) if prefs.python_path else ""
    if not python:
        return
    check_state["checking"] = python

    def show(found):
        if check_state["checking"] == python:
            check_state["result"] = found
            check_state["checking"] = ""

    interpreter.probe_in_background(python, then=show)


class OCCNET_OT_detect_python(bpy.types.Operator):
    """Find a Python interpreter that has PyTorch and the backend's packages"""
    bl_idname = "occnet.detect_python"
    bl_label = "Detect Python"
    bl_options = {"INTERNAL"}

    def execute(self, context):
        prefs = get_prefs(context)
        try:
            found = interpreter.find_usable(own_venv_pythons())
        except interpreter.InterpreterProblem as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        check_state["result"] = found
        if not isinstance(prefs, _Defaults):
            prefs.python_path = found.python
        self.report({"INFO"}, f"Backend Python: {found.python} ({found.summary()})")
        return {"FINISHED"}


class OCCNET_OT_check_python(bpy.types.Operator):
    """Run the chosen Python and show its package versions and device"""
    bl_idname = "occnet.check_python"
    bl_label = "Check Python"
    bl_options = {"INTERNAL"}

    def execute(self, context):
        prefs = get_prefs(context)
        python = bpy.path.abspath(prefs.python_path) if prefs.python_path else ""
        if not python:
            self.report({"ERROR"}, "Set the Backend Python first (or press Detect)")
            return {"CANCELLED"}
        interpreter.forget(python)  # an explicit check looks again
        found = interpreter.cached_probe(python)
        check_state["result"] = found
        if not found.ok:
            self.report({"ERROR"}, found.problem())
            return {"CANCELLED"}
        self.report({"INFO"}, found.summary())
        return {"FINISHED"}


# The setup in progress: its thread and its setup_env.Progress
_setup = {"thread": None, "progress": None}


def _poll_setup():
    """Main thread (a timer, or the operator's loop in background mode): show the setup thread's
    progress in the window manager's properties; at the end, use the new environment."""
    progress = _setup["progress"]
    wm = bpy.context.window_manager
    status, fraction, _lines = progress.snapshot()
    wm.occnet_setup_status = status
    wm.occnet_setup_progress = fraction
    _redraw_preferences()
    if not progress.done:
        return 0.2
    _setup["thread"].join()
    _setup["thread"] = None
    prefs = get_prefs()
    if progress.python and not isinstance(prefs, _Defaults):
        prefs.python_path = progress.python
    return None


def _download_text():
    torch = setup_env.torch_build()
    return (f"Downloads {torch.label}: {torch.download}, and the other packages: "
            f"{setup_env.OTHER_PACKAGES_DOWNLOAD}")


class OCCNET_OT_setup_environment(bpy.types.Operator):
    """Create a Python environment for the backend (a venv with PyTorch and the backend's
    packages) and use it"""
    bl_idname = "occnet.setup_environment"
    bl_label = "Set Up Backend Environment"
    bl_options = {"INTERNAL"}

    base_python: StringProperty(name="Base Python", subtype="FILE_PATH",
                                description="Python that creates the venv (default: Blender's)")
    target: StringProperty(name="Folder", subtype="DIR_PATH",
                           description="Where to create the venv (default: the add-on's user folder)")
    install_packages: BoolProperty(
        name="Install Packages", default=True,
        description="Download and install PyTorch and the backend's packages with pip (off: only "
                    "create the venv, e.g. with System Site Packages where torch already is)")
    extra_requirements: StringProperty(
        name="Extra Packages",
        description="More packages to install, separated by commas, e.g. 'open3d>=0.18' "
                    "(names and version specifiers only)")
    system_site_packages: BoolProperty(
        name="System Site Packages", default=False,
        description="Let the venv see the base Python's packages (useful when torch is already there)")

    @classmethod
    def description(cls, context, properties):
        return cls.__doc__ + ". " + _download_text()

    @classmethod
    def poll(cls, context):
        return _setup["thread"] is None

    def execute(self, context):
        try:
            plan = self._plan()
        except setup_env.SetupError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        progress = setup_env.Progress()
        thread = threading.Thread(target=setup_env.run, args=(plan, progress), daemon=True,
                                  name="occnet-setup")
        _setup.update(thread=thread, progress=progress)
        thread.start()
        if not bpy.app.background:
            bpy.app.timers.register(_poll_setup, first_interval=0.2)
            self.report({"INFO"}, f"Setting up the backend environment in {plan.target}")
            return {"FINISHED"}
        while _poll_setup() is not None:  # no timers without the UI: poll here
            thread.join(0.2)
        if progress.error:
            self.report({"ERROR"}, f"Backend environment setup failed: {progress.error}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"Backend environment ready: {progress.python}")
        return {"FINISHED"}

    def _plan(self):
        extras = setup_env.parse_requirements(self.extra_requirements)
        if not self.install_packages:
            if extras:
                raise setup_env.SetupError("Extra Packages need Install Packages")
            requirements = []
        elif not bpy.app.online_access:
            raise setup_env.SetupError(
                "Blender is set to work offline, so nothing can be downloaded: allow it in "
                "Preferences > System > Network > Allow Online Access, or choose a Backend Python "
                "that already has PyTorch")
        else:
            requirements = setup_env.backend_requirements() + extras
        return setup_env.Plan(self.base_python or sys.executable, self.target or venv_dir(),
                              requirements, setup_env.torch_build(), self.system_site_packages)


class OCCNET_OT_copy_batch_command(bpy.types.Operator):
    """Copy the command line that converts files headless with this add-on"""
    bl_idname = "occnet.copy_batch_command"
    bl_label = "Copy Batch Command"
    bl_options = {"INTERNAL"}

    def execute(self, context):
        context.window_manager.clipboard = batch_command()
        self.report({"INFO"}, "Copied: " + context.window_manager.clipboard)
        return {"FINISHED"}


def batch_command():
    return (f'blender -b --python-exit-code 2 --python "{BATCH_LAUNCHER}" -- '
            "INPUTS... --out DIR")


def _draw_check(col, context):
    if check_state["checking"]:
        col.label(text=f"Checking {check_state['checking']}...", icon="SORTTIME")
        return
    found = check_state["result"]
    if found is None:
        return
    box = col.box()
    if found.ok:
        box.label(text=found.summary(), icon="CHECKMARK")
    else:
        ui_text.draw_wrapped(box, context, found.problem(), icon="ERROR")


def _draw_setup(col, wm):
    col.operator("occnet.setup_environment", icon="CONSOLE")
    col.label(text=_download_text(), icon="INFO")
    if _setup["progress"] is None:
        return
    box = col.box()
    box.progress(factor=wm.occnet_setup_progress, type="BAR", text=wm.occnet_setup_status)
    for line in _setup["progress"].snapshot()[2]:
        box.label(text=line[:120])


class OCCNET_AP_preferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    python_path: StringProperty(
        name="Backend Python", subtype="FILE_PATH", update=_probe_chosen_python,
        description="Python interpreter with PyTorch that runs the backend "
                    "(empty: detect automatically)")
    checkpoint_points: StringProperty(
        name="Point-Cloud Checkpoint", subtype="FILE_PATH",
        description="Model for point clouds (.safetensors); empty: the shipped default")
    checkpoint_image: StringProperty(
        name="Image Checkpoint", subtype="FILE_PATH",
        description="Model for images (.safetensors); empty: the shipped default")
    device: EnumProperty(name="Device", items=DEVICE_ITEMS, default="AUTO")
    default_resolution: EnumProperty(
        name="Default Resolution", items=request_options.resolution_items(),
        default=str(request_options.DEFAULT_RESOLUTION),
        description="Marching-cubes grid resolution per axis")
    threshold: FloatProperty(name="Threshold", default=request_options.DEFAULT_THRESHOLD,
                             min=request_options.THRESHOLD_MIN, max=request_options.THRESHOLD_MAX,
                             description="Occupancy probability of the surface")
    max_faces: IntProperty(name="Face Budget", default=request_options.NO_FACE_BUDGET, min=0,
                           update=snap_face_budget,
                           description="Simplify results to at most this many faces (0: no limit)")

    start_with_blender: BoolProperty(
        name="Start Backend with Blender", default=True,
        description="Start the backend and load the models in the background when Blender "
                    "starts, so the first reconstruction does not wait for them")
    refine_points: BoolProperty(
        name="Refine onto Points", default=True,
        description="Point clouds: pull the surface onto the input points and smooth it. Turn off "
                    "for partial scans, where it would bend unscanned parts towards the scanned ones")
    vertex_colours: BoolProperty(
        name="Vertex Colours", default=True,
        description="Give results the colours of the input points, of the picture (viewer-centred image "
                    "models) or of a model with a texture head: a colour attribute and a material that shows it")
    use_normals: BoolProperty(
        name="Network Normals",
        description="Ask the backend for normals from the network's gradient and use them as "
                    "custom normals (slower; Blender's smooth normals are used otherwise)")

    def draw(self, context):
        col = self.layout.column()
        row = col.row(align=True)
        row.prop(self, "python_path")
        row.operator("occnet.detect_python", text="", icon="VIEWZOOM")
        row.operator("occnet.check_python", text="Check")
        _draw_check(col, context)
        _draw_setup(col, context.window_manager)
        col.separator()
        for prop in ("checkpoint_points", "checkpoint_image", "device", "default_resolution",
                     "threshold", "max_faces", "refine_points", "vertex_colours", "use_normals",
                     "start_with_blender"):
            col.prop(self, prop)
        col.separator()
        row = col.row()
        row.label(text="Headless: " + batch_command())
        row.operator("occnet.copy_batch_command", text="", icon="COPYDOWN")


classes = (OCCNET_OT_detect_python, OCCNET_OT_check_python, OCCNET_OT_setup_environment,
           OCCNET_OT_copy_batch_command, OCCNET_AP_preferences)


def register():
    bpy.types.WindowManager.occnet_setup_status = StringProperty(name="Setup Status")
    bpy.types.WindowManager.occnet_setup_progress = FloatProperty(
        name="Setup Progress", min=0.0, max=1.0, subtype="FACTOR")
    for cls in classes:
        bpy.utils.register_class(cls)


def unregister():
    if bpy.app.timers.is_registered(_poll_setup):
        bpy.app.timers.unregister(_poll_setup)
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
    del bpy.types.WindowManager.occnet_setup_status
    del bpy.types.WindowManager.occnet_setup_progress
