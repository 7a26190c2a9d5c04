"""Multiresolution IsoSurface Extraction (MISE), as in Occupancy Networks, with two additions that
catch structures thinner than a coarse cell, which plain MISE loses entirely:
  * seed points: every cell that contains an input point is refined at every level;
  * a value margin: a cell whose corners come within `margin` of the threshold is refined.
Where the refined surface runs into a cell that was not refined, that cell is refined too, so the
surface is followed into its neighbours.

Values are kept on a level grid that doubles at each step. Points outside refined cells are never
evaluated: they take the trilinear interpolation of the coarser level, which has the same sign as
the corners of their (inactive) cell, so marching cubes finds no surface there. Written with torch
tensors, so the same code runs on CPU and CUDA.
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import Cancelled

# evaluate(points (M, 3) float32 tensor on device) -> values (M,) tensor; inside where value > level.
Evaluate = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class MiseResult:
    values: np.ndarray      # (R+1, R+1, R+1) float32 grid of values at the final resolution R
    evaluations: int        # number of points the function was evaluated at
    box_min: float          # coordinate of grid index 0 on every axis
    spacing: float          # distance between neighbouring grid points


def grid_coordinates(indices: torch.Tensor, n_cells: int, box: tuple[float, float]) -> torch.Tensor:
    """Integer grid indices (M, 3) on a grid of n_cells per axis -> coordinates (M, 3) in box."""
    lo, hi = box
    return lo + indices.to(torch.float32) * ((hi - lo) / n_cells)


def evaluate_in_batches(evaluate: Evaluate, points: torch.Tensor, batch_points: int,
                        on_batch: Callable[[int], None] | None = None,
                        should_cancel: Callable[[], bool] | None = None) -> torch.Tensor:
    """values (M,) of evaluate over points (M, 3), batch_points at a time (bounded memory).
    Cancellation is checked before every batch."""
    out = torch.empty(points.shape[0], dtype=torch.float32, device=points.device)
    for start in range(0, points.shape[0], batch_points):
        if should_cancel is not None and should_cancel():
            raise Cancelled()
        stop = min(start + batch_points, points.shape[0])
        out[start:stop] = evaluate(points[start:stop]).to(torch.float32)
        if on_batch is not None:
            on_batch(stop)
    return out


def cell_any(mask: torch.Tensor) -> torch.Tensor:
    """Grid points (n+1,)^3 bool -> cells (n,)^3 bool: does any of the cell's 8 corners hold?"""
    x = mask[:-1] | mask[1:]
    x = x[:, :-1] | x[:, 1:]
    return x[:, :, :-1] | x[:, :, 1:]


def cell_all(mask: torch.Tensor) -> torch.Tensor:
    """Grid points (n+1,)^3 bool -> cells (n,)^3 bool: do all 8 corners hold?"""
    x = mask[:-1] & mask[1:]
    x = x[:, :-1] & x[:, 1:]
    return x[:, :, :-1] & x[:, :, 1:]


def active_cells(values: torch.Tensor, level: float, margin: float | None) -> torch.Tensor:
    """Cells (n, n, n) bool of a value grid (n+1, n+1, n+1) whose corners disagree about the
    level, or come within margin of it."""
    inside = values > level
    active = cell_any(inside) & ~cell_all(inside)
    if margin is not None:
        active |= cell_any((values - level).abs() < margin)
    return active


