"""How densely a point cloud samples its surface: the one measure that the safety net's radius,
the refinement's fitting sites and the decimation's tolerance are all scaled by."""

import math

import numpy as np

from ..preprocess import subsample_indices
from .nearest import NearestPoints


def median_spacing(points: np.ndarray, sample: int = 50_000) -> float:
    """Median distance from a point (N, 3) to its nearest neighbour; 0 for fewer than two points.
    Larger clouds are measured on a random subset of `sample` points (the same one every time) and
    scaled back: the spacing on a surface goes as one over the square root of the count."""
    points = np.asarray(points, dtype=np.float64)
    if len(points) < 2:
        return 0.0
    factor = 1.0
    if len(points) > sample:
        factor = math.sqrt(sample / len(points))
        points = points[np.random.default_rng(0).choice(len(points), sample, replace=False)]
    distances, _ = NearestPoints(points).query(points, k=2)
    return float(np.median(distances[:, 1]) * factor)


def thinned_indices(points: np.ndarray, spacing: float, target: float) -> np.ndarray:
    """Indices of a covering subset (preprocess.subsample_indices) of points (N, 3) whose median
    spacing is `spacing`, about `target` apart; all of them when they are no denser. The spacing on
    a surface goes as one over the square root of the count."""
    if spacing >= target:
        return np.arange(len(points))
    return subsample_indices(points, max(1, math.ceil(len(points) * (spacing / target) ** 2)))
