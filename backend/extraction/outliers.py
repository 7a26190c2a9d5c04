"""Stray points: samples of nothing, left out before a cloud is reconstructed.

Scans carry points that lie on no surface (a LiDAR's flying pixels, a photogrammetry tool's
mismatches). Every later stage takes a point for a sample of the surface: the safety net rebuilds
the parts "the network missed" around them, the sheets stage raises slabs through them, the
refinement reaches for them. Half a percent of such points, spread over the bunny's box at 30,000
points, gave it 2.6 times its surface (Chamfer-L1 x10 0.032 -> 0.325; docs/pointclouds.md, "Stray
points").

A point is stray when its OUTLIER_NEIGHBOUR-th nearest other point lies further than
OUTLIER_FACTOR times the cloud's median of that distance: far from the surface, whatever the
density, since a sample's neighbours lie on the surface at about the points' spacing. The factor
leaves room for scans that are denser near the scanner: on the 47 validation clouds (the 30
validation basemeshes and 17 thin ones, 300 to 300,000 points, uniform over the surface) the
largest ratio was 4.34, so no point of them was taken.
"""

from __future__ import annotations

import numpy as np

from ..preprocess import cell_keys, grid_cells, subsample_indices
from .nearest import NearestPoints

OUTLIER_NEIGHBOUR = 3
OUTLIER_FACTOR = 6.0
# Fewer points than this say too little about their own spacing: all are kept.
MIN_POINTS = 100
# Larger clouds are tested on a covering subset of this many (preprocess.subsample_indices): a
# stray point is alone in its cell of the covering grid, so it is one of them, but the subset's
# spacing, and with it the reach, is sqrt(N / TESTED_POINTS) times as long (3 million points: 1.7).
TESTED_POINTS = 1_000_000
QUERY_ORDER_CELLS = 64


def stray_points(points: np.ndarray) -> np.ndarray:
    """Bool (N,): which of points (N, 3) (any offset: a survey's 10^5 m) are stray (see the
    module's docstring)."""
    count = len(points)
    stray = np.zeros(count, dtype=bool)
    if count < MIN_POINTS:
        return stray
    tested = subsample_indices(points, TESTED_POINTS)
    local = np.asarray(points[tested], np.float64)   # float64 keeps a survey's millimetres
    # in the order of a grid's cells: neighbouring queries walk the same branches of the tree (a
    # million points of a scan: 0.65 s with the sort, 1.66 s in the file's order)
    ordered = np.argsort(cell_keys(grid_cells(local, QUERY_ORDER_CELLS), QUERY_ORDER_CELLS))
    tested, local = tested[ordered], local[ordered]
    distance, _ = NearestPoints(local).query(local, k=OUTLIER_NEIGHBOUR + 1)
    distance = distance[:, OUTLIER_NEIGHBOUR]
    reach = OUTLIER_FACTOR * float(np.median(distance))
    if reach > 0.0:   # else most points repeat: no spacing to go by
        stray[tested] = distance > reach
    return stray
