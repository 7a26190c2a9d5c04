"""From a picture to a viewer-centred model's input, the mask law, and the result's placement.

Pure functions around backend.camera: the pipeline calls them in order (photo_camera ->
viewer_input -> mask law during extraction -> output_transform).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import camera
from .foreground import Mask
from .sampling import sample_triangles
from .preprocess import over_background, premultiply, resample

# 35 mm film's diagonal in millimetres: a "35 mm equivalent" focal length is relative to it.
FULL_FRAME_DIAGONAL_MM = math.hypot(36.0, 24.0)
DEFAULT_FOCAL_35MM = 50.0
# The mask law tests points against the crop's mask at this many times the model's input size.
MASK_SUPERSAMPLING = 4
# Logit given to points outside the mask: certainly empty, and finite for marching cubes.
OUTSIDE_LOGIT = -20.0
# How steeply, in logits per grid cell, follow_the_outline makes the values cross the outline.
OUTLINE_SLOPE = 1.0
# fill_the_mask raises the doubtful rays' likeliest points this far above the level, in logits,
# those within FILL_BAND of the ray's largest value. Chosen on 16 classic renders at 128^3 against
# margins 0.1 to 1 and bands 0.3 to 1 (docs: README, model card).
FILL_MARGIN = 0.25
FILL_BAND = 0.3
# Inputs are composited on white, as validation images are.
BACKGROUND = np.ones(3, np.float32)


def photo_camera(height: int, width: int, focal_35mm: float | None = None) -> np.ndarray:
    """(3, 3) intrinsics of a picture (H, W) taken with the given 35 mm equivalent focal length
    (measured on the diagonal, as cameras report it; a 50 mm normal lens when unknown), principal
    point at the picture's centre."""
    focal_px = (focal_35mm or DEFAULT_FOCAL_35MM) * math.hypot(height, width) / FULL_FRAME_DIAGONAL_MM
    return np.array([[focal_px, 0.0, (width - 1) / 2.0], [0.0, focal_px, (height - 1) / 2.0], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class ViewerInput:
    image: np.ndarray        # (3, S, S) float32: the model's input
    mask: np.ndarray         # (M, M) bool: the crop's mask at MASK_SUPERSAMPLING x S
    crop: camera.CropCamera  # the crop's camera: its rotation and focal length


def viewer_input(rgba: np.ndarray, mask: Mask, camera_mat: np.ndarray, size: int) -> ViewerInput:
    """rgba (H, W, 4) in [0, 1] with the object's mask -> the model's crop, exactly as training
    makes it from a render (training.dataset.viewer_view), and the crop's mask for the mask law."""
    box = camera.crop_box(mask.mask)
    crop = camera.crop_camera(camera_mat, box)
    straight = np.concatenate([rgba[..., :3], mask.mask[..., None].astype(np.float32)], axis=-1)
    pixels = resample(premultiply(straight), camera.crop_source_pixels(camera_mat, crop, size))
    mask_size = MASK_SUPERSAMPLING * size
    fine = resample(mask.mask[..., None].astype(np.float32), camera.crop_source_pixels(camera_mat, crop, mask_size),
                    supersample=1)[..., 0] > 0.5
    return ViewerInput(over_background(pixels, BACKGROUND), fine, crop)


def inside_mask(points: torch.Tensor, mask: torch.Tensor, focal: float) -> torch.Tensor:
    """(M,) bool: which viewer points (M, 3) project into the crop mask (R, R) bool, through the
    crop camera of focal length `focal` (a fraction of the width). Points behind the camera are out."""
    size = mask.shape[0]
    depth = points[:, 2] + camera.object_depth(focal)
    safe = depth.clamp(min=1e-6)
    uv = focal * size * points[:, :2] / safe[:, None] + (size - 1) / 2.0
    col, row = uv[:, 0].round().long(), uv[:, 1].round().long()
    valid = (depth > 1e-6) & (col >= 0) & (col < size) & (row >= 0) & (row < size)
    inside = torch.zeros(len(points), dtype=torch.bool, device=points.device)
    inside[valid] = mask[row[valid], col[valid]]
    return inside


def masked_logits(decode, points: torch.Tensor, mask: torch.Tensor, focal: float) -> torch.Tensor:
    """The mask law: logits (M,) of viewer points (M, 3), decode(points (K, 3)) -> (K,) for those
    inside the mask and OUTSIDE_LOGIT for the rest, whatever the network would say there."""
    inside = inside_mask(points, mask, focal)
    logits = torch.full((len(points),), OUTSIDE_LOGIT, dtype=points.dtype, device=points.device)
    if inside.any():
        logits[inside] = decode(points[inside]).to(points.dtype)
    return logits


# visible_vertices: a depth buffer of this many cells across the crop, how far behind a cell's
# nearest surface a vertex still counts as seen (the depth a surface spans within one cell at a
# slant), and how many points on the triangles fill the buffer (a few per cell of any surface).
VISIBILITY_CELLS = 64
VISIBILITY_TOLERANCE = 0.06
OCCLUDER_SAMPLES = 200_000
# matched_to_picture: the most a picture's light may brighten a texture head's colour channel.
MAX_LIGHT_GAIN = 4.0


class MirrorAveraged:
    """A viewer-centred image model asked twice, about the picture and about its mirror image (left
    and right swapped), the second answer mirrored back: its logits, colours and up direction are
    the means of the two. The network saw every object from every side, so both answers are
    guesses of the same quality and their mean is a better one (40 validation shapes at 64^3:
    IoU 0.264 -> 0.271, Chamfer-L1 x10 0.613 -> 0.609, NC 0.650 -> 0.658, F-score 0.214 -> 0.222),
    and a picture and its mirror image give mirrored results. Everything else is the model's."""

    MIRROR = (-1.0, 1.0, 1.0)   # the viewer frame's x is the picture's left to right

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def _mirror(self, p: torch.Tensor) -> torch.Tensor:
        return p * p.new_tensor(self.MIRROR)

    def encode(self, images: torch.Tensor, focal: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        """images (B, 3, S, S), focal (B,), mask (B, R, R) -> {"picture", "mirrored": the model's
        codes, "up": (B, 3) the mean up direction}."""
        code = self.model.encode(images, focal, mask)
        mirrored = self.model.encode(images.flip(-1), focal, None if mask is None else mask.flip(-1))
        up = F.normalize(code["up"] + self._mirror(mirrored["up"]), dim=1)
        return {"picture": code, "mirrored": mirrored, "up": up}

    def decode(self, p: torch.Tensor, c: dict) -> torch.Tensor:
        """Viewer points p (B, M, 3) -> the mean of the two logits (B, M)."""
        return 0.5 * (self.model.decode(p, c["picture"]) + self.model.decode(self._mirror(p), c["mirrored"]))

    def decode_colour(self, p: torch.Tensor, c: dict) -> torch.Tensor:
        """Viewer points p (B, M, 3) -> the mean of the two colours (B, M, 3)."""
        return 0.5 * (self.model.decode_colour(p, c["picture"]) + self.model.decode_colour(self._mirror(p), c["mirrored"]))


def depth_slices(count: int, box_min: float, spacing: float, size: int, focal: float):
    """Yields (k, cols (count,), rows (count,), depth): where the grid's viewer points of depth index
    k (box_min + spacing * index, count per axis) land in a size x size crop image: point (i, j, k)
    at column cols[i] and row rows[j], both increasing; depth is the slice's camera depth. The camera looks along z, so a slice of
    constant depth projects by one scale per axis, and a whole slice is two 1D projections."""
    axis = np.arange(count, dtype=np.float64) * spacing + box_min
    zero = np.zeros(count)
    for k, z in enumerate(axis):
        depth = np.full(count, z)
        along_x, camera_depth = camera.project_viewer(np.stack([axis, zero, depth], axis=-1), size, focal)
        rows = camera.project_viewer(np.stack([zero, axis, depth], axis=-1), size, focal)[0][:, 1]
        yield k, along_x[:, 0], rows, float(camera_depth[0])


def pixel_runs(coordinates: np.ndarray, size: int) -> tuple[slice, np.ndarray, np.ndarray]:
    """For increasing pixel coordinates (N,) of a size-pixel axis: the slice of those that land in
    the image, the starts (R,) of the runs among them that round to the same pixel (offsets within
    the slice), and those runs' pixels (R,)."""
    pixels = np.rint(coordinates).astype(np.int64)
    inside = np.nonzero((pixels >= 0) & (pixels < size))[0]
    if len(inside) == 0:
        return slice(0, 0), np.zeros(0, np.int64), np.zeros(0, np.int64)
    kept = pixels[inside[0]: inside[-1] + 1]
    starts = np.flatnonzero(np.r_[True, np.diff(kept) != 0])
    return slice(inside[0], inside[-1] + 1), starts, kept[starts]


def ray_maxima(values: np.ndarray, box_min: float, spacing: float, size: int, focal: float) -> np.ndarray:
    """(size, size) float32: for each pixel of a size x size crop image, the largest of the grid
    values (R+1, R+1, R+1) (viewer points box_min + spacing * index) that project into it; -inf
    where none does. Along each pixel's ray, the grid's best guess that the object is there."""
    maxima = np.full((size, size), -np.inf, np.float32)
    for k, cols, rows, _ in depth_slices(values.shape[0], box_min, spacing, size, focal):
        (x, col_starts, col_pixels), (y, row_starts, row_pixels) = pixel_runs(cols, size), pixel_runs(rows, size)
        if len(col_pixels) == 0 or len(row_pixels) == 0:
            continue
        plane = values[x, y, k]                                                   # (X, Y)
        runs = np.maximum.reduceat(np.maximum.reduceat(plane, col_starts, axis=0), row_starts, axis=1)
        where = np.ix_(row_pixels, col_pixels)
        maxima[where] = np.maximum(maxima[where], runs.T)
    return maxima


def mask_signed_distance(mask: np.ndarray) -> np.ndarray:
    """(M, M) float32 signed distance in pixels to the outline of mask (M, M) bool: positive inside,
    zero half way between an inside and an outside pixel's centres, as the mask law draws it."""
    from scipy.ndimage import distance_transform_edt

    inside = distance_transform_edt(mask) - 0.5
    outside = distance_transform_edt(~mask) - 0.5
    return np.where(mask, inside, -outside).astype(np.float32)


def bilinear_outer(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(R, C): image (H, W) sampled bilinearly at every (rows[r], cols[c]), clamped to its border."""
    def weights(coordinates, length):
        clamped = np.clip(coordinates, 0.0, length - 1.0)
        low = np.minimum(np.floor(clamped).astype(np.int64), length - 2)
        return low, clamped - low

    top, down = weights(rows, image.shape[0])
    left, right = weights(cols, image.shape[1])
    across = image[top] * (1.0 - down[:, None]) + image[top + 1] * down[:, None]       # (R, W)
    return across[:, left] * (1.0 - right) + across[:, left + 1] * right


def follow_the_outline(values: np.ndarray, box_min: float, spacing: float, mask: np.ndarray, focal: float,
                       level: float, slope: float = OUTLINE_SLOPE) -> None:
    """In place: the grid's values (R+1,)^3 (viewer points box_min + spacing * index) crossing
    `level` where their rays cross the outline of the crop's mask (M, M), so the mesh's silhouette
    follows the picture's outline to a fraction of a mask pixel rather than to a grid cell (the
    mask law alone puts a certain-empty point next to each inside one, and marching cubes then cuts
    the outline short by up to a cell). A point outside the mask gets level + slope times its
    distance to the outline in grid cells (negative); inside, the network's value is capped at
    level + slope times that distance, so only values within a few cells of the outline change."""
    size = mask.shape[0]
    distance = mask_signed_distance(mask)
    for k, cols, rows, depth in depth_slices(values.shape[0], box_min, spacing, size, focal):
        cells = bilinear_outer(distance, rows, cols).T * (depth / (focal * size * spacing))   # (X, Y)
        field = level + slope * cells
        plane = values[:, :, k]
        plane[...] = np.where(cells < 0, field, np.minimum(plane, field))


def fill_the_mask(values: np.ndarray, box_min: float, spacing: float, mask: np.ndarray, focal: float,
                  level: float, margin: float = FILL_MARGIN, band: float = FILL_BAND) -> float:
    """In place: every ray through the crop's mask (M, M) bool reaches inside the grid's values
    (R+1,)^3 (viewer points box_min + spacing * index). The mask says the object is seen on that
    ray, so one that stays below level is the network's doubt, not the picture's: its points within
    `band` of the ray's largest value are raised to level + margin, so the surface goes where the
    network thinks the object most likely is on that ray. Rays are taken per pixel of a crop image
    at the grid's resolution that the mask half covers. Returns the fraction of those rays filled."""
    size = min(values.shape[0] - 1, mask.shape[0])
    block = mask.shape[0] // size
    seen = mask[: size * block, : size * block].reshape(size, block, size, block).mean(axis=(1, 3)) >= 0.5
    maxima = ray_maxima(values, box_min, spacing, size, focal)
    seen &= np.isfinite(maxima)
    doubtful = seen & (maxima < level)
    if not doubtful.any():
        return 0.0
    target = np.float32(level + margin)
    for k, cols, rows, _ in depth_slices(values.shape[0], box_min, spacing, size, focal):
        (x, col_starts, col_pixels), (y, row_starts, row_pixels) = pixel_runs(cols, size), pixel_runs(rows, size)
        if len(col_pixels) == 0 or len(row_pixels) == 0:
            continue
        # each kept point's pixel: runs repeated over their lengths
        point_cols = np.repeat(col_pixels, np.diff(np.r_[col_starts, x.stop - x.start]))
        point_rows = np.repeat(row_pixels, np.diff(np.r_[row_starts, y.stop - y.start]))
        where = np.ix_(point_rows, point_cols)
        plane = values[x, y, k]                                                   # (X, Y) view
        raised = doubtful[where].T & (plane >= maxima[where].T - band)
        plane[raised] = target
    return float(doubtful.sum() / max(int(seen.sum()), 1))


def visible_vertices(vertices: np.ndarray, faces: np.ndarray, focal: float, cells: int = VISIBILITY_CELLS,
                     tolerance: float = VISIBILITY_TOLERANCE) -> np.ndarray:
    """(V,) bool: which vertices (V, 3) of a mesh with faces (F, 3), in the viewer frame, the crop
    camera of focal length `focal` sees: those within `tolerance` (viewer units) of the nearest
    surface in their cell of a cells x cells depth buffer over the crop. The buffer holds the
    vertices and OCCLUDER_SAMPLES points spread over the triangles by area, so that the large flat
    triangles of a decimated mesh hide what lies behind them too."""
    vertices = np.asarray(vertices, np.float64)
    occluders = [vertices]
    if len(faces):
        try:
            occluders.append(sample_triangles(np.random.default_rng(0), vertices, faces, OCCLUDER_SAMPLES)[0])
        except ValueError:   # only degenerate triangles: the vertices are all there is
            pass

    def cells_of(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        uv, depth = camera.project_viewer(points, cells, focal)
        col, row = np.clip(np.floor(uv + 0.5).astype(np.int64), 0, cells - 1).T
        return row * cells + col, depth

    nearest = np.full(cells * cells, np.inf)
    cell, depth = cells_of(np.concatenate(occluders))
    np.minimum.at(nearest, cell, depth)
    cell, depth = cells_of(vertices)
    return depth <= nearest[cell] + tolerance


def matched_to_picture(head: np.ndarray, picture: np.ndarray) -> np.ndarray:
    """(3,) per-channel gains that bring a texture head's colours (N, 3) closest, in least
    squares, to the picture's (N, 3) at the same N surface points the picture shows: the head
    guesses a surface's own colour, the picture shows it lit, and the gains carry that light over
    to what the picture hides. At most MAX_LIGHT_GAIN, so that a channel the head leaves nearly
    dark is not blown up; 1 for one it leaves black."""
    energy = (head * head).sum(axis=0)
    gains = np.where(energy > 0.0, (head * picture).sum(axis=0) / np.maximum(energy, 1e-30), 1.0)
    return np.minimum(gains, MAX_LIGHT_GAIN)


def picture_where_shown(head: np.ndarray, picture: np.ndarray, shown: np.ndarray) -> np.ndarray:
    """(N, 3) colours of N surface points: the picture's (S, 3) at the S points it shows (shown
    (N,) bool), the texture head's (N, 3) lit like the picture (matched_to_picture) elsewhere."""
    out = np.clip(head * matched_to_picture(head[shown], picture), 0.0, 1.0)
    out[shown] = picture
    return out


def picture_colours(rgba: np.ndarray, mask: np.ndarray, camera_mat: np.ndarray, crop: camera.CropCamera,
                    points: np.ndarray) -> np.ndarray:
    """(N, 4) float32 RGBA (alpha 1), the picture's colour where each viewer point (N, 3) projects:
    the colour the picture shows on that point's ray, its own if nothing hides it. rgba (H, W, 4)
    in [0, 1], mask (H, W) bool: background pixels take the nearest object pixel's colour first, so
    the outline does not bleed the background into the mesh."""
    from scipy.ndimage import distance_transform_edt, map_coordinates

    uv = camera.source_pixels_of_viewer_points(points, camera_mat, crop)
    height, width = mask.shape
    left, top = (np.floor(uv.min(axis=0)).astype(int) - 2).clip(0, [width - 1, height - 1])
    right, bottom = (np.ceil(uv.max(axis=0)).astype(int) + 3).clip(1, [width, height])
    region = mask[top:bottom, left:right]
    rgb = rgba[top:bottom, left:right, :3]
    if region.any() and not region.all():
        _, (rows, cols) = distance_transform_edt(~region, return_indices=True)
        rgb = rgb[rows, cols]
    coords = np.stack([uv[:, 1] - top, uv[:, 0] - left])
    colours = np.stack([map_coordinates(rgb[..., k], coords, order=1, mode="nearest") for k in range(3)], axis=1)
    return np.concatenate([colours.clip(0.0, 1.0), np.ones((len(points), 1))], axis=1).astype(np.float32)


def output_transform(up: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """(4, 4) rigid map from the viewer frame to the returned mesh's frame: Blender's axes with the
    picture seen from the Front view (backend.camera.blender_from_viewer), the object resting on
    z = 0 and centred on x = y = 0. vertices (V, 3): the mesh in the viewer frame."""
    rotation = camera.blender_from_viewer(up)
    rotated = vertices @ rotation.T
    low, high = rotated.min(axis=0), rotated.max(axis=0)
    transform = np.eye(4)
    transform[:3, :3] = rotation
    transform[:3, 3] = -np.array([(low[0] + high[0]) / 2.0, (low[1] + high[1]) / 2.0, low[2]])
    return transform