def cells_containing(points: torch.Tensor, n_cells: int, box: tuple[float, float]) -> torch.Tensor:
    """(n, n, n) bool mask of the cells that contain at least one of points (P, 3)."""
    lo, hi = box
    ijk = ((points - lo) / (hi - lo) * n_cells).floor().long()
    ijk = ijk[((ijk >= 0) & (ijk < n_cells)).all(dim=1)]
    mask = torch.zeros((n_cells,) * 3, dtype=torch.bool, device=points.device)
    mask[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = True
    return mask


def corners_of_cells(cells: torch.Tensor) -> torch.Tensor:
    """Cells (n, n, n) of one level -> bool (2n+1,)^3 of the next level's grid points that lie in
    or on those cells (the 3x3x3 points of each subdivided cell). Separable: one axis at a time."""
    out = cells
    for axis in range(3):
        n = out.shape[axis]
        shape = list(out.shape)
        shape[axis] = 2 * n + 1
        grown = torch.zeros(shape, dtype=torch.bool, device=cells.device)
        for offset in range(3):
            index = [slice(None)] * 3
            index[axis] = slice(offset, offset + 2 * n, 2)
            grown[tuple(index)] |= out
        out = grown
    return out


def parent_cells(fine_cells: torch.Tensor) -> torch.Tensor:
    """Cells (2a, 2b, 2c) of a level -> their parents (a, b, c) on the level above: any child holds."""
    a, b, c = (size // 2 for size in fine_cells.shape)
    # Or-ing the halves of each axis in turn: ten times faster than .any() over the split axes.
    x = fine_cells.view(torch.uint8).reshape(a, 2, b, 2, c, 2)
    x = x[:, 0] | x[:, 1]
    x = x[:, :, 0] | x[:, :, 1]
    return (x[..., 0] | x[..., 1]).bool()


def window_of(cells: torch.Tensor) -> tuple[slice, slice, slice] | None:
    """The smallest box (slices per axis) of a bool grid holding all its True entries; None if none."""
    where = cells.nonzero()
    if not len(where):
        return None
    low, high = where.min(dim=0).values.tolist(), where.max(dim=0).values.tolist()
    return tuple(slice(lo, hi + 1) for lo, hi in zip(low, high))


def upsample(grid: torch.Tensor) -> torch.Tensor:
    """Values (n+1,)^3 -> (2n+1,)^3 by trilinear interpolation; the old points keep their values."""
    n1 = grid.shape[0]
    return F.interpolate(grid[None, None], size=(2 * n1 - 1,) * 3, mode="trilinear", align_corners=True)[0, 0]


def mise(evaluate: Evaluate, resolution0: int = 32, upsampling_steps: int = 2, level: float = 0.0,
         box: tuple[float, float] = (-0.55, 0.55), seed_points: torch.Tensor | None = None,
         margin: float | None = None, batch_points: int = 65536,
         device: torch.device | str = "cpu",
         progress: Callable[[float], None] | None = None,
         should_cancel: Callable[[], bool] | None = None) -> MiseResult:
    """Evaluate a function on a grid of resolution0 * 2**upsampling_steps cells per axis, but only
    where a surface can be.

    evaluate: points (M, 3) -> values (M,), inside where value > level.
    seed_points: (P, 3) points known to lie on the surface (the input point cloud), or None.
    margin: also refine cells whose corner values come within margin of level (thin structures).
    progress(fraction in [0, 1]) is called after every batch; should_cancel() before every batch.
    """
    device = torch.device(device)
    n = resolution0
    n_final = resolution0 * 2 ** upsampling_steps
    steps_total = upsampling_steps + 1

    def coordinates(indices: torch.Tensor, n_cells: int) -> torch.Tensor:
        # Always computed from the finest grid's indices, so a point has bit-identical coordinates
        # at every level and in the dense reference.
        return grid_coordinates(indices * (n_final // n_cells), n_final, box)

    def run(step: int, indices: torch.Tensor, n_cells: int) -> torch.Tensor:
        count = max(indices.shape[0], 1)
        on_batch = None if progress is None else (lambda done: progress((step + done / count) / steps_total))
        return evaluate_in_batches(evaluate, coordinates(indices, n_cells), batch_points, on_batch, should_cancel)

    axis = torch.arange(n + 1, device=device)
    indices = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    values = run(0, indices, n).reshape((n + 1,) * 3)
    evaluations = indices.shape[0]
    known = torch.ones_like(values, dtype=torch.bool)

    for step in range(1, steps_total):
        cells = active_cells(values, level, margin)
        if seed_points is not None and len(seed_points):
            cells |= cells_containing(seed_points.to(device=device, dtype=torch.float32), n, box)
        values = upsample(values)
        known_up = torch.zeros(values.shape, dtype=torch.bool, device=device)
        known_up[::2, ::2, ::2] = known
        known = known_up
        refined = torch.zeros_like(known)
        refined_cells = cells.clone()
        n *= 2
        # Each round works in the box around the cells it refines: after the first, they are a few
        # cells where the surface ran on (at 256^3 two rounds of 156 and 1 cells after 26,000).
        window = window_of(cells)
        while window is not None:
            points = tuple(slice(2 * axis.start, 2 * axis.stop + 1) for axis in window)
            new_points = corners_of_cells(cells[window]) & ~refined[points]
            refined[points] |= new_points
            todo = (new_points & ~known[points]).nonzero()
            if len(todo):
                todo += torch.tensor([axis.start for axis in points], device=device)
                values[todo[:, 0], todo[:, 1], todo[:, 2]] = run(step, todo, n)
                known[todo[:, 0], todo[:, 1], todo[:, 2]] = True
                evaluations += todo.shape[0]
            # A surface cell that reaches a point we did not refine runs on into a coarse cell whose
            # corners all agreed: refine that cell too, until the surface is closed inside refined
            # cells. Only cells with a corner among the new points can have changed: those within
            # one cell of the box, which is widened to whole parents.
            fine = tuple(slice(max(2 * axis.start - 2, 0), min(2 * axis.stop + 2, n)) for axis in window)
            fine_points = tuple(slice(axis.start, axis.stop + 1) for axis in fine)
            frontier = active_cells(values[fine_points], level, None) & cell_any(~refined[fine_points])
            parents = tuple(slice(axis.start // 2, axis.stop // 2) for axis in fine)
            cells = torch.zeros_like(refined_cells)
            cells[parents] = parent_cells(frontier) & ~refined_cells[parents]
            window = window_of(cells)
            if window is not None:
                refined_cells |= cells

    if progress is not None:
        progress(1.0)
    lo, hi = box
    return MiseResult(values.cpu().numpy().astype(np.float32, copy=False), evaluations, lo, (hi - lo) / n)


def dense_grid(evaluate: Evaluate, resolution: int, box: tuple[float, float] = (-0.55, 0.55),
               batch_points: int = 65536, device: torch.device | str = "cpu",
               progress: Callable[[float], None] | None = None,
               should_cancel: Callable[[], bool] | None = None) -> MiseResult:
    """The reference MISE is measured against: every one of the (resolution+1)^3 grid points."""
    return mise(evaluate, resolution0=resolution, upsampling_steps=0, box=box, batch_points=batch_points,
                device=device, progress=progress, should_cancel=should_cancel)
