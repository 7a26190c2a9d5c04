"""OccNet Reconstruction: meshes from images and point clouds with Occupancy Networks.

Blender 4.2+ extension that also installs as a legacy add-on. The heavy lifting runs in a separate
Python process (``python -m backend serve``) that talks to the add-on over pipes (see ``wire.py``).

This file must not import bpy at module level: the backend imports ``blender_occnet.wire`` from
a Python without bpy. The bpy-facing modules are imported inside register()/unregister().
"""

bl_info = {
    "name": "OccNet Reconstruction",
    "author": "blender-occnet developers",
    "version": (0, 1, 0),
    "blender": (4, 2, 0),
    "location": "View3D > Sidebar > OccNet",
    "description": "Turn images and point clouds into meshes with Occupancy Networks",
    "category": "Mesh",
}

__version__ = "0.1.0"

_registered = []


def register():
    from . import operators, panel, preferences

    try:
        for mod in (preferences, operators, panel):
            mod.register()
            _registered.append(mod)
    except BaseException:
        unregister()  # leave nothing half-registered behind
        raise


def unregister():
    # stop the backend first: disabling the add-on must not leave a process behind
    from . import operators

    operators.shutdown_backend()
    while _registered:
        mod = _registered.pop()
        try:
            mod.unregister()
        except Exception as exc:  # keep unregistering the rest
            print(f"blender_occnet: failed to unregister {mod.__name__}: {exc}")
