"""The 3D Viewport sidebar panel (N panel, "OccNet" tab)."""

import bpy
from bpy.props import PointerProperty, StringProperty

from .operators import runtime
from .preferences import get_prefs


class OCCNET_PT_panel(bpy.types.Panel):
    bl_idname = "OCCNET_PT_panel"
    bl_label = "OccNet Reconstruction"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "OccNet"

    def draw(self, context):
        layout = self.layout
        scene = context.scene
        prefs = get_prefs(context)

        box = layout.box()
        box.label(text="Point Cloud", icon="OUTLINER_OB_POINTCLOUD")
        op = box.operator("occnet.mesh_from_points", text="Generate from Selected", icon="MESH_ICOSPHERE")
        op.source = "SELECTED"
        box.prop(scene, "occnet_points_file", text="")
        row = box.row()
        row.enabled = bool(scene.occnet_points_file)
        op = row.operator("occnet.mesh_from_points", text="Generate from File", icon="FILE")
        op.source = "FILE"
        op.filepath = scene.occnet_points_file

        box = layout.box()
        box.label(text="Image", icon="IMAGE_DATA")
        box.template_ID(scene, "occnet_image", open="image.open")
        row = box.row()
        row.enabled = scene.occnet_image is not None
        op = row.operator("occnet.mesh_from_image", text="Generate from Image", icon="MESH_MONKEY")
        op.source = "IMAGE"
        op.image = scene.occnet_image.name if scene.occnet_image is not None else ""
        box.prop(scene, "occnet_image_file", text="")
        row = box.row()
        row.enabled = bool(scene.occnet_image_file)
        op = row.operator("occnet.mesh_from_image", text="Generate from Image File", icon="FILE_IMAGE")
        op.source = "FILE"
        op.filepath = scene.occnet_image_file

        col = layout.column()
        col.label(text=f"Resolution {prefs.default_resolution}, device {prefs.device.lower()}")
        job = runtime.job
        if job is not None:
            req = job.request
            stage = req.stage.replace("_", " ")
            col.progress(factor=float(req.fraction), type="BAR",
                         text=f"{job.label}: {stage} {req.fraction:.0%}")
            col.operator("occnet.cancel", text="Cancel", icon="CANCEL")
        else:
            cl = runtime.client
            status = "running" if cl is not None and cl.alive else "not started"
            row = col.row()
            row.label(text=f"Backend: {status}", icon="CHECKMARK" if cl is not None and cl.alive else "BLANK1")
            if cl is not None and cl.alive:
                row.operator("occnet.stop_backend", text="", icon="X")
        if runtime.last_error:
            err = layout.box()
            err.alert = True
            _wrapped(err, runtime.last_error, icon="ERROR")
        elif runtime.last_info:
            _wrapped(layout, runtime.last_info, icon="INFO")


def _wrapped(layout, text, icon, width=48):
    words = text.split()
    lines, cur = [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    if cur:
        lines.append(cur)
    for i, line in enumerate(lines[:8]):
        layout.label(text=line, icon=icon if i == 0 else "BLANK1")


def register():
    bpy.types.Scene.occnet_points_file = StringProperty(
        name="Point-Cloud File", subtype="FILE_PATH",
        description="Point cloud (.ply, .xyz, .txt, .pts, .csv, .npy, .npz, .obj)")
    bpy.types.Scene.occnet_image_file = StringProperty(name="Image File", subtype="FILE_PATH")
    bpy.types.Scene.occnet_image = PointerProperty(name="Image", type=bpy.types.Image)
    bpy.utils.register_class(OCCNET_PT_panel)


def unregister():
    bpy.utils.unregister_class(OCCNET_PT_panel)
    for name in ("occnet_points_file", "occnet_image_file", "occnet_image"):
        if hasattr(bpy.types.Scene, name):
            delattr(bpy.types.Scene, name)
