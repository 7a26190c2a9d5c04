"""Turn what the user chose in Blender (selected objects, image datablocks, files) into the arrays a
request sends: (N, 3) float32 world-space points, or (H, W, 4) uint8 pixels with row 0 at the top.
Shared by the operators and the batch command; raises InputProblem with a sentence for the user."""

import os

import bpy
import numpy as np

from . import pointio

MESH_LIKE = {"MESH", "CURVE", "SURFACE", "FONT", "META"}
ATTRIBUTE_GEOMETRY = {"POINTCLOUD", "CURVES"}
MIN_POINTS = 3


class InputProblem(Exception):
    pass


def object_points(obj, depsgraph):
    """World-space points of one object, modifiers applied; None for types without points.
    Only vertices count: a mesh's faces add no points (a cube gives its 8 corners)."""
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
    """Points of every selected object that has some, and the names of those objects."""
    depsgraph = context.evaluated_depsgraph_get()
    chunks, names, without = [], [], []
    for obj in context.selected_objects:
        pts = object_points(obj, depsgraph)
        if pts is not None and len(pts):
            chunks.append(pts)
            names.append(obj.name)
        else:
            without.append(f"{obj.name} ({obj.type.lower()})")
    if not chunks:
        skipped = f" ({', '.join(without)} has no vertices or points)" if without else ""
        raise InputProblem("Select mesh, point-cloud or curve objects with vertices "
                           f"(or choose a point-cloud file){skipped}")
    return np.concatenate(chunks), names


def check_point_count(points):
    if len(points) < MIN_POINTS:
        raise InputProblem(f"A point cloud needs at least {MIN_POINTS} points, got {len(points)}")
    return points


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
        return check_point_count(pointio.load_points(bpy.path.abspath(path)))
    except pointio.PointFileError as exc:
        raise InputProblem(str(exc)) from None


def load_file(path):
    """(kind, array) for an image or point-cloud file, by its extension."""
    if not os.path.isfile(path):
        raise InputProblem(f"{path} does not exist")
    kind = pointio.input_kind(path)
    if kind is None:
        raise InputProblem(f"unsupported file type {os.path.splitext(path)[1]!r} "
                           f"(point clouds: {', '.join(pointio.POINT_EXTENSIONS)}; "
                           f"images: {', '.join(pointio.IMAGE_EXTENSIONS)})")
    if kind == "points":
        return kind, load_points_file(path)
    return kind, load_image_file(path)


def file_result_name(path):
    return os.path.splitext(os.path.basename(path))[0] + "_occnet"
