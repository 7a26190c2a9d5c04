"""The 3D Viewport sidebar panel (N panel, "OccNet" tab)."""

import bpy
from bpy.props import FloatProperty, PointerProperty, StringProperty

from . import request_options, ui_text
from .preferences import get_prefs
from .runtime import session


def image_options(op, scene):
    """The panel's Mask and Focal Length fields, handed to a Mesh from Image button."""
    op.mask = scene.occnet_mask.name if scene.occnet_mask is not None else ""
    op.focal_length = scene.occnet_focal_length


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
        image_options(op, scene)
        box.prop(scene, "occnet_image_file", text="")
        row = box.row()
        row.enabled = bool(scene.occnet_image_file)
        op = row.operator("occnet.mesh_from_image", text="Generate from Image File", icon="FILE_IMAGE")
        op.source = "FILE"
        op.filepath = scene.occnet_image_file
        image_options(op, scene)
        box.label(text="Mask (optional: else alpha or estimate)")
        box.template_ID(scene, "occnet_mask", open="image.open")
        box.prop(scene, "occnet_focal_length")

        col = layout.column()
        col.label(text=f"Resolution {prefs.default_resolution}, device {prefs.device.lower()}")
        job = session.job
        if job is not None:
            req = job.request
            stage = req.stage.replace("_", " ")
            col.progress(factor=float(req.fraction), type="BAR",
                         text=f"{job.label}: {stage} {req.fraction:.0%}")
            col.operator("occnet.cancel", text="Cancel", icon="CANCEL")
        else:
            running = session.backend_running
            row = col.row()
            row.label(text=f"Backend: {'running' if running else 'not started'}",
                      icon="CHECKMARK" if running else "BLANK1")
            if running:
                row.operator("occnet.stop_backend", text="", icon="X")
        if session.last_error:
            err = layout.box()
            err.alert = True
            ui_text.draw_wrapped(err, context, session.last_error, icon="ERROR")
        elif session.last_info:
            ui_text.draw_wrapped(layout, context, session.last_info, icon="INFO")


def register():
    bpy.types.Scene.occnet_points_file = StringProperty(
        name="Point-Cloud File", subtype="FILE_PATH",
        description="Point cloud (.ply, .xyz, .txt, .pts, .csv, .npy, .npz, .obj)")
    bpy.types.Scene.occnet_image_file = StringProperty(name="Image File", subtype="FILE_PATH")
    bpy.types.Scene.occnet_image = PointerProperty(name="Image", type=bpy.types.Image)
    bpy.types.Scene.occnet_mask = PointerProperty(
        name="Mask", type=bpy.types.Image,
        description="The object's mask for the picture (white or opaque = object), of the picture's proportions")
    bpy.types.Scene.occnet_focal_length = FloatProperty(
        name="Focal Length", default=request_options.UNKNOWN_FOCAL_LENGTH, min=0.0,
        max=request_options.FOCAL_LENGTH_MAX, unit="CAMERA",
        description="35 mm equivalent focal length of the lens that took the picture (0: from the file's EXIF, "
                    "else 50 mm)")
    bpy.utils.register_class(OCCNET_PT_panel)


def unregister():
    bpy.utils.unregister_class(OCCNET_PT_panel)
    for name in ("occnet_points_file", "occnet_image_file", "occnet_image", "occnet_mask", "occnet_focal_length"):
        if hasattr(bpy.types.Scene, name):
            delattr(bpy.types.Scene, name)
