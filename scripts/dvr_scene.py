"""A Blender scene to fit with DVR (docs/DVR.md): a red cube and a blue ball inside the unit box,
12 cameras around them, exported with the add-on's Export Cameras for DVR (renders with alpha and
cameras.json) into the folder given last:

    .venv/bin/python scripts/dvr_scene.py /tmp/dvr_demo/views

Workbench with flat lighting and the Standard view transform, so a surface point has the same
colour in every view (what the RGB loss assumes)."""
import math
import sys

import bpy
import addon_utils  # noqa: E402  (importing bpy puts Blender's modules on the path)
from mathutils import Vector

bpy.ops.wm.read_factory_settings(use_empty=True)
addon_utils.enable("blender_occnet", default_set=True, handle_error=None)
scene = bpy.context.scene
scene.render.engine = "BLENDER_WORKBENCH"
scene.display.shading.light = "FLAT"
scene.display.shading.color_type = "MATERIAL"
scene.view_settings.view_transform = "Standard"
scene.render.resolution_x = scene.render.resolution_y = 64


def material(name, rgba):
    m = bpy.data.materials.new(name)
    m.diffuse_color = rgba
    return m


bpy.ops.mesh.primitive_cube_add(size=0.5, location=(-0.2, 0.0, 0.0))
bpy.context.active_object.data.materials.append(material("red", (0.8, 0.05, 0.05, 1)))
bpy.ops.mesh.primitive_uv_sphere_add(radius=0.22, location=(0.24, 0.0, 0.0))
bpy.context.active_object.data.materials.append(material("blue", (0.05, 0.1, 0.8, 1)))
for number in range(12):
    azimuth, elevation = 2 * math.pi * number / 12, math.radians(20 if number % 2 else 45)
    eye = 2.5 * Vector((math.cos(azimuth) * math.cos(elevation), math.sin(azimuth) * math.cos(elevation),
                        math.sin(elevation)))
    camera = bpy.data.objects.new(f"cam{number:02d}", bpy.data.cameras.new(f"cam{number:02d}"))
    camera.location = eye
    camera.rotation_euler = (-eye).to_track_quat("-Z", "Y").to_euler()
    scene.collection.objects.link(camera)
print(bpy.ops.occnet.export_cameras("EXEC_DEFAULT", directory=sys.argv[-1]))
