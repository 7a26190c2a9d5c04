"""Turning a validated input into what a model expects. Pure functions, shared by inference and
training so both see inputs prepared the same way."""

import numpy as np
from PIL import Image


def composite_on_background(rgba: np.ndarray, background: float | np.ndarray = 1.0) -> np.ndarray:
    """(H, W, 4) float RGBA -> (H, W, 3) RGB over a plain background (white by default)."""
    alpha = rgba[..., 3:4]
    return rgba[..., :3] * alpha + np.asarray(background, np.float32) * (1.0 - alpha)


def square_crop_box(alpha: np.ndarray, margin: float = 0.08) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a square around the object in a mask (H, W), with margin as a
    fraction of its size; the whole image's centred square when the mask covers everything."""
    h, w = alpha.shape
    ys, xs = np.nonzero(alpha > 0.5)
    if len(xs) == 0 or (xs.min() == 0 and ys.min() == 0 and xs.max() == w - 1 and ys.max() == h - 1):
        side = min(h, w)
        left, top = (w - side) // 2, (h - side) // 2
        return left, top, left + side, top + side
    cx, cy = (xs.min() + xs.max() + 1) / 2.0, (ys.min() + ys.max() + 1) / 2.0
    side = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) * (1.0 + 2.0 * margin)
    return (int(round(cx - side / 2)), int(round(cy - side / 2)),
            int(round(cx + side / 2)), int(round(cy + side / 2)))


def image_to_model_input(rgba: np.ndarray, size: int, background=(1.0, 1.0, 1.0),
                         crop_to_object: bool = True) -> np.ndarray:
    """(H, W, 4) float RGBA in [0, 1] -> (3, size, size) float32 RGB: object cropped to a square
    (using alpha as the mask), composited on the background colour (3,) in [0, 1] (white at
    inference; training varies it), resized with antialiasing."""
    background = np.asarray(background, dtype=np.float32)
    rgb = composite_on_background(rgba, background)
    box = square_crop_box(rgba[..., 3]) if crop_to_object else square_crop_box(np.ones(rgba.shape[:2]))
    img = Image.fromarray((rgb * 255.0 + 0.5).astype(np.uint8))
    # crop() pads with black outside the image: paste onto the background instead.
    left, top, right, bottom = box
    fill = tuple(int(v) for v in (background * 255.0 + 0.5).astype(np.uint8))
    canvas = Image.new("RGB", (right - left, bottom - top), fill)
    canvas.paste(img, (-left, -top))
    canvas = canvas.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(canvas, np.float32).transpose(2, 0, 1) / 255.0


# Cells per side of the finest grid that evens out a scan's density for the encoder's subsample.
COVERAGE_CELLS = 256


def bounding_box(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lowest (D,), highest (D,)) corners of points (N, D), in their dtype. Column by column:
    numpy's min and max along the long axis of an (N, 3) array take 20 to 40 times as long (at 3
    million points 0.18 s against 0.007 s for both), and a large scan passes here several times."""
    columns = range(points.shape[1])
    return np.array([points[:, axis].min() for axis in columns]), np.array([points[:, axis].max() for axis in columns])


def grid_cells(points: np.ndarray, cells: int) -> np.ndarray:
    """(N, 3) int64 cell coordinates of the points (N, 3) in a cells^3 grid over their bounding box."""
    lo, hi = bounding_box(points)
    extent = max(float((hi - lo).max()), 1e-30)
    return np.minimum(((points - lo) * (cells / extent)).astype(np.int64), cells - 1)


def cell_keys(coordinates: np.ndarray, cells: int) -> np.ndarray:
    """(N,) int64 key of each cell coordinate (N, 3) of a cells^3 grid."""
    return (coordinates[:, 0] * cells + coordinates[:, 1]) * cells + coordinates[:, 2]


# first_of_each tables the range where there are at least 1 / DENSE_KEYS keys per value in it
DENSE_KEYS = 8


def first_of_each(keys: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct keys in increasing order (K,), the index of each one's first occurrence (K,))
    of keys (N,) in [0, size): np.unique(keys, return_index=True). Where the keys are many for
    their range, a table of the range instead of a sort (a scan of 3 million points into 256^3
    cells: 0.11 s instead of 0.46 s)."""
    if len(keys) * DENSE_KEYS < size or len(keys) >= np.iinfo(np.int32).max:
        return np.unique(keys, return_index=True)
    first = np.full(size, len(keys), np.int32)
    np.minimum.at(first, keys, np.arange(len(keys), dtype=np.int32))
    distinct = np.flatnonzero(first < len(keys))
    return distinct, first[distinct].astype(np.int64)


