"""Repeated points: a cloud's exact copies of its own points, left out before it is reconstructed.

Clouds repeat points more often than one would think: two exports of one scan merged, a mesh's
corners read as points (an STL holds each corner once per face, about six times), coordinates
quantised to a scan format's units. A repeat says nothing about the surface, but every stage that
scales itself by the points' spacing (the safety net's radius, the refinement's fitting sites, the
sheets, the decimation's tolerance) measures it as the median distance to the nearest other
point, and where half the points have a copy that median is 0: a cloud of 3000 points, each given
twice, never finished (the sheets stage asked for a subset of no points and searched for it
forever). The first of each set of equal points is kept, with its colour and normal.
"""

from __future__ import annotations

import numpy as np

# Multipliers of the coordinates' bit patterns (odd 64-bit constants with well-mixed bits), so
# that points equal in two coordinates still get different keys.
MIXERS = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0x165667B19E3779F9))


def point_keys(points: np.ndarray) -> np.ndarray:
    """(N,) uint64 of points (N, 3): equal points get equal keys; different ones almost never do
    (repeated_points compares the points themselves)."""
    keys = np.zeros(len(points), dtype=np.uint64)
    for axis, mixer in enumerate(MIXERS):
        bits = (np.asarray(points[:, axis], np.float64) + 0.0).view(np.uint64)   # + 0.0: -0.0 is 0.0
        bits *= mixer
        keys ^= bits
    return keys


def repeated_points(points: np.ndarray) -> np.ndarray:
    """Bool (N,): which of points (N, 3) equal an earlier point exactly. A cloud without repeats
    costs a sort of its keys (0.09 s at 3 million points); one with repeats an argsort more (3
    million points and 1.5 million repeats of them: 0.5 s)."""
    repeated = np.zeros(len(points), dtype=bool)
    keys = point_keys(points)
    ranked = np.sort(keys)
    if not (ranked[1:] == ranked[:-1]).any():
        return repeated
    order = np.argsort(keys)
    ranked = keys[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    first = np.repeat(np.minimum.reduceat(order, starts), sizes)   # (N,) the earliest point of each one's key
    later = order != first
    # points whose keys collide without being equal are no repeats
    same = (points[order[later]] == points[first[later]]).all(axis=1)
    repeated[order[later][same]] = True
    return repeated
