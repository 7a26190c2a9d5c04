"""Add-on preferences: the Python that runs the backend, checkpoints, device, default resolution,
and the operators that detect/check an interpreter and set up a backend environment."""

import os
import subprocess
import sys
import threading

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, StringProperty

from . import client

ADDON_ID = __package__

DEVICE_ITEMS = [
    ("AUTO", "Automatic", "CUDA if available, then Apple MPS, then the CPU"),
    ("CUDA", "CUDA", "An NVIDIA GPU"),
    ("MPS", "MPS", "Apple silicon GPU"),
    ("CPU", "CPU", "The processor (slowest, always available)"),
]

# What the backend needs in a fresh environment (the backend code itself ships with the add-on)
BACKEND_REQUIREMENTS = ["torch", "numpy", "scikit-image", "trimesh", "pillow", "safetensors",
                        "scipy", "tqdm"]


class _Defaults:
    """Stands in for the preferences when the add-on was registered without addon_utils
    (e.g. ``blender_occnet.register()`` called directly from a script)."""
    python_path = ""
    checkpoint_points = ""
    checkpoint_image = ""
    device = "AUTO"
    default_resolution = 128
    threshold = 0.5
    max_faces = 0
    use_normals = False
    refine_points = True
    start_with_blender = False


def get_prefs(context=None):
    context = context or bpy.context
    addon = context.preferences.addons.get(ADDON_ID)
    if addon is not None and addon.preferences is not None:
        return addon.preferences
    return _Defaults()


# Results of checks, shown in the preferences (module state: not saved in preferences)
check_state = {"result": None, "running": False}
setup_state = {"thread": None, "lines": [], "error": None, "done": False, "python": None}


def venv_dir():
    if ADDON_ID.startswith("bl_ext."):
        try:
            return bpy.utils.extension_path_user(ADDON_ID, path="venv", create=True)
        except (ValueError, RuntimeError):
            pass
    return os.path.join(bpy.utils.user_resource("DATAFILES", path="blender_occnet", create=True), "venv")


def venv_python(path):
    if sys.platform == "win32":
        return os.path.join(path, "Scripts", "python.exe")
    return os.path.join(path, "bin", "python")


def device_option(prefs):
    return None if prefs.device == "AUTO" else prefs.device.lower()


class OCCNET_OT_detect_python(bpy.types.Operator):
    """Find a Python interpreter that has PyTorch and can run the backend"""
    bl_idname = "occnet.detect_python"
    bl_label = "Detect Python"
    bl_options = {"INTERNAL"}

    def execute(self, context):
        prefs = get_prefs(context)
        extra = []
        vpy = venv_python(venv_dir())
        if os.path.isfile(vpy):
            extra.append(vpy)
        res = client.detect_interpreter(extra)
        check_state["result"] = res
        if not res["ok"]:
            self.report({"ERROR"}, res["error"])
            return {"CANCELLED"}
        if not isinstance(prefs, _Defaults):
            prefs.python_path = res["path"]
        self.report({"INFO"}, f"Backend Python: {res['path']} (torch {res['torch']}, {res['device']})")
        return {"FINISHED"}


class OCCNET_OT_check_python(bpy.types.Operator):
    """Run the chosen Python and show its PyTorch version and device"""
    bl_idname = "occnet.check_python"
    bl_label = "Check Python"
    bl_options = {"INTERNAL"}

    def execute(self, context):
        prefs = get_prefs(context)
        python = bpy.path.abspath(prefs.python_path) if prefs.python_path else ""
        if not python:
            self.report({"ERROR"}, "Set the backend Python first (or press Detect)")
            return {"CANCELLED"}
        res = client.check_interpreter(python)
        check_state["result"] = res
        if not res["ok"]:
            self.report({"ERROR"}, res["error"])
            return {"CANCELLED"}
        self.report({"INFO"}, f"torch {res['torch']} on {res['device']}")
        return {"FINISHED"}


