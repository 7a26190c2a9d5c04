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
  * Around each such plane the grid is raised, never lowered, to a slab, so the fragments join
    into one closed sheet, which the refinement then pulls onto the points. Each grid place near
    the sheets belongs to the patch of its nearest sheet plane: the patches tile the sheet, with
    no gap where random samples left one. A patch covers its own neighbourhood's footprint, an
    ellipse `patch_spreads` times the points' spread along each in-plane direction (at least
    `reach_cells` and `reach_spacings` of the points' spacing), so it stays narrow across a rod.
    The slab reaches `half_thickness_cells` to either side, or more where the plane is oblique to
    the grid (slab_half_cells): thinner, its places touch from column to column only at their
    edges. Each of those three faults leaves pinholes in the slab, a tunnel each in the mesh.

Chosen on the validation split (docs/pointclouds.md, "Sheets thinner than a grid cell").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage

from ..errors import Cancelled
from .nearest import NearestPoints
from .pointfield import grid_values_at
from .spacing import thinned_indices


@dataclass(frozen=True)
class SheetSettings:
    neighbours: int = 16                   # points per local plane
    centre_cells: float = 0.5              # planes about this many cells apart (a covering subset of the points)
    planarity: float = 0.2                 # a sheet's points lie this share of their neighbourhood's radius from its plane (rms)
    probe_cells: tuple[float, ...] = (0.0, 0.75, 1.5, 2.5)  # a sheet's grid is empty this many cells away both ways ...
    body_probes: tuple[float, ...] = (0.035, 0.05, 0.07)  # ... and this far (canonical units): no body the network
                                                          # placed off the points, whatever the resolution
    half_thickness_cells: float = 0.55     # the slab raised around a sheet reaches this far from its plane,
    oblique_margin_cells: float = 0.15     # ... or this much beyond what an oblique plane needs (slab_half_cells),
    patch_spreads: float = 2.0             # ... and along it over its neighbourhood's footprint: this many times
                                           # the points' spread in each direction (patch_axes),
    reach_cells: float = 1.5               # ... at least this far
    reach_spacings: float = 1.2            # ... and this many spacings of the points
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


# Grid places examined per block: a cancel lands within a block, whose temporaries take about 20 MB.
BLOCK_PLACES = 200_000
# near_places: coarse cells of this many grid cells a side, each tested against this many nearest patches
COARSE_CELLS, COARSE_PATCHES = 4, 8


def sheet_planes(points: np.ndarray, spacing: float, cell: float, settings: SheetSettings
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Local planes of points (N, 3) with median spacing `spacing`, for a grid of cell size `cell`:
    centres, frames and spreads of each plane's points (principal_frames: (S, 3), (S, 3, 3),
    (S, 3)), and whether they lie close to their plane (S,) bool. About one plane per
    settings.centre_cells cells."""
    points = np.asarray(points, np.float64)
    fine = 0.5 * settings.centre_cells * cell          # denser than the planes need: thinned to this
    points = points[thinned_indices(points, spacing, fine)]
    centres = thinned_indices(points, max(spacing, fine), settings.centre_cells * cell)
    k = min(settings.neighbours, len(points))
    distance, neighbours = NearestPoints(points).query(points[centres], k=k)
    near = points[neighbours.reshape(len(centres), k)]                          # (S, K, 3)
    mean, frames, spreads = principal_frames(near)
    flat = spreads[:, 0] <= settings.planarity * distance.reshape(len(centres), k)[:, -1]
    return mean, frames, spreads, flat


def principal_frames(near: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of groups of points (S, K, 3): their means (S, 3), principal frames (S, 3, 3) (rows, unit:
    the direction of least spread, which is their plane's normal, then those of the largest and
    the second spread in the plane) and the spreads along those three (S, 3) (root mean square
    distances from the mean)."""
    mean = near.mean(axis=1)
    centred = near - mean[:, None]
    variance, axes = np.linalg.eigh(np.einsum("ski,skj->sij", centred, centred) / near.shape[1])  # ascending
    order = [0, 2, 1]
    return mean, axes.transpose(0, 2, 1)[:, order], np.sqrt(np.maximum(variance, 0.0))[:, order]


