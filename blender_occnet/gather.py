"""Turn what the user chose in Blender (selected objects, image datablocks, files) into the arrays a
request sends: (N, 3) world-space points (float64 from files) with optional (N, 3) colours in
[0, 1], or (H, W, 4) pixels with row 0 at the top. Files are read by the backend (its readers know
LAS/LAZ, E57, PCD, ... and every picture format and bit depth; see Session.read_points and
Session.read_image). Shared by the operators and the batch command; raises InputProblem with a
sentence for the user."""

import os
from dataclasses import dataclass

import bpy
import numpy as np

from . import filetypes
from .client import BackendError

MESH_LIKE = {"MESH", "CURVE", "SURFACE", "FONT", "META"}
ATTRIBUTE_GEOMETRY = {"POINTCLOUD", "CURVES"}
MIN_POINTS = 3


class InputProblem(Exception):
    pass


def object_points(obj, depsgraph):
    """(world-space points (N, 3) float32, colours (N, 3) in [0, 1] or None) of one object,
    modifiers applied; None for types without points. Only vertices count: a mesh's faces add no
    points (a cube gives its 8 corners). Colours come from the active colour attribute on points."""
    ev = obj.evaluated_get(depsgraph)
    colours = None
    if obj.type in ATTRIBUTE_GEOMETRY:
        attr = ev.data.attributes.get("position")
        if attr is None:
            return np.zeros((0, 3), np.float32), None
        buf = np.empty(len(attr.data) * 3, np.float32)
        attr.data.foreach_get("vector", buf)
    elif obj.type in MESH_LIKE:
        me = ev.to_mesh()
        try:
            if me is None:
                return np.zeros((0, 3), np.float32), None
            buf = np.empty(len(me.vertices) * 3, np.float32)
            me.vertices.foreach_get("co", buf)
            colours = point_colours(me)
        finally:
            ev.to_mesh_clear()
    else:
        return None
    pts = buf.reshape(-1, 3).astype(np.float64)
    m = np.array(ev.matrix_world, dtype=np.float64)
    return (pts @ m[:3, :3].T + m[:3, 3]).astype(np.float32), colours


def point_colours(mesh):
    """(V, 3) float32 sRGB colours of a mesh's active colour attribute on points, or None."""
    attr = mesh.color_attributes.active_color
    if attr is None or attr.domain != "POINT" or len(attr.data) != len(mesh.vertices):
        return None
    buf = np.empty(len(attr.data) * 4, np.float32)
    attr.data.foreach_get("color_srgb", buf)
    return buf.reshape(-1, 4)[:, :3]


def selected_points(context):
    """Points of every selected object that has some, their colours ((N, 3) when every such object
    has colours, else None) and the names of those objects."""
    depsgraph = context.evaluated_depsgraph_get()
    chunks, colours, names, without = [], [], [], []
    for obj in context.selected_objects:
        found = object_points(obj, depsgraph)
        if found is not None and len(found[0]):
            chunks.append(found[0])
            colours.append(found[1])
            names.append(obj.name)
        else:
            without.append(f"{obj.name} ({obj.type.lower()})")
    if not chunks:
        skipped = f" ({', '.join(without)} has no vertices or points)" if without else ""
        raise InputProblem("Select mesh, point-cloud or curve objects with vertices "
                           f"(or choose a point-cloud file){skipped}")
    all_coloured = all(c is not None for c in colours)
    return np.concatenate(chunks), np.concatenate(colours) if all_coloured else None, names


def modelled(context):
    """Do the selected objects' points include modelled vertices (a curve's, or a mesh's with edges
    or faces) rather than only a scan's points (point-cloud objects, meshes of vertices alone, as
    Blender's PLY import makes them)? Modelled vertices are all kept: none is a stray point."""
    for obj in context.selected_objects:
        if obj.type in MESH_LIKE and (obj.type != "MESH" or len(obj.data.edges) or len(obj.data.polygons)):
            return True
    return False


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


def load_image_file(path, read_image):
    """(pixels (H, W, 4) float32, row 0 = top, 35 mm equivalent focal length from EXIF or None) of a
    picture file, read by read_image(path) -> dict (Session.read_image): the backend's reader, the
    same for the CLI, the batch and the add-on, leaving no datablock behind."""
    path = bpy.path.abspath(path)
    if not os.path.isfile(path):
        raise InputProblem(f"Image file {path!r} does not exist")
    try:
        picture = read_image(path)
    except BackendError as exc:
        raise InputProblem(exc.message) from None
    return picture["pixels"], picture["focal_length"]


def load_points_file(path, read_points):
    """(points (N, 3) float64, colours (N, 3) or None) of a point-cloud file, read by
    read_points(path) -> dict (Session.read_points)."""
    path = bpy.path.abspath(path)
    if not os.path.isfile(path):
        raise InputProblem(f"Point-cloud file {path!r} does not exist")
    try:
        cloud = read_points(path)
    except BackendError as exc:
        raise InputProblem(exc.message) from None
    return check_point_count(cloud["points"]), cloud["colors"]


@dataclass
class FileInput:
    """What one input file holds: kind "points" (data (N, 3), colours (N, 3) or None) or "image"
    (data (H, W, 4) pixels, focal_length from EXIF or None)."""
    kind: str
    data: np.ndarray
    colors: np.ndarray | None = None
    focal_length: float | None = None


def load_file(path, read_points, read_image):
    """The FileInput of an image or point-cloud file, by its extension."""
    if not os.path.isfile(path):
        raise InputProblem(f"{path} does not exist")
    kind = filetypes.input_kind(path)
    if kind is None:
        raise InputProblem(f"unsupported file type {os.path.splitext(path)[1]!r} "
                           f"(point clouds: {', '.join(filetypes.POINT_EXTENSIONS)}; "
                           f"images: {', '.join(filetypes.IMAGE_EXTENSIONS)})")
    if kind == "points":
        return FileInput(kind, *load_points_file(path, read_points))
    pixels, focal_length = load_image_file(path, read_image)
    return FileInput(kind, pixels, focal_length=focal_length)


def bbox_center(points):
    """(3,) float64 centre of the points' bounding box: where a result object's origin goes."""
    points = np.asarray(points, dtype=np.float64)
    return (points.min(axis=0) + points.max(axis=0)) * 0.5


def file_result_name(path):
    return os.path.splitext(os.path.basename(path))[0] + "_occnet"