def _run_setup(base_python, target, requirements, system_site_packages):
    """Worker thread: create the venv and pip-install the backend's requirements."""
    lines = setup_state["lines"]

    def run(cmd):
        lines.append("$ " + " ".join(cmd))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=client.child_env(), text=True,
                                errors="replace")
        for line in proc.stdout:
            lines.append(line.rstrip())
            del lines[:-200]
        if proc.wait() != 0:
            raise RuntimeError(f"{os.path.basename(cmd[0])} {' '.join(cmd[1:3])} failed with code "
                               f"{proc.returncode}: {lines[-1] if lines else ''}")

    try:
        cmd = [base_python, "-m", "venv"]
        if system_site_packages:
            cmd.append("--system-site-packages")
        if not requirements:
            cmd.append("--without-pip")
        run(cmd + [target])
        py = venv_python(target)
        if system_site_packages:
            _link_parent_site_packages(base_python, py, lines)
        if requirements:
            run([py, "-m", "pip", "install", "--upgrade", "pip"])
            run([py, "-m", "pip", "install"] + list(requirements))
        res = client.check_interpreter(py, timeout=300)
        if not res["ok"]:
            raise RuntimeError(res["error"])
        setup_state["python"] = py
        check_state["result"] = res
        lines.append(f"ready: torch {res['torch']} on {res['device']}")
    except Exception as exc:
        setup_state["error"] = str(exc)
    finally:
        setup_state["done"] = True


def _link_parent_site_packages(base_python, py, lines):
    """``venv --system-site-packages`` only sees the *base* installation's packages. When the base
    Python is itself a venv (or conda env) with torch, add a .pth file so the new venv sees its
    site-packages too."""
    import json
    code = ("import json, os, site, sys; print(json.dumps(site.getsitepackages() + [p for p in sys.path "
            "if os.path.basename(p) in ('site-packages', 'dist-packages')]))")
    try:
        parent = json.loads(subprocess.run([base_python, "-c", code], capture_output=True, text=True,
                                           check=True, env=client.child_env()).stdout)
        own = json.loads(subprocess.run([py, "-c", code], capture_output=True, text=True,
                                        check=True, env=client.child_env()).stdout)
    except (OSError, ValueError, subprocess.CalledProcessError) as exc:
        lines.append(f"(could not list {base_python}'s site-packages: {exc})")
        return
    dirs = []
    for d in parent:
        if os.path.isdir(d) and d not in dirs and d not in own:
            dirs.append(d)
    if own and dirs:
        with open(os.path.join(own[0], "occnet_parent_site.pth"), "w", encoding="utf-8") as f:
            f.write("\n".join(dirs) + "\n")
        lines.append("reusing packages from " + ", ".join(dirs))


def _finish_setup():
    """Main thread: apply the result of the setup thread to the preferences."""
    if not setup_state["done"]:
        return 0.5
    th = setup_state["thread"]
    if th is not None:
        th.join()
    setup_state["thread"] = None
    prefs = get_prefs()
    if setup_state["python"] and not isinstance(prefs, _Defaults):
        prefs.python_path = setup_state["python"]
    for window in getattr(bpy.context.window_manager, "windows", []):
        for area in window.screen.areas:
            area.tag_redraw()
    return None


