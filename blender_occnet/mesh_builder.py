"""Turn a backend result (numpy arrays) into a Blender mesh object, fast: ``foreach_set`` of
positions, corner vertices and face starts, one ``mesh.update()``; no Python loops over elements."""

import bpy
import numpy as np


class MeshDataError(ValueError):
    pass


def check_arrays(vertices, faces, normals=None, colors=None):
    """Validate shapes, dtypes and index ranges; returns contiguous float32/int32 arrays."""
    v = np.asarray(vertices)
    f = np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3:
        raise MeshDataError(f"vertices must have shape (V, 3), got {v.shape}")
    if f.ndim != 2 or f.shape[1] != 3:
        raise MeshDataError(f"faces must have shape (F, 3) triangles, got {f.shape}")
    if len(v) == 0 or len(f) == 0:
        raise MeshDataError("the reconstruction is empty (no surface at this threshold); "
                            "try another threshold or check the input")
    if f.dtype.kind not in "iu":
        raise MeshDataError(f"face indices must be integers, got {f.dtype}")
    v = np.ascontiguousarray(v, dtype=np.float32)
    if not np.isfinite(v).all():
        raise MeshDataError("the mesh has NaN or infinite vertex coordinates")
    lo, hi = int(f.min()), int(f.max())
    if lo < 0 or hi >= len(v):
        raise MeshDataError(f"face indices range over [{lo}, {hi}] but there are {len(v)} vertices")
    f = np.ascontiguousarray(f, dtype=np.int32)
    if normals is not None:
        normals = np.asarray(normals)
        if normals.shape != v.shape:
            raise MeshDataError(f"normals have shape {normals.shape}, vertices {v.shape}")
        normals = np.ascontiguousarray(normals, dtype=np.float32)
    if colors is not None:
        colors = np.asarray(colors, dtype=np.float32)
        if colors.ndim != 2 or colors.shape[0] != len(v) or colors.shape[1] not in (3, 4):
            raise MeshDataError(f"colors must have shape (V, 3|4), got {colors.shape}")
        if colors.shape[1] == 3:
            colors = np.concatenate([colors, np.ones((len(colors), 1), np.float32)], axis=1)
        colors = np.ascontiguousarray(np.clip(colors, 0.0, 1.0))
    return v, f, normals, colors


def _set_attribute(me, name, field, data, fallback_seq, fallback_field):
    attr = me.attributes.get(name)
    if attr is not None and len(attr.data) * (3 if field == "vector" else 1) == len(data):
        attr.data.foreach_set(field, data)
    else:  # older layouts: the per-element property does the same, slower
        fallback_seq.foreach_set(fallback_field, data)


def build_mesh(name, vertices, faces, normals=None, colors=None, use_custom_normals=False):
    """A new smooth-shaded triangle mesh datablock. On any failure nothing is left behind."""
    v, f, normals, colors = check_arrays(vertices, faces, normals, colors)
    me = bpy.data.meshes.new(name)
    try:
        me.vertices.add(len(v))
        me.loops.add(f.size)
        me.polygons.add(len(f))
        # The generic attribute API copies whole buffers (a memcpy); the older per-element
        # properties (vertices "co", loops "vertex_index") are ~100x slower for 1M faces.
        _set_attribute(me, "position", "vector", v.ravel(), me.vertices, "co")
        _set_attribute(me, ".corner_vert", "value", f.ravel(), me.loops, "vertex_index")
        me.polygons.foreach_set("loop_start", np.arange(0, f.size, 3, dtype=np.int32))
        me.update(calc_edges=True)
        # smooth shading: no "sharp_face" attribute means every face is smooth
        sharp = me.attributes.get("sharp_face")
        if sharp is not None:
            me.attributes.remove(sharp)
        if colors is not None:
            add_colours(me, colors)
        if normals is not None and use_custom_normals:
            me.normals_split_custom_set_from_vertices(normals)
    except BaseException:
        bpy.data.meshes.remove(me)
        raise
    return me


