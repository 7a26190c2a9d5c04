"""The points bound the surface: a safety net on the network's answer for point clouds.

A point cloud is a sample of the surface, so the surface lies near the points, and every point
lies near the surface. The network knows neither: on shapes unlike its training data (rods,
boards, plates, swords) it can put a blob or a slab far from every point and leave the points
themselves with no surface at all. SupportNet checks the network against the points, as a filter
on the function that extraction evaluates, so it costs nothing per grid point beyond two
trilinear look-ups, and MISE never refines a phantom surface:

  * tau, the support radius, adapts to the points: `spacing_multiple` times their median
    nearest-neighbour spacing (points sampled at random on a surface leave gaps up to about 3.4
    times that wide; 6 keeps the sparse ends of a rod closed), and at least `min_cells` cells of the net's own grid. The band is every place
    within tau of an input point; the surface may only pass through it.
  * The far region (beyond tau) falls into connected pieces (face-connected). A piece that touches
    the box's border is outside, and so is everything an empty ball centred in it reaches (ball
    carving: what is left is the alpha hull of the points, closed over holes up to about tau wide,
    its boundary touching the outermost points). The network's inside is cut to that hull: blobs
    and slabs far from the points vanish. Except where the outside is sheltered: far places that
    see the band in half of the 26 grid directions or more (the inside of a scan whose underside or
    windows are missing) are no carving centres, and the network decides there.
  * A far piece that does not touch the border is enclosed by the points (the inside of a closed
    scan): it is made all inside or all outside by the network's vote where the vote is clear
    (three quarters inside, or a tenth or less), so bubbles and specks inside a scan vanish.
  * A point is explained when the network (cut to the hull) is inside somewhere within tau / 2 of
    it (7 probes). Around unexplained points the hull itself is used, where it is thin (no place
    deeper than `thin` inside it): the band places whose nearest point is unexplained, and the
    enclosed pieces they surround, are inside up to the carved boundary. Thin parts the network
    lost come back; bulky ones stay the network's call (it decides what is inside).

The geometry lives on a grid of its own over the query box, with a spacing of about tau / 4
(at most 128 cells a side), where the KD-tree queries only touch places near the points. The
hull's field is a signed distance (to the carving balls' spheres), so trilinear interpolation
places its surface between grid points. The report says what changed, and its warning says when
that changed the result (docs/pointclouds.md, "When the net warns"): surface removed at least
max(tau / 2, `far_cells` cells) beyond the hull, or parts rebuilt around at least WARN_UNEXPLAINED
of the points where no surface of the points' own (pointfield) corrected the grid.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..errors import Cancelled
from .nearest import NearestPoints
from .spacing import median_spacing

# Connectivity of the far region: faces only, so an outside piece cannot leak into the inside
# through the corner where two band places meet diagonally.
FACE_CONNECTIVITY = ndimage.generate_binary_structure(3, 1)
# Probes around each tested point: the point and tau / 2 along the 6 axes (one of them lies at
# least tau / (2 sqrt 3) deep on the inside of any plane through the point).
PROBE_DIRECTIONS = np.concatenate([np.zeros((1, 3)), np.eye(3), -np.eye(3)])
# The warning names rebuilt parts when at least this share of the points had no network surface
# near them: on the 30 validation basemeshes at 3000 points every cloud at or above it but two had
# a result the net changed (IoU between the results with and without it under 0.95), none below.
WARN_UNEXPLAINED = 0.05


@dataclass(frozen=True)
class SupportSettings:
    spacing_multiple: float = 6.0      # tau = this x the median nearest-neighbour spacing of the points
    min_cells: float = 1.5             # ... and at least this many cells of the net's grid
    cells_per_tau: float = 4.0         # the net's grid spacing is about tau / this ...
    max_cells: int = 128               # ... with at most this many cells a side
    slope: float = 500.0               # logits per unit length of the hull's field (about the network's)
    nearest_shell: int = 8             # carving balls tried per band place
    sheltered: float = 0.5             # far places that see the band in this share of 26 directions are sheltered
    enclosure_cells: int = 64          # ... measured on the net's grid pooled to about this many cells a side
    spacing_sample: int = 50_000       # points used to measure the spacing (a random subset of larger clouds)
    probe_points: int = 500            # points whose neighbourhood is probed for the network's surface
    vote_points: int = 4000            # grid places evaluated for the enclosed pieces' votes, at most 64 a piece
    vote_inside: float = 0.75          # an enclosed piece is made all inside from this share of inside votes ...
    vote_outside: float = 0.1          # ... all outside up to this share; in between the network's answer stands
    fill: bool = True                  # rebuild the thin parts the network lost from the hull ...
    thin: float = 0.08                 # ... those no deeper than this inside it (up to a sixth of the longest edge thick)
    far_cells: float = 2.0             # surface cut at least max(tau / 2, this many cells) beyond the hull counts as removed


@dataclass
class SupportReport:
    tau: float = 0.0                   # support radius, canonical units (longest edge of the input = 1)
    cells: int = 0                     # the net's grid, cells a side
    unexplained: float = 0.0           # fraction of the input points with no network surface near them
    filled_places: int = 0             # net grid places rebuilt from the hull
    enclosed_pieces: int = 0           # far pieces enclosed by the points
    trimmed: int = 0                   # evaluated points turned from inside to outside
    removed: int = 0                   # ... of them far outside the hull (SupportSettings.far_cells)
    added: int = 0                     # evaluated points turned from outside to inside
    network_evaluations: int = 0       # the net's own probes and votes
    seconds: float = 0.0               # building the net (the filter's own time is part of extraction's)

    @property
    def changed(self) -> bool:
        return self.removed > 0 or self.added > 0

    def as_stats(self) -> dict:
        return {"changed": self.changed, "tau": round(self.tau, 5), "cells": self.cells,
                "unexplained_points": round(self.unexplained, 4), "filled_places": self.filled_places,
                "enclosed_pieces": self.enclosed_pieces, "trimmed_evaluations": self.trimmed,
                "removed_evaluations": self.removed,
                "added_evaluations": self.added, "network_evaluations": self.network_evaluations,
                "seconds": round(self.seconds, 4)}

    def warning(self, points_surface: bool = False) -> str | None:
        """A sentence for the user when the net changed the result materially, else None.
        points_surface: the points' own surface corrected the grid (a dense cloud: pointfield), so
        what the net rebuilt lies on the points whatever the network missed."""
        parts = []
        if self.removed:
            parts.append("removed surface the network put far from every input point")
        if self.filled_places and self.unexplained >= WARN_UNEXPLAINED and not points_surface:
            parts.append(f"rebuilt from the points the parts the network missed ({self.unexplained:.0%} of the points "
                         f"had no surface near them)")
        if not parts:
            return None
        return "the point-cloud safety net " + " and ".join(parts) + ": check the result against the points"


def dilate(mask: np.ndarray, cube: bool = False) -> np.ndarray:
    """Binary dilation by one grid step: along the 6 face directions, or (cube) over the 3x3x3
    block, one axis at a time. Slicing, many times faster than scipy.ndimage's."""
    out = mask.copy()
    for axis in range(3):
        source = out if cube else mask
        grown = out.copy() if cube else out
        lo, hi = [slice(None)] * 3, [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        grown[tuple(hi)] |= source[tuple(lo)]
        grown[tuple(lo)] |= source[tuple(hi)]
        out = grown
    return out


def near_candidates(points: np.ndarray, low: float, spacing: float, n1: int, tau: float) -> np.ndarray:
    """Indices (M, 3) of the grid places (n1,)^3 at low + i * spacing that may lie within tau of a
    point (a superset): those in blocks of cells at least tau wide that hold a point, or next to one."""
    block = max(1, int(tau // spacing))
    nb = -(-n1 // block)
    cell = np.floor((points - low) / (spacing * block)).astype(np.int64)
    cell = cell[((cell >= 0) & (cell < nb)).all(axis=1)]
    occupied = np.zeros((nb,) * 3, dtype=bool)
    occupied[cell[:, 0], cell[:, 1], cell[:, 2]] = True
    index = np.arange(n1) // block
    return np.argwhere(dilate(occupied, cube=True)[np.ix_(index, index, index)])


DIRECTIONS = np.array([d for d in itertools.product((-1, 0, 1), repeat=3) if any(d)])


def shifted(a: np.ndarray, offset) -> np.ndarray:
    """out[x] = a[x + offset] for a 3D array, zero (False) where x + offset leaves it."""
    out = np.zeros_like(a)
    source = tuple(slice(max(o, 0), n + min(o, 0)) for n, o in zip(a.shape, offset))
    target = tuple(slice(max(-o, 0), n + min(-o, 0)) for n, o in zip(a.shape, offset))
    out[target] = a[source]
    return out


def pool_any(mask: np.ndarray, factor: int) -> np.ndarray:
    """Bool (n,)^3 -> (ceil(n / factor),)^3: does any place of each block hold?"""
    if factor == 1:
        return mask
    n = mask.shape[0]
    m = -(-n // factor)
    padded = np.zeros((m * factor,) * 3, dtype=bool)
    padded[:n, :n, :n] = mask
    return padded.reshape(m, factor, m, factor, m, factor).any(axis=(1, 3, 5))


def enclosure(blocked: np.ndarray, cells: int) -> np.ndarray:
    """For every place of a bool grid (n,)^3: the fraction of the 26 grid directions in which a ray
    from it meets a blocked place before leaving the grid, on a copy pooled to about `cells` a
    side (blocks count as blocked when any place in them is). Rays are ORs of shifted copies,
    doubled in length at each step: log2(cells) steps per direction."""
    n = blocked.shape[0]
    factor = max(1, n // cells)
    pooled = pool_any(blocked, factor)
    m = pooled.shape[0]
    hits = np.zeros(pooled.shape, dtype=np.uint8)
    for d in DIRECTIONS:
        ray = shifted(pooled, d)
        span = 1
        while span < m:
            ray |= shifted(ray, d * span)
            span *= 2
        hits += ray
    index = np.arange(n) // factor
    return (hits / len(DIRECTIONS))[np.ix_(index, index, index)]


def border_labels(labels: np.ndarray) -> np.ndarray:
    """The labels (> 0) found on the faces of a 3D label grid."""
    faces = [labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]]
    found = np.unique(np.concatenate([f.ravel() for f in faces]))
    return found[found > 0]


class SupportNet:
    """Build with the canonical input points (N, 3) and the query box, then prepare() with the
    network, then filter the network's values with wrap(). See the module's docstring."""

    def __init__(self, points: np.ndarray, box: tuple[float, float], settings: SupportSettings = SupportSettings(),
                 should_cancel: Callable[[], bool] | None = None):
        start = time.perf_counter()
        self.should_cancel = should_cancel
        self.settings = settings
        self.report = SupportReport()
        self.points = np.asarray(points, dtype=np.float64)
        self.low, high = box
        extent = high - self.low
        raw_tau = settings.spacing_multiple * median_spacing(self.points, settings.spacing_sample)
        self.cells = int(min(settings.max_cells, max(8, math.ceil(extent * settings.cells_per_tau / max(raw_tau, 1e-9)))))
        self.h = extent / self.cells
        self.tau = max(raw_tau, settings.min_cells * self.h)
        self.far = max(0.5 * self.tau, settings.far_cells * self.h)
        self.report.tau, self.report.cells = self.tau, self.cells
        n1 = self.cells + 1
        self.tree = NearestPoints(self.points)

        # The band: grid places within tau of a point, with their nearest point.
        candidates = near_candidates(self.points, self.low, self.h, n1, self.tau)
        distance, nearest = self.tree.query(self.low + candidates * self.h, distance_upper_bound=self.tau)
        close = np.isfinite(distance)
        self.band_idx, self.band_nearest = candidates[close], nearest[close]
        band = np.zeros((n1,) * 3, dtype=bool)
        band[tuple(self.band_idx.T)] = True
        self.band = band

        self.check_cancel()
        # The far region's pieces: those touching the border are the exterior; the others are enclosed.
        self.labels, self.count = ndimage.label(~band, structure=FACE_CONNECTIVITY)
        is_exterior = np.zeros(self.count + 1, dtype=bool)
        is_exterior[border_labels(self.labels)] = True
        exterior = is_exterior[self.labels] & (self.labels > 0)
        self.enclosed = ~band & ~exterior
        # Sheltered exterior places see the band in most directions: the inside of a scan whose bottom
        # or windows are missing. They are the network's call, not centres of carving balls.
        self.sheltered = exterior & (enclosure(band, settings.enclosure_cells) >= settings.sheltered)
        self.exterior = exterior & ~self.sheltered

        self.check_cancel()
        # Carving: every exterior place next to the band is the centre of an empty ball as wide as its
        # distance to the nearest point. The hull's field at a band place is its distance to the nearest
        # ball's sphere, negative inside a ball; only values near zero matter, so the search stops a few
        # cells beyond tau. Exterior places lie at -tau, enclosed ones deep inside.
        reach = 2 * self.h
        signed = np.full((n1,) * 3, reach, dtype=np.float32)
        band_signed = np.full(len(self.band_idx), reach, dtype=np.float32)
        shell_idx = np.argwhere(dilate(~self.exterior) & self.exterior)
        self.shell_tree = NearestPoints(shell_idx * self.h) if len(shell_idx) else None
        if len(shell_idx) and len(self.band_idx):
            radius, _ = self.tree.query(self.low + shell_idx * self.h)
            limit = self.tau + reach + self.h
            # Only band places within the limit of the exterior can be carved: a few cube dilations find
            # them (the inner half of the band of a bulky object is not searched at all).
            reachable = self.exterior
            for _ in range(int(math.ceil(limit / self.h))):
                reachable = dilate(reachable, cube=True)
            near = np.flatnonzero(reachable[tuple(self.band_idx.T)])
            k = min(settings.nearest_shell, len(shell_idx))
            to_shell, which = self.shell_tree.query(self.band_idx[near] * self.h, k=k,
                                                    distance_upper_bound=limit)
            to_shell, which = to_shell.reshape(-1, k), which.reshape(-1, k)
            valid = np.isfinite(to_shell)
            ball = np.where(valid, to_shell - radius[np.where(valid, which, 0)], np.inf).min(axis=1)
            band_signed[near] = np.minimum(ball, reach)
        signed[tuple(self.band_idx.T)] = band_signed
        signed[self.exterior] = -self.tau
        self.band_signed, self.signed = band_signed, signed
        self.upper = settings.slope * signed                      # values are cut to level + upper
        self.lower = np.full_like(self.upper, -settings.slope * (self.tau + reach))  # ... and raised to level + lower
        self.report.seconds = time.perf_counter() - start
        self._upper_t = self._lower_t = None

    def check_cancel(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled()

    # -- look-ups -----------------------------------------------------------------------------

    def _sample(self, grid: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Trilinear values (M,) of a grid tensor (n1,)^3 at points (M, 3) of the box."""
        normalised = (p.to(torch.float32) - self.low) * (2.0 / (self.h * self.cells)) - 1.0
        coords = normalised.flip(-1).reshape(1, 1, 1, -1, 3)    # grid_sample wants (x, y, z) = (W, H, D)
        return F.grid_sample(grid[None, None], coords, mode="bilinear", padding_mode="border",
                             align_corners=True).reshape(-1)

    def _tensors(self, device) -> None:
        self._upper_t = torch.from_numpy(self.upper).to(device)
        self._lower_t = torch.from_numpy(self.lower).to(device) if (self.lower > -self.settings.slope * self.tau).any() \
            else None

    def filter(self, p: torch.Tensor, values: torch.Tensor, level: float, count: bool = True) -> torch.Tensor:
        """Values (M,) of the network at points (M, 3) -> the net's values."""
        upper = self._sample(self._upper_t, p).to(values.dtype)
        out = torch.minimum(values, level + upper)
        if self._lower_t is not None:
            out = torch.maximum(out, level + self._sample(self._lower_t, p).to(values.dtype))
        if count:
            before, after = values > level, out > level
            cut = before & ~after
            self.report.trimmed += int(cut.sum())
            # Removed: inside places far beyond the hull, not the hull's scallops between points nor, over
            # dense points, the network's own surface a cell or so outside them.
            self.report.removed += int((cut & (upper < -self.settings.slope * self.far)).sum())
            self.report.added += int((~before & after).sum())
        return out

    def wrap(self, evaluate, level: float):
        """evaluate(points) -> values, filtered by the net."""
        return lambda p: self.filter(p, evaluate(p), level)

    def thin_parts(self, candidates: np.ndarray) -> np.ndarray:
        """Of a bool grid of places to fill, the connected parts that are thin: no place deeper than
        settings.thin inside the hull (its depth: the distance to the nearest exterior place next to the
        band, less tau). The network is trusted with bulky parts; thin ones are where it fails, and where
        the points alone outline the solid."""
        if not candidates.any() or self.shell_tree is None:
            return np.zeros_like(candidates)
        labels, count = ndimage.label(candidates, structure=FACE_CONNECTIVITY)
        places = np.argwhere(candidates)
        limit = self.settings.thin + self.tau + self.h
        distance, _ = self.shell_tree.query(places * self.h, distance_upper_bound=limit)
        deep = ~np.isfinite(distance) | (distance - self.tau > self.settings.thin)
        keep = np.ones(count + 1, dtype=bool)
        keep[0] = False
        keep[labels[tuple(places[deep].T)]] = False
        return keep[labels]

    # -- the network's own evidence -------------------------------------------------------------

    def prepare(self, evaluate, level: float, device, batch_points: int = 65536) -> "SupportNet":
        """Probe the network (evaluate(points (M, 3) tensor) -> values (M,)) near the points and in
        the enclosed pieces, and build the fill. Call under torch.inference_mode()."""
        start = time.perf_counter()
        settings = self.settings
        self._tensors(device)
        rng = np.random.default_rng(0)

        def inside(places: np.ndarray) -> np.ndarray:
            if len(places) == 0:
                return np.zeros(0, dtype=bool)
            self.report.network_evaluations += len(places)
            out = []
            step = min(batch_points, 4096)  # small batches: a cancel lands within one
            for begin in range(0, len(places), step):
                self.check_cancel()
                p = torch.from_numpy(places[begin:begin + step].astype(np.float32)).to(device)
                out.append((self.filter(p, evaluate(p), level, count=False) > level).cpu().numpy())
            return np.concatenate(out)

        # Enclosed pieces: the network's majority vote over a random sample of each piece's places.
        enclosed_labels = self.labels[self.enclosed]
        enclosed_idx = np.argwhere(self.enclosed)
        piece_inside = np.zeros(self.count + 1, dtype=bool)
        piece_outside = np.zeros(self.count + 1, dtype=bool)
        if len(enclosed_labels):
            pieces = np.unique(enclosed_labels)
            self.report.enclosed_pieces = len(pieces)
            order = rng.permutation(len(enclosed_labels))
            ranked = order[np.argsort(enclosed_labels[order], kind="stable")]
            first = np.searchsorted(enclosed_labels[ranked], pieces)
            rank = np.arange(len(ranked)) - np.repeat(first, np.diff(np.append(first, len(ranked))))
            per_piece = max(4, min(64, settings.vote_points // len(pieces)))
            chosen = ranked[rank < per_piece]
            votes = inside(self.low + enclosed_idx[chosen] * self.h)
            yes = np.bincount(enclosed_labels[chosen], weights=votes.astype(np.float64), minlength=self.count + 1)
            asked = np.bincount(enclosed_labels[chosen], minlength=self.count + 1)
            share = yes / np.maximum(asked, 1)
            piece_inside = (asked > 0) & (share >= settings.vote_inside)
            piece_outside = (asked > 0) & (share <= settings.vote_outside)

        # Unexplained points: the network, cut to the hull, is nowhere inside within tau / 2 of them.
        tested = np.arange(len(self.points)) if len(self.points) <= settings.probe_points else \
            rng.choice(len(self.points), settings.probe_points, replace=False)
        probes = self.points[tested][:, None, :] + 0.5 * self.tau * PROBE_DIRECTIONS[None]
        explained = inside(probes.reshape(-1, 3)).reshape(len(tested), -1).any(axis=1)
        # Probes that land in an enclosed piece voted inside explain their point too.
        ijk = np.clip(np.rint((probes - self.low) / self.h).astype(np.int64), 0, self.cells)
        probe_labels = self.labels[ijk[..., 0], ijk[..., 1], ijk[..., 2]]
        explained |= (self.enclosed[ijk[..., 0], ijk[..., 1], ijk[..., 2]] & piece_inside[probe_labels]).any(axis=1)
        self.report.unexplained = float(1.0 - explained.mean()) if len(tested) else 0.0

        # The upper field: enclosed pieces voted outside are cut away; the others stay as the network says.
        outside_pieces = self.enclosed & piece_outside[self.labels]
        self.upper[outside_pieces] = -settings.slope * self.tau
        fill = np.zeros_like(self.band)
        if settings.fill and not explained.all():
            if len(tested) == len(self.points):
                unexplained = ~explained
            else:  # every point takes the flag of its nearest tested point
                _, which = NearestPoints(self.points[tested]).query(self.points)
                unexplained = ~explained[which]
            chosen = unexplained[self.band_nearest] & (self.band_signed > 0)
            fill[tuple(self.band_idx[chosen].T)] = True
            if len(enclosed_labels):  # enclosed pieces bordered mostly by chosen places join them
                rim = dilate(self.band) & self.enclosed
                touched = dilate(fill) & self.enclosed
                share = np.bincount(self.labels[touched], minlength=self.count + 1) > \
                    0.5 * np.maximum(np.bincount(self.labels[rim], minlength=self.count + 1), 1)
                fill |= self.enclosed & share[self.labels]
            fill = self.thin_parts(fill)
            # The fill follows the hull's own field, on its places and their neighbours (so that its surface
            # lies where the hull's does, not halfway to a far-below value); neighbours stay outside.
            rim = dilate(fill, cube=True) & ~fill
            self.lower[rim] = np.where(self.signed[rim] > 0, -0.5 * self.h, self.signed[rim]) * settings.slope
            self.lower[fill] = self.signed[fill] * settings.slope
            core = fill & self.enclosed
            self.lower[core] = self.upper[core] = settings.slope * 2 * self.h
        # Enclosed pieces voted inside are all inside.
        inside_pieces = self.enclosed & piece_inside[self.labels]
        self.lower[inside_pieces] = settings.slope * 2 * self.h
        self.report.filled_places = int(fill.sum())
        self._tensors(device)
        self.report.seconds += time.perf_counter() - start
        return self