def patch_axes(spreads: np.ndarray, least: float, settings: SheetSettings) -> np.ndarray:
    """Semi-axes (S, 2) of each sheet's patch along its two in-plane directions, from the spreads
    (S, 2) of its points along them: the footprint of its own neighbourhood (settings.patch_spreads
    times the spread: the radius of a uniformly covered disc is twice its spread), so that patches
    around points on either side of a gap between random samples meet, while along a rod's thin
    direction the patch stays narrow; at least `least`."""
    return np.maximum(settings.patch_spreads * spreads, least)


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
    centres, frames, spreads, flat = sheet_planes(points, spacing, cell, settings)
    report.planes = len(centres)
    empty = flat
    for distance in (*(cells * cell for cells in settings.probe_cells), *settings.body_probes):
        for side in ((1.0,) if distance == 0.0 else (1.0, -1.0)):
            empty &= grid_values_at(values, box_min, cell, centres + side * distance * frames[:, 0]) <= level
    centres, frames = centres[empty], frames[empty]
    report.sheets = len(centres)
    if not len(centres):
        report.seconds = time.perf_counter() - start
        return report
    least = max(settings.reach_cells * cell, settings.reach_spacings * spacing)
    axes = patch_axes(spreads[empty, 1:], least, settings)
    # Thinner than slab_half_cells, an oblique slab's grid places touch from column to column only at
    # their edges, and marching cubes leaves pinholes there, a tunnel each.
    halves = cell * np.maximum(settings.half_thickness_cells,
                               slab_half_cells(frames[:, 0]) + settings.oblique_margin_cells)
    reach = float(axes.max())
    sheets = NearestPoints(centres)
    raised = []
    for places in near_places(sheets, frames, axes, halves, box_min, cell, values.shape[0]):
        if should_cancel is not None and should_cancel():
            raise Cancelled()
        # Each place belongs to the patch of its nearest sheet: the patches tile the sheet, leaving no
        # gap between them.
        at = box_min + places * cell
        _, nearest = sheets.query(at, distance_upper_bound=reach)
        found = nearest < len(centres)
        places, nearest = places[found], nearest[found]
        local = np.einsum("pij,pj->pi", frames[nearest], at[found] - centres[nearest])              # (P, 3)
        height, half = np.abs(local[:, 0]), halves[nearest]
        # Places a cell beyond the slab too, so that the slab's field falls through the level between grid points.
        covered = (((local[:, 1:] / axes[nearest]) ** 2).sum(axis=1) <= 1.0) & (height <= half + cell)
        index = np.ravel_multi_index(tuple(places[covered].T), values.shape)
        slab = (level + settings.slope * (half[covered] - height[covered])).astype(values.dtype)
        higher = slab > values.flat[index]
        values.flat[index[higher]] = slab[higher]
        raised.append(index[higher])
    report.raised = len(np.unique(np.concatenate(raised))) if raised else 0
    report.seconds = time.perf_counter() - start
    return report


def near_places(sheets: NearestPoints, frames: np.ndarray, axes: np.ndarray, halves: np.ndarray,
                box_min: float, cell: float, n: int):
    """Blocks of grid indices (P, 3), at most BLOCK_PLACES each, of the grid (n,)^3 whose places a
    sheet's patch may cover (the sheets' centres (S, 3) as a search structure, their frames
    (S, 3, 3), semi-axes (S, 2) and half-thicknesses (S,)): the places of every coarse cell
    (COARSE_CELLS a side) that one of its COARSE_PATCHES nearest patches reaches once widened by
    the coarse cell's half diagonal. A patch is a thin slab and the places near a sparse sheet a
    thick shell: testing the coarse cells first saves most of the shell's search."""
    centres, reach = sheets.points, float(axes.max())
    coarse = -(-n // COARSE_CELLS)
    owner = np.floor((centres - box_min) / (cell * COARSE_CELLS)).astype(np.int64)
    occupied = np.zeros((coarse,) * 3, bool)
    owner = owner[((owner >= 0) & (owner < coarse)).all(axis=1)]
    occupied[tuple(owner.T)] = True
    widen = 0.5 * math.sqrt(3.0) * COARSE_CELLS * cell
    steps = math.ceil((reach + widen) / (COARSE_CELLS * cell))
    cells = np.argwhere(ndimage.binary_dilation(occupied, np.ones((3, 3, 3), bool), iterations=steps))
    middle = box_min + (cells * COARSE_CELLS + 0.5 * (COARSE_CELLS - 1)) * cell
    _, which = sheets.query(middle, k=min(COARSE_PATCHES, len(centres)), distance_upper_bound=reach + widen)
    which = which.reshape(len(cells), -1)
    valid = which < len(centres)
    which = np.minimum(which, len(centres) - 1)
    local = np.einsum("ckij,ckj->cki", frames[which], middle[:, None] - centres[which])       # (C, K, 3)
    reached = valid & (np.abs(local[..., 0]) <= halves[which] + cell + widen) & \
        (((np.abs(local[..., 1:]) / (axes[which] + widen)) ** 2).sum(axis=-1) <= 1.0)
    cells = cells[reached.any(axis=1)]
    inner = np.stack(np.meshgrid(*(np.arange(COARSE_CELLS),) * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    per_block = max(1, BLOCK_PLACES // len(inner))
    for begin in range(0, len(cells), per_block):
        places = (cells[begin:begin + per_block, None] * COARSE_CELLS + inner).reshape(-1, 3)
        yield places[(places < n).all(axis=1)]


def slab_half_cells(normals: np.ndarray) -> np.ndarray:
    """(S,) the half-thickness, in cells, that a slab around planes with unit normals (S, 3) needs for
    its grid places to be face-connected: next to a column of places along the normal's largest
    axis, the slab's extent shifts by the ratio of the next largest component to the largest; the
    two columns share a place when half the thickness is at least the mean of those two components
    (0.5 cells for a plane along the grid, up to 0.71 for one at 45 degrees)."""
    ranked = np.sort(np.abs(normals), axis=1)
    return 0.5 * (ranked[:, 2] + ranked[:, 1])