COLOUR_ATTRIBUTE = "Color"


def add_colours(me, colors):
    """Give a mesh a point colour attribute (V, 4 RGBA in [0, 1], sRGB as files and the backend
    give them; Blender keeps it linear) and a material whose Base Color reads it."""
    attr = me.color_attributes.new(COLOUR_ATTRIBUTE, "FLOAT_COLOR", "POINT")
    attr.data.foreach_set("color_srgb", colors.ravel())
    me.color_attributes.active_color = attr
    me.color_attributes.render_color_index = me.color_attributes.active_color_index
    me.materials.append(colour_material(f"{me.name} colours"))


def colour_material(name):
    """A new material: Color Attribute node (COLOUR_ATTRIBUTE) -> Principled BSDF Base Color."""
    material = bpy.data.materials.new(name)
    if not material.node_tree:  # Blender before 5.0 makes node trees on request
        material.use_nodes = True
    nodes = material.node_tree.nodes
    bsdf = next(n for n in nodes if n.bl_idname == "ShaderNodeBsdfPrincipled")
    source = nodes.new("ShaderNodeVertexColor")
    source.layer_name = COLOUR_ATTRIBUTE
    source.location = (bsdf.location.x - 300, bsdf.location.y)
    material.node_tree.links.new(source.outputs["Color"], bsdf.inputs["Base Color"])
    return material


def build_point_mesh(name, points, colors=None):
    """A mesh of vertices only (a point cloud Blender can select, show and reconstruct from again),
    with the colour attribute and material of add_colours when colors (N, 3|4) are given."""
    v = np.ascontiguousarray(points, dtype=np.float32)
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
        raise MeshDataError(f"points must have shape (N, 3), N > 0, got {v.shape}")
    if colors is not None:
        colors = check_arrays(v, np.zeros((1, 3), np.int32), None, colors)[3]
    me = bpy.data.meshes.new(name)
    try:
        me.vertices.add(len(v))
        _set_attribute(me, "position", "vector", v.ravel(), me.vertices, "co")
        me.update()
        if colors is not None:
            add_colours(me, colors)
    except BaseException:
        bpy.data.meshes.remove(me)
        raise
    return me


def add_object(context, name, mesh, location=(0.0, 0.0, 0.0), collection=None):
    """Link a new object for ``mesh`` into the active collection, make it the only selected object
    and the active one."""
    obj = bpy.data.objects.new(name, mesh)
    try:
        obj.location = location
        if collection is None:
            collection = context.view_layer.active_layer_collection.collection
        collection.objects.link(obj)
        for o in context.view_layer.objects:
            if o.select_get():
                o.select_set(False)
        obj.select_set(True)
        context.view_layer.objects.active = obj
    except BaseException:
        bpy.data.objects.remove(obj)
        raise
    return obj


def object_from_result(context, name, result, origin=None, location=None):
    """Build the object for a backend result. ``origin``: subtract it from the vertices and put the
    object there (point clouds: the result lands where the points were). ``location``: place the
    object there with vertices unchanged (images: the 3D cursor)."""
    verts = np.asarray(result["vertices"], dtype=np.float64)  # point clouds: float64 survey coordinates
    loc = (0.0, 0.0, 0.0)
    if origin is not None:
        # Blender keeps the location in float32: measure the vertices from that very point, in
        # float64, so a survey 10^6 m away keeps its millimetres in the mesh's own coordinates
        origin = np.asarray(origin, dtype=np.float32).astype(np.float64)
        verts = verts - origin
        loc = tuple(float(x) for x in origin)
    elif location is not None:
        loc = tuple(float(x) for x in location)
    normals = result.get("normals")
    mesh = build_mesh(name, verts, result["faces"], normals, result.get("colors"),
                      use_custom_normals=normals is not None)
    try:
        return add_object(context, name, mesh, loc)
    except BaseException:
        bpy.data.meshes.remove(mesh)
        raise
