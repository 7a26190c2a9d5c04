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

import math

import numpy as np

from ..preprocess import bounding_box
from .nearest import NearestPoints

OUTLIER_NEIGHBOUR = 3
OUTLIER_FACTOR = 6.0
# Fewer points than this say too little about their own spacing: all are kept.
MIN_POINTS = 100
# Larger clouds measure the median on this many of their points, and search only the points that
# share their cube of the grid below with at most OUTLIER_NEIGHBOUR others.
SCALE_SAMPLE = 50_000


def stray_points(points: np.ndarray) -> np.ndarray:
    """Bool (N,): which of points (N, 3) (any offset: a survey's 10^5 m) are stray (see the
    module's docstring)."""
    count = len(points)
    stray = np.zeros(count, dtype=bool)
    if count < MIN_POINTS:
        return stray
    lowest, _ = bounding_box(points)
    local = np.asarray(points, np.float64) - lowest
    tree = NearestPoints(local)
    if count <= SCALE_SAMPLE:
        distance = neighbour_distance(tree, local)
        reach = OUTLIER_FACTOR * float(np.median(distance))
        return distance > reach if reach > 0.0 else stray   # most points repeated: no spacing to go by
    sample = np.random.default_rng(0).choice(count, SCALE_SAMPLE, replace=False)
    reach = OUTLIER_FACTOR * float(np.median(neighbour_distance(tree, local[sample])))
    if reach == 0.0:
        return stray
    # Points in one cube are at most its diagonal, the reach, apart: where a cube holds more than
    # OUTLIER_NEIGHBOUR other points, none of its points is stray.
    cubes = np.floor(local / (reach / math.sqrt(3.0))).astype(np.int64)
    doubtful = np.flatnonzero(points_per_cube(cubes) <= OUTLIER_NEIGHBOUR)
    if len(doubtful):
        stray[doubtful] = neighbour_distance(tree, local[doubtful]) > reach
    return stray


# points_per_cube counts in a table of the whole grid up to this many cubes (128 MB), else sorts
# the cubes' numbers (3 million points: 0.03 s against 0.6 s)
TABLE_CUBES = 2 ** 24


def points_per_cube(cubes: np.ndarray) -> np.ndarray:
    """(N,) how many of the points share each point's cube, given as grid coordinates (N, 3) >= 0."""
    sides = [int(cubes[:, axis].max()) + 1 for axis in range(3)]
    if math.prod(sides) >= 2 ** 63:   # too many cubes to number in 64 bits (rows compared whole: slow)
        _, which, held = np.unique(cubes, axis=0, return_inverse=True, return_counts=True)
        return held[which.reshape(-1)]
    keys = (cubes[:, 0] * sides[1] + cubes[:, 1]) * sides[2] + cubes[:, 2]
    if math.prod(sides) <= TABLE_CUBES:
        return np.bincount(keys, minlength=math.prod(sides))[keys]
    _, which, held = np.unique(keys, return_inverse=True, return_counts=True)
    return held[which]


def neighbour_distance(tree: NearestPoints, queries: np.ndarray) -> np.ndarray:
    """(M,) distance of each of queries (M, 3), points of the tree, to its OUTLIER_NEIGHBOUR-th
    nearest other point of the tree."""
    distance, _ = tree.query(queries, k=OUTLIER_NEIGHBOUR + 1)
    return distance[:, OUTLIER_NEIGHBOUR]
