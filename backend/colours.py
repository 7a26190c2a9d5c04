"""Vertex colours for a reconstructed mesh from the colours of the input points.

Each vertex takes the inverse-distance-weighted mean colour of its k nearest input points. A scan
of millions of points is first averaged per cell of a fine grid (transfer_cells), so the search
tree stays small (memory bounded by the grid, not the scan) while the colour detail stays finer
than the mesh's own: DETAIL_PER_GRID_CELL cells per cell of the grid the mesh was extracted on."""

from typing import Callable

import numpy as np

from .errors import Cancelled
from .extraction.nearest import NearestPoints
from .preprocess import bounding_box, cell_keys, grid_cells

NEIGHBOURS = 8
# 4 colour cells per extraction cell: 3 million points of a textured bunny at 128^3 keep 0.26 dB
# less colour PSNR at their vertices than with 8 (1024 cells), in 1.1 s less (docs/performance.md).
DETAIL_PER_GRID_CELL = 4
MAX_TRANSFER_CELLS = 1024
# cell_means averages about this many points at a time (a tenth of a second on 2 cores), so a
# cancel lands between them.
CHUNK_POINTS = 500_000
# Distances below this fraction of the cloud's extent count as this much (a vertex on a point
# would otherwise get an infinite weight).
MIN_DISTANCE = 1e-6


def transfer_cells(resolution: int) -> int:
    """Cells per side of the averaging grid for a mesh extracted at resolution^3."""
    return min(MAX_TRANSFER_CELLS, DETAIL_PER_GRID_CELL * resolution)


def cell_means(points: np.ndarray, colors: np.ndarray, cells: int,
               should_cancel: Callable[[], bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(M, 3) mean positions and (M, 3) mean colours of the points (N, 3) and colours (N, 3) in
    each occupied cell of a cells^3 grid over the points' bounding box (M <= N), in the order of
    the cells' keys. The points are averaged in slabs of whole layers of cells, about CHUNK_POINTS
    at a time, checking should_cancel() before each (raising Cancelled): at millions of points one
    pass takes over a second. A slab's cells are its own and follow the previous slab's, and a
    stable sort keeps each cell's points in their order, so the means are those of one pass, bit
    for bit."""
    keys = cell_keys(grid_cells(points, cells), cells)
    slabs = int(min(cells, -(-len(points) // CHUNK_POINTS)))
    layer = keys // (cells * cells)
    slab = (layer * slabs // cells).astype(np.uint16)
    order = np.argsort(slab, kind="stable")               # a radix sort: 16-bit keys
    ends = np.searchsorted(slab[order], np.arange(1, slabs + 1))
    centres, means = [], []
    for start, end in zip(np.concatenate([[0], ends[:-1]]), ends):
        if should_cancel is not None and should_cancel():
            raise Cancelled()
        rows = order[start:end]
        if not len(rows):
            continue
        _, group, count = np.unique(keys[rows], return_inverse=True, return_counts=True)
        for values, out in ((points, centres), (colors, means)):
            chosen = values[rows].astype(np.float64)
            out.append(np.stack([np.bincount(group, chosen[:, axis], len(count)) for axis in range(3)], axis=1)
                       / count[:, None])
    return np.concatenate(centres), np.concatenate(means)


def transfer_colours(vertices: np.ndarray, points: np.ndarray, colors: np.ndarray,
                     k: int = NEIGHBOURS, cells: int = MAX_TRANSFER_CELLS,
                     should_cancel: Callable[[], bool] | None = None) -> np.ndarray:
    """(V, 4) float32 RGBA in [0, 1] (alpha 1) for mesh vertices (V, 3) from points (N, 3) with
    colours (N, 3) in [0, 1], all in the same coordinates: the weighted mean of the k nearest
    (cell-averaged) points' colours, weights 1 / distance. should_cancel() is checked while the
    points are averaged (cell_means), raising Cancelled."""
    centres, means = cell_means(points, colors, cells, should_cancel)
    k = min(k, len(centres))
    distances, index = NearestPoints(centres).query(vertices, k=k)
    distances, index = distances.reshape(len(vertices), k), index.reshape(len(vertices), k)
    lowest, highest = bounding_box(points)
    extent = max(float((highest - lowest).max()), 1e-30)
    weights = 1.0 / np.maximum(distances, MIN_DISTANCE * extent)
    rgb = (weights[:, :, None] * means[index]).sum(axis=1) / weights.sum(axis=1, keepdims=True)
    return np.concatenate([np.clip(rgb, 0.0, 1.0), np.ones((len(vertices), 1))], axis=1).astype(np.float32)
