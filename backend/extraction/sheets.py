"""Sheets thinner than a grid cell: the points give them a minimum thickness before marching cubes.

A closed surface can wrap a sheet only where the grid holds some of the sheet's inside. Where an
object is thinner than about a cell (an awning 0.002 of the longest edge thick, a UI banner, a
leaf, a disc seen edge-on), the network's inside comes and goes along the sheet, and marching
cubes returns it in fragments: 71 pieces for the awning's 3000 points at 128^3, 1,400 for 300,000
points at 256^3. The points, though, lie on the sheet wherever it is. So:

  * Local planes: around a covering subset of the points (about `centre_cells` apart), the plane
    of each one's `neighbours` nearest points (their mean, their smallest principal direction).
  * A plane is a sheet the grid cannot hold when its points lie close to it (their root mean
    square distance at most `planarity` of the neighbourhood's radius) and the grid holds no
    inside at any of `probe_cells` from it on either side, the plane itself included, nor at
    `body_probes` (fixed distances, since how far the network misplaces a surface does not
    shrink with the cells): a hole in the network's sheet, with no body of the network's behind it. Where the network does hold
    something there (any bulky part, a plate it resolved, a fragment of the sheet, the inside of a
    scan it closed, a body whose surface it put a few cells off the points, which the refinement
    brings onto them), nothing changes: a thin part it got right is not thickened, and a body
    does not gain a second skin.
  * Around each such plane the grid is raised to a slab `half_thickness_cells` thick on either
    side, reaching `reach_cells` along the plane (at least `reach_spacings` of the points'
    spacing, so neighbouring patches overlap), never lowered: the fragments join into one
    closed sheet, which the refinement then pulls onto the points.

Chosen on the validation split (docs/pointclouds.md, "Sheets thinner than a grid cell").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import Cancelled
from .nearest import NearestPoints
from .pointfield import grid_values_at, principal_normals
from .spacing import thinned_indices


@dataclass(frozen=True)
class SheetSettings:
    neighbours: int = 16                   # points per local plane
    centre_cells: float = 0.5              # planes about this many cells apart (a covering subset of the points)
    planarity: float = 0.2                 # a sheet's points lie this share of their neighbourhood's radius from its plane (rms)
    probe_cells: tuple[float, ...] = (0.0, 0.75, 1.5, 2.5)  # a sheet's grid is empty this many cells away both ways ...
    body_probes: tuple[float, ...] = (0.035, 0.05, 0.07)  # ... and this far (canonical units): no body the network
                                                          # placed off the points, whatever the resolution
    half_thickness_cells: float = 0.55     # the slab raised around a sheet reaches this far from its plane ...
    reach_cells: float = 1.5               # ... and this far along it,
    reach_spacings: float = 1.2            # ... or this many spacings of the points where they are sparser
    slope: float = 500.0                   # logits per unit length of the slab's field (about the network's)


@dataclass
class SheetReport:
    planes: int = 0                        # local planes tested
    sheets: int = 0                        # ... of them sheets the grid could not hold
    raised: int = 0                        # grid places raised
    seconds: float = 0.0

    def as_stats(self) -> dict:
        return {"planes": self.planes, "sheets": self.sheets, "raised_places": self.raised,
                "seconds": round(self.seconds, 4)}


# Grid places examined per block of sheets (each sheet looks at a cube of them): a cancel lands
# within a block, whose temporaries take about 12 MB an array.
BLOCK_PLACES = 500_000


def sheet_planes(points: np.ndarray, spacing: float, cell: float, settings: SheetSettings
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local planes of points (N, 3) with median spacing `spacing`, for a grid of cell size `cell`:
    centres (S, 3) (the means of each plane's points), unit normals (S, 3), and whether their
    points lie close to them (S,) bool. About one plane per settings.centre_cells cells."""
    points = np.asarray(points, np.float64)
    fine = 0.5 * settings.centre_cells * cell          # denser than the planes need: thinned to this
    points = points[thinned_indices(points, spacing, fine)]
    centres = thinned_indices(points, max(spacing, fine), settings.centre_cells * cell)
    k = min(settings.neighbours, len(points))
    distance, neighbours = NearestPoints(points).query(points[centres], k=k)
    normals, spread = principal_normals(points, neighbours.reshape(len(centres), k))
    radius = distance.reshape(len(centres), k)[:, -1]
    return points[neighbours.reshape(len(centres), k)].mean(axis=1), normals, spread <= settings.planarity * radius


def thicken_sheets(values: np.ndarray, level: float, box_min: float, cell: float, points: np.ndarray,
                   spacing: float, settings: SheetSettings = SheetSettings(),
                   should_cancel: Callable[[], bool] | None = None) -> SheetReport:
    """Raise the grid values (n,)^3 (inside > level, index i at box_min + i * cell) in place to a
    slab around every sheet of the points (N, 3) (median spacing `spacing`) that the grid holds no
    inside of (see the module's docstring). -> what it did."""
    start = time.perf_counter()
    report = SheetReport()
    if len(points) < settings.neighbours:
        return report
    centres, normals, flat = sheet_planes(points, spacing, cell, settings)
    report.planes = len(centres)
    empty = flat
    for distance in (*(cells * cell for cells in settings.probe_cells), *settings.body_probes):
        for side in ((1.0,) if distance == 0.0 else (1.0, -1.0)):
            empty &= grid_values_at(values, box_min, cell, centres + side * distance * normals) <= level
    centres, normals = centres[empty], normals[empty]
    report.sheets = len(centres)
    half = settings.half_thickness_cells * cell
    reach = max(settings.reach_cells * cell, settings.reach_spacings * spacing)
    steps = np.arange(-math.ceil(reach / cell) - 1, math.ceil(reach / cell) + 2)
    offsets = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), axis=-1).reshape(-1, 3)
    raised = []
    block = max(1, BLOCK_PLACES // len(offsets))
    for begin in range(0, len(centres), block):
        if should_cancel is not None and should_cancel():
            raise Cancelled()
        centre, normal = centres[begin:begin + block], normals[begin:begin + block]
        places = np.rint((centre - box_min) / cell).astype(np.int64)[:, None] + offsets      # (S, O, 3)
        offset = box_min + places * cell - centre[:, None]
        height = np.einsum("soi,si->so", offset, normal)
        along = np.linalg.norm(offset - height[..., None] * normal[:, None], axis=-1)
        # Places a cell beyond the slab too, so that the slab's field falls through the level between grid points.
        near = (along <= reach) & (np.abs(height) <= half + cell) & ((places >= 0) & (places < values.shape[0])).all(-1)
        index = np.ravel_multi_index(tuple(places[near].T), values.shape)
        slab = (level + settings.slope * (half - np.abs(height[near]))).astype(values.dtype)
        order = np.argsort(index, kind="stable")
        index, slab = index[order], slab[order]
        unique, first = np.unique(index, return_index=True)
        highest = np.maximum.reduceat(slab, first)
        higher = highest > values.flat[unique]
        values.flat[unique[higher]] = highest[higher]
        raised.append(unique[higher])
    report.raised = len(np.unique(np.concatenate(raised))) if raised else 0
    report.seconds = time.perf_counter() - start
    return report