def covering_indices(points: np.ndarray, max_points: int, cells: int = COVERAGE_CELLS) -> np.ndarray:
    """Indices (M <= max_points,) of one point in every occupied cell of the finest grid
    (cells, cells / 2, cells / 4, ... per side) whose occupied cells number at most max_points.
    One pass over N keys; the coarser grids sort only the occupied fine cells."""
    fine = grid_cells(points, cells)
    _, first = first_of_each(cell_keys(fine, cells), cells ** 3)
    fine = fine[first]
    step = 1
    while True:
        side = -(-cells // step)
        _, representative = np.unique(cell_keys(fine // step, side), return_index=True)
        if len(representative) <= max_points:
            return np.sort(first[representative])
        step *= 2


def subsample_indices(points: np.ndarray, max_points: int, seed: int = 0) -> np.ndarray:
    """(N, 3) -> sorted indices (min(N, max_points),) of a deterministic subset that covers the
    whole cloud (so that per-point normals or colours can follow the points).

    A scan is dense near the scanner and sparse far away; a plain random subset would spend the
    encoder's points where the scan was dense and leave far parts with a handful. So one point per
    occupied cell of the finest grid that allows it comes first (covering_indices), and random
    other points fill up the rest, so the encoder still sees max_points points."""
    if max_points < 1:   # covering_indices would coarsen its grid forever
        raise ValueError(f"a subset needs at least one point, asked for {max_points}")
    if len(points) <= max_points:
        return np.arange(len(points))
    covering = covering_indices(points, max_points)
    others = np.ones(len(points), bool)
    others[covering] = False
    fill = np.random.default_rng(seed).choice(np.flatnonzero(others), max_points - len(covering), replace=False)
    return np.sort(np.concatenate([covering, fill]))


def subsample_points(points: np.ndarray, max_points: int, seed: int = 0) -> np.ndarray:
    """(N, 3) -> (min(N, max_points), 3): the points of subsample_indices."""
    return points if len(points) <= max_points else points[subsample_indices(points, max_points, seed)]


def premultiply(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) straight RGBA -> premultiplied, so that resampling never bleeds the hidden colour
    of transparent pixels into the object's rim."""
    return np.concatenate([rgba[..., :3] * rgba[..., 3:4], rgba[..., 3:4]], axis=-1)


def resample(image: np.ndarray, source_uv: np.ndarray, supersample: int = 2) -> np.ndarray:
    """(H, W, C) float image sampled at the pixel coordinates source_uv (S, S, 2) = (u, v) of each
    output pixel's centre (backend.camera's convention) -> (S, S, C) float32. Bilinear at
    supersample x supersample points per output pixel, averaged (antialiasing for moderate
    downscales); zero outside the image."""
    from scipy.ndimage import map_coordinates

    size = source_uv.shape[0]
    if supersample > 1:
        # Sub-pixel offsets inside each output pixel, from the local Jacobian of the mapping.
        du = np.gradient(source_uv, axis=1)
        dv = np.gradient(source_uv, axis=0)
        offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
        samples = [source_uv + a * du + b * dv for b in offsets for a in offsets]
    else:
        samples = [source_uv]
    out = np.zeros((size, size, image.shape[2]), np.float64)
    for uv in samples:
        coords = np.stack([uv[..., 1].ravel(), uv[..., 0].ravel()])
        for k in range(image.shape[2]):
            out[..., k] += map_coordinates(image[..., k], coords, order=1, mode="constant", cval=0.0).reshape(size, size)
    return np.clip(out / len(samples), 0.0, 1.0).astype(np.float32)


def over_background(premultiplied: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(S, S, 4) premultiplied RGBA over (S, S, 3) or (3,) background -> (3, S, S) float32 RGB."""
    rgb = premultiplied[..., :3] + np.asarray(background, np.float32) * (1.0 - premultiplied[..., 3:4])
    return np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
