"""Repeated points: a cloud's copies of its own points, left out before it is reconstructed.

Clouds repeat points more often than one would think: two exports of one scan merged (one of them
perhaps in float32), a mesh's corners read as points (an STL holds each corner once per face, about
six times), coordinates quantised to a scan format's units. A repeat says nothing about the
surface, but every stage that scales itself by the points' spacing (the safety net's radius, the
refinement's fitting sites, the point field, the sheets, the decimation's tolerance) measures it as
the median distance to the nearest other point, and where half the points have a copy that median
is 0 or next to it: a cloud of 3000 points given twice never finished (the sheets stage asked for a
subset of no points and searched for it forever), and the same points once in float64 and once in
float32 failed in the point field (docs/pointclouds.md, "Repeated points").

Points in the same cell of a grid of REPEAT_CELLS cells along the cloud's longest extent count as
one: the first of them stays, with its colour and normal. A cell is a 131,072th of the cloud, a
four-hundredth of a cell of the finest grid the pipeline extracts (512^3), and a hundredth of the
spacing of 10 million points on an object; copies that differ in a float32 rounding fall in the
same cell but for the few that straddle a cell's border.
"""

from __future__ import annotations

import numpy as np

from ..preprocess import bounding_box

REPEAT_CELLS = 2 ** 17


def cell_keys(points: np.ndarray) -> np.ndarray:
    """(N,) int64: the cell of each of points (N, 3) in a grid of REPEAT_CELLS cells along the
    cloud's longest extent, numbered row by row (the keys stay below 2^51)."""
    lowest, highest = bounding_box(points)
    scale = REPEAT_CELLS / max(float((highest - lowest).max()), 1e-300)
    keys = np.zeros(len(points), dtype=np.int64)
    for axis in range(3):   # a column at a time: no (N, 3) temporaries at 10 million points
        keys *= REPEAT_CELLS
        keys += np.minimum(((points[:, axis] - lowest[axis]) * scale).astype(np.int64), REPEAT_CELLS - 1)
    return keys


def repeated_points(points: np.ndarray) -> np.ndarray:
    """Bool (N,): which of points (N, 3) lie in the cell (cell_keys) of an earlier point. A cloud
    without repeats costs a sort of its keys (3 million points: 0.05-0.13 s on two cores); one with
    repeats an argsort more (3 million points and 1.5 million copies of them: 0.4-0.6 s)."""
    repeated = np.zeros(len(points), dtype=bool)
    keys = cell_keys(points)
    ranked = np.sort(keys)
    if not (ranked[1:] == ranked[:-1]).any():
        return repeated
    order = np.argsort(keys)
    ranked = keys[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    first = np.repeat(np.minimum.reduceat(order, starts), np.diff(np.r_[starts, len(order)]))  # each cell's earliest
    repeated[order[order != first]] = True
    return repeated
