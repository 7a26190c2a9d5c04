"""OccNet Reconstruction: meshes from images and point clouds with Occupancy Networks.

Blender 4.2+ extension that also installs as a legacy add-on (4.2+ too: older Blenders lack the
mesh and UI API it uses, so register() refuses them with a message). The heavy lifting runs in a separate
Python process (``python -m backend serve``) that talks to the add-on over pipes (see ``wire.py``).

This file must not import bpy at module level: the backend imports ``blender_occnet.wire`` from
a Python without bpy. The bpy-facing modules are imported inside register()/unregister().
"""

bl_info = {
    "name": "OccNet Reconstruction",
    "author": "blender-occnet developers",
    "version": (0, 1, 0),
    "blender": (4, 2, 0),  # MIN_BLENDER; blender_manifest.toml: blender_version_min
    "location": "View3D > Sidebar > OccNet",
    "description": "Turn images and point clouds into meshes with Occupancy Networks",
    "category": "Mesh",
}

__version__ = "0.1.0"

# Blender 3.x lacks what the add-on uses (MeshPolygon.loop_total from foreach_set of loop starts,
# UILayout.progress); there it would crash Blender instead of failing
MIN_BLENDER = (4, 2, 0)

_registered = []


def _blender_version():
    import bpy
    return tuple(bpy.app.version)


def check_blender_version(version):
    if tuple(version) < MIN_BLENDER:
        need = ".".join(map(str, MIN_BLENDER[:2]))
        raise RuntimeError(f"OccNet Reconstruction needs Blender {need} or newer; this is Blender "
                           f"{'.'.join(map(str, version))}. Please update Blender.")


def register():
    check_blender_version(_blender_version())  # before importing anything that needs 4.2
    import bpy

    from . import export_cameras, operators, panel, preferences, runtime

    try:
        for mod in (preferences, operators, export_cameras, panel):
            mod.register()
            _registered.append(mod)
        if not bpy.app.background:
            runtime.start_background_work()
    except BaseException:
        unregister()  # leave nothing half-registered behind
        raise


def unregister():
    # stop the backend first: disabling the add-on must not leave a process behind
    from . import runtime

    runtime.stop_background_work()
    while _registered:
        mod = _registered.pop()
        try:
            mod.unregister()
        except Exception as exc:  # keep unregistering the rest
            print(f"blender_occnet: failed to unregister {mod.__name__}: {exc}")
