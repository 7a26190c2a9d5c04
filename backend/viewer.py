"""From a picture to a viewer-centred model's input, the mask law, and the result's placement.

Pure functions around backend.camera: the pipeline calls them in order (photo_camera ->
viewer_input -> mask law during extraction -> output_transform).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import camera
from .foreground import Mask
from .preprocess import over_background, premultiply, resample

# 35 mm film's diagonal in millimetres: a "35 mm equivalent" focal length is relative to it.
FULL_FRAME_DIAGONAL_MM = math.hypot(36.0, 24.0)
DEFAULT_FOCAL_35MM = 50.0
# The mask law tests points against the crop's mask at this many times the model's input size.
MASK_SUPERSAMPLING = 4
# Logit given to points outside the mask: certainly empty, and finite for marching cubes.
OUTSIDE_LOGIT = -20.0
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


def ray_maxima(values: np.ndarray, box_min: float, spacing: float, size: int, focal: float) -> np.ndarray:
    """(size, size) float32: for each pixel of a size x size crop image, the largest of the grid
    values (R+1, R+1, R+1) (viewer points box_min + spacing * index) that project into it; -inf
    where none does. Along each pixel's ray, the grid's best guess that the object is there.
    One slab of constant x at a time, so memory stays at a slab's (R+1)^2 points even at 512^3."""
    count = values.shape[0]
    axis = np.arange(count, dtype=np.float64) * spacing + box_min
    y, z = (a.ravel() for a in np.meshgrid(axis, axis, indexing="ij"))
    maxima = torch.full((size * size,), -math.inf)
    for i, x in enumerate(axis):
        uv, depth = camera.project_viewer(np.stack([np.full_like(y, x), y, z], axis=-1), size, focal)
        col, row = np.rint(uv[:, 0]).astype(np.int64), np.rint(uv[:, 1]).astype(np.int64)
        valid = (depth > 0) & (col >= 0) & (col < size) & (row >= 0) & (row < size)
        maxima.scatter_reduce_(0, torch.from_numpy(row[valid] * size + col[valid]),
                               torch.from_numpy(values[i].reshape(-1)[valid]).float(), reduce="amax")
    return maxima.reshape(size, size).numpy()


def silhouette_level(values: np.ndarray, box_min: float, spacing: float, mask: np.ndarray, focal: float,
                     level: float, coverage: float, floor: float) -> float:
    """The surface level for a viewer grid (values (R+1,)^3) whose object must fill the crop's
    mask (M, M) bool: the requested level, lowered where needed (never below floor) until the rays
    through `coverage` of the mask's pixels reach inside. The mask says the object is seen there,
    so a ray through it that stays empty is the network's doubt, not the picture's.
    Pixels are taken at half the grid's resolution, so each holds a few grid points' projections."""
    size = max(8, (values.shape[0] - 1) // 2)
    block = mask.shape[0] // size
    coarse = mask[: size * block, : size * block].reshape(size, block, size, block).mean(axis=(1, 3)) >= 0.5
    if not coarse.any():
        return level
    along_rays = ray_maxima(values, box_min, spacing, size, focal)[coarse]
    along_rays = along_rays[np.isfinite(along_rays)]
    if len(along_rays) == 0:
        return level
    # one float32 step under the quantile's own ray maximum (the grid's precision), so that its
    # ray counts as reaching inside
    quantile = np.float32(np.quantile(along_rays, 1.0 - coverage, method="lower"))
    needed = float(np.nextafter(quantile, np.float32(-np.inf)))
    return max(min(level, needed), floor)


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