class OCCNET_OT_setup_environment(bpy.types.Operator):
    """Create a Python environment for the backend (a venv with PyTorch and the backend's
    dependencies) and use it. Downloads several hundred MB"""
    bl_idname = "occnet.setup_environment"
    bl_label = "Set Up Backend Environment"
    bl_options = {"INTERNAL"}

    base_python: StringProperty(name="Base Python", subtype="FILE_PATH",
                                description="Python that creates the venv (default: Blender's)")
    target: StringProperty(name="Folder", subtype="DIR_PATH",
                           description="Where to create the venv (default: the add-on's user folder)")
    requirements: StringProperty(name="Requirements", default=" ".join(BACKEND_REQUIREMENTS),
                                 description="Packages to install with pip, separated by spaces")
    system_site_packages: BoolProperty(
        name="System Site Packages", default=False,
        description="Let the venv see the base Python's packages (useful when torch is already there)")

    @classmethod
    def poll(cls, context):
        return setup_state["thread"] is None

    def execute(self, context):
        base = self.base_python or sys.executable
        target = self.target or venv_dir()
        setup_state.update({"lines": [], "error": None, "done": False, "python": None})
        args = (base, target, self.requirements.split(), self.system_site_packages)
        if bpy.app.background:
            _run_setup(*args)
            setup_state["thread"] = None
            _finish_setup()
        else:
            th = threading.Thread(target=_run_setup, args=args, daemon=True, name="occnet-setup")
            setup_state["thread"] = th
            th.start()
            bpy.app.timers.register(_finish_setup, first_interval=0.5)
            self.report({"INFO"}, f"Setting up the backend environment in {target}")
            return {"FINISHED"}
        if setup_state["error"]:
            self.report({"ERROR"}, f"Backend environment setup failed: {setup_state['error']}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"Backend environment ready: {setup_state['python']}")
        return {"FINISHED"}


class OCCNET_AP_preferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    python_path: StringProperty(
        name="Backend Python", subtype="FILE_PATH",
        description="Python interpreter with PyTorch that runs the backend "
                    "(empty: detect automatically)")
    checkpoint_points: StringProperty(
        name="Point-Cloud Checkpoint", subtype="FILE_PATH",
        description="Model for point clouds (.safetensors); empty: the shipped default")
    checkpoint_image: StringProperty(
        name="Image Checkpoint", subtype="FILE_PATH",
        description="Model for images (.safetensors); empty: the shipped default")
    device: EnumProperty(name="Device", items=DEVICE_ITEMS, default="AUTO")
    default_resolution: IntProperty(name="Default Resolution", default=128, min=32, max=512,
                                    description="Marching-cubes grid resolution per axis: 32, 64, 128, 256 or 512")
    threshold: FloatProperty(name="Threshold", default=0.5, min=0.01, max=0.99,
                             description="Occupancy probability of the surface")
    max_faces: IntProperty(name="Face Budget", default=0, min=0,
                           description="Simplify results to at most this many faces (0: no limit)")

    start_with_blender: BoolProperty(
        name="Start Backend with Blender", default=True,
        description="Start the backend and load the models in the background when Blender "
                    "starts, so the first reconstruction does not wait for them")
    refine_points: BoolProperty(
        name="Refine onto Points", default=True,
        description="Point clouds: pull the surface onto the input points and smooth it. Turn off "
                    "for partial scans, where it would bend unscanned parts towards the scanned ones")
    use_normals: BoolProperty(
        name="Network Normals",
        description="Ask the backend for normals from the network's gradient and use them as "
                    "custom normals (slower; Blender's smooth normals are used otherwise)")

    def draw(self, context):
        layout = self.layout
        col = layout.column()
        row = col.row(align=True)
        row.prop(self, "python_path")
        row.operator("occnet.detect_python", text="", icon="VIEWZOOM")
        row.operator("occnet.check_python", text="Check")
        res = check_state["result"]
        if res is not None:
            box = col.box()
            if res.get("ok"):
                box.label(text=f"Python {res.get('python')}, torch {res.get('torch')}, "
                               f"device: {res.get('device')}", icon="CHECKMARK")
            else:
                box.label(text=res.get("error", "failed"), icon="ERROR")
        row = col.row()
        row.operator("occnet.setup_environment", icon="CONSOLE")
        if setup_state["thread"] is not None or setup_state["lines"]:
            box = col.box()
            if setup_state["thread"] is not None:
                box.label(text="Setting up the backend environment...", icon="SORTTIME")
            if setup_state["error"]:
                box.label(text=setup_state["error"], icon="ERROR")
            for line in setup_state["lines"][-4:]:
                box.label(text=line[:120])
        col.separator()
        col.prop(self, "checkpoint_points")
        col.prop(self, "checkpoint_image")
        col.prop(self, "device")
        col.prop(self, "default_resolution")
        col.prop(self, "threshold")
        col.prop(self, "max_faces")
        col.prop(self, "refine_points")
        col.prop(self, "use_normals")
        col.prop(self, "start_with_blender")


classes = (OCCNET_OT_detect_python, OCCNET_OT_check_python, OCCNET_OT_setup_environment,
           OCCNET_AP_preferences)


def register():
    for cls in classes:
        bpy.utils.register_class(cls)


def unregister():
    if bpy.app.timers.is_registered(_finish_setup):
        bpy.app.timers.unregister(_finish_setup)
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
