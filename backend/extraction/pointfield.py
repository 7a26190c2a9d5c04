"""Over dense point clouds, the points' own surface corrects the network's grid before marching cubes.

The network decides what is inside from a subsample, and its surface is only as precise as its
feature planes: on dense scans it fills concave corners (up to 0.08 of the box deep on a rocker
arm at 300,000 points) and rounds edges. The refinement (refine.py) moves vertices onto the
points, but a limited distance per round and without changing the mesh's topology, so a filled
corner stays a fillet. Where the points sample the surface at least as densely as the grid
(median spacing at most `max_spacing_cells` cells) and lie close to it (the cleanest tenth of
their neighbourhoods within `max_noise_cells` of a plane), they say better than the network where
the surface is, so the grid is corrected from them (from a covering subset about
`field_spacing_cells` apart when they are denser: more adds time, not precision):

  * Normals: the smallest principal direction of each point's nearest points (a scan's own
    normals measured no better on validation: docs/performance.md, "Do input normals help?").
    They are oriented by the network's grid (the inside behind: the grid's value half a
    cell behind the point above the one half a cell in front), and points that the grid orients
    only weakly then take their orientation from the strongly oriented ones, passed on from
    neighbour to neighbour (orientation_spread).
  * A signed distance to the points' surface at every grid place within `band_cells` of a point:
    the Gaussian-weighted median of its distances to the tangent planes of its nearest points (a
    robust implicit moving least squares surface: a few wrongly oriented points, or the far face
    of a thin part, do not move it).
  * Where that distance is more than `margin_cells` from zero its side is trusted: the grid value
    becomes the level plus `slope` times the distance. Nearer the surface the network's value
    stands, so a sheet thinner than a cell keeps the network's thickness and the refinement
    places the surface. The points add inside only within `grow_cells` of the network's own
    surface: where the grid orients a thin part's points the wrong way round (its two faces
    closer than the network can tell apart), they would grow slabs beside it.
  * The places beyond the band fall into face-connected pieces. A piece whose trusted neighbours
    in the band say inside (outside) `piece_vote` of the time is made inside (outside): a corner
    the network filled, cut off by the band, does not float in it. A piece that joins the inside
    to the outside (through a hole in the scan) keeps the network's values.
  * After marching cubes, pieces of the mesh away from every point are dropped
    (without_far_pieces): bubbles the network left inside the body.

On an open scan at 256^3 the corrected grid can hold hundreds of small tunnels that the
decimation cannot keep closed; the pipeline then extracts the network's own surface once more and
uses that instead.

Chosen on the validation split (docs/performance.md, "Thirteenth session"), never on the benchmark.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage

from ..errors import Cancelled
from .nearest import NearestPoints
from .refine import smallest_eigenvectors
from .spacing import thinned_indices
from .support import FACE_CONNECTIVITY, near_candidates

# The noise of a cloud is read off its cleanest neighbourhoods: where a neighbourhood spans both
# faces of a thin part or an edge, its spread says nothing about the noise.
NOISE_PERCENTILE = 10


@dataclass(frozen=True)
class PointFieldSettings:
    max_spacing_cells: float = 1.0   # correct only when the points' median spacing is at most this many cells
    max_noise_cells: float = 0.2     # ... and they lie this close to their local planes (NOISE_PERCENTILE's root mean square)
    field_spacing_cells: float | None = 0.4  # denser clouds: a covering subset about this many cells apart
    neighbours: int = 16             # points per normal and per distance
    band_cells: float = 2.5          # the distance is measured this many cells around the points
    margin_cells: float = 0.25       # ... and trusted where it is further than this from the surface
    sigma_spacings: float = 2.0      # Gaussian weight width, in median spacings of the points
    orient_cells: float = 0.5        # the grid is read this far before and behind each point
    weak_share: float = 0.5          # points the grid orients less than this share of the median strength
                                     # take their side from their neighbours (orientation_spread)
    grow_cells: float | None = 0.5   # the points add inside only this near the network's surface (None: anywhere)
    piece_vote: float = 0.9          # share of a far piece's band neighbours that decides its side
    slope: float = 500.0             # logits per unit length (about the network's own)


@dataclass
class PointFieldReport:
    applied: bool = False
    undone: bool = False        # applied, then given up: its mesh could not be decimated closed
    points: int = 0             # points the field was measured from (a covering subset of a denser cloud)
    noise_cells: float = 0.0    # their distance from their local planes (NOISE_PERCENTILE), in grid cells
    corrected: int = 0          # grid places whose side the points changed
    pieces_inside: int = 0      # far pieces made inside
    pieces_outside: int = 0     # ... and outside
    bubbles: int = 0            # pieces of the mesh dropped for lying away from the points (without_far_pieces)
    seconds: float = 0.0

    def as_stats(self) -> dict:
        return {"applied": self.applied, "undone": self.undone, "points": self.points, "noise_cells": round(self.noise_cells, 4),
                "corrected_places": self.corrected, "pieces_inside": self.pieces_inside,
                "pieces_outside": self.pieces_outside, "bubbles": self.bubbles, "seconds": round(self.seconds, 4)}


def dense_enough(spacing: float, cell: float, settings: PointFieldSettings = PointFieldSettings()) -> bool:
    """Do points with this median spacing sample the surface densely enough for a grid of this cell size?"""
    return 0.0 < spacing <= settings.max_spacing_cells * cell


def principal_normals(points: np.ndarray, neighbours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit normals (N, 3), unoriented, of points (N, 3): the smallest principal direction of each
    point's nearest points, given as indices (N, K); and the root mean square distance (N,) of
    those points from the plane through their mean with that normal (noise, or curvature)."""
    near = points[neighbours]                                       # (N, K, 3)
    centred = near - near.mean(axis=1, keepdims=True)
    c = np.einsum("nki,nkj->nij", centred, centred)
    normals = smallest_eigenvectors(c[:, 0, 0], c[:, 0, 1], c[:, 0, 2], c[:, 1, 1], c[:, 1, 2], c[:, 2, 2])
    spread = np.einsum("ni,nij,nj->n", normals, c, normals) / neighbours.shape[1]
    return normals, np.sqrt(np.maximum(spread, 0.0))


def grid_values_at(values: np.ndarray, box_min: float, cell: float, at: np.ndarray) -> np.ndarray:
    """Trilinear interpolation (M,) of a grid (n,)^3 at points (M, 3); the border value beyond it."""
    return ndimage.map_coordinates(values, ((at - box_min) / cell).T, order=1, mode="nearest")


def oriented_by_grid(points: np.ndarray, normals: np.ndarray, neighbours: np.ndarray, values: np.ndarray,
                     box_min: float, cell: float, settings: PointFieldSettings) -> np.ndarray:
    """normals (N, 3) of points (N, 3) turned outwards: by the grid (inside = larger values) where
    it orients them strongly, and from there along the points' neighbour graph (N, K) to those
    it orients weakly (orientation_spread). Weak: the grid's values half a cell behind and in
    front of the point differ by less than settings.weak_share of the median difference, or do
    so at most of its neighbours; so it is on the walls of a slot narrower than the network can
    see (a mouth, the gap between two legs), which the network fills, so that it is inside on
    both sides of them."""
    step = settings.orient_cells * cell
    difference = grid_values_at(values, box_min, cell, points - step * normals) - \
        grid_values_at(values, box_min, cell, points + step * normals)
    normals = np.where((difference < 0)[:, None], -normals, normals)
    strength = np.abs(difference)
    strong_enough = settings.weak_share * np.median(strength)
    # A few points the grid orients strongly amid weak ones pass on nothing: often enough they are
    # the wrong way round (four such on a face of fandisk at 300,000 points turned the whole face).
    sure = (strength >= strong_enough) & (np.median(strength[neighbours], axis=1) >= strong_enough)
    return orientation_spread(normals, neighbours, np.where(sure, strength, 0.0))


def orientation_spread(normals: np.ndarray, neighbours: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """normals (N, 3), of which those with confidence (N,) > 0 are oriented, with the others
    oriented from them: round after round, each point not yet oriented beside oriented ones (its
    row of neighbours (N, K)) takes the side their normals vote for, each vote weighted by its
    confidence, and then counts as oriented with its most confident voter's confidence. Like the
    orientation of normals over a neighbour graph (Hoppe et al.), so a slot's walls take their
    side from the open surface at its mouth, however deep; points no oriented one reaches keep
    theirs."""
    normals, confidence = normals.copy(), confidence.astype(np.float64).copy()
    while True:
        pending = np.flatnonzero(confidence == 0.0)
        around = neighbours[pending]                                                     # (M, K)
        voters = confidence[around]
        agreement = np.einsum("mki,mi->mk", normals[around], normals[pending])
        vote = np.einsum("mk,mk->m", voters, agreement)
        reached = (voters > 0.0).any(axis=1) & (vote != 0.0)
        if not reached.any():
            return normals
        rows = pending[reached]
        normals[rows[vote[reached] < 0.0]] *= -1.0
        confidence[rows] = voters[reached].max(axis=1)   # > 0: a reached point had a confident voter


def inside_distance(points: np.ndarray, normals: np.ndarray, tree: NearestPoints, places: np.ndarray,
                    band: float, sigma: float, neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """At grid points places (M, 3): the signed distance (M,) of the points' surface, positive
    inside (the weighted median of the distances to the tangent planes of the nearest `neighbours`
    points (N, 3) with outward normals (N, 3), Gaussian weights of width sigma), and whether any
    point lies within band (M,)."""
    distances, index = tree.query(places, k=neighbours, distance_upper_bound=band)
    found = np.isfinite(distances)
    index = np.where(found, index, 0)
    weights = np.where(found, np.exp(-(np.where(found, distances, 0.0) / sigma) ** 2), 0.0)
    weights[:, 0] = np.maximum(weights[:, 0], 1e-12)                 # the nearest point always counts
    offsets = np.einsum("mki,mki->mk", places[:, None, :] - points[index], normals[index])
    return -weighted_median(offsets, weights), found[:, 0]


def weighted_median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per row of values (M, K) with weights (M, K) >= 0: the weighted median (M,)."""
    order = np.argsort(values, axis=1)
    values, weights = np.take_along_axis(values, order, 1), np.take_along_axis(weights, order, 1)
    cumulative = np.cumsum(weights, axis=1)
    middle = np.argmax(cumulative >= 0.5 * cumulative[:, -1:], axis=1)
    return values[np.arange(len(values)), middle]


def piece_sides(far_labels: np.ndarray, pieces: int, trusted: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Share (pieces + 1,) of each far piece's face neighbours among the trusted band places that
    are inside; 0.5 for a piece with none. far_labels (n,)^3 int (0: not far), trusted and
    inside bool (n,)^3."""
    votes = np.zeros(pieces + 1)
    counts = np.zeros(pieces + 1)
    for axis in range(3):
        for here, there in ((slice(1, None), slice(None, -1)), (slice(None, -1), slice(1, None))):
            a, b = [slice(None)] * 3, [slice(None)] * 3
            a[axis], b[axis] = here, there
            labels = far_labels[tuple(a)]
            mask = (labels > 0) & trusted[tuple(b)]
            votes += np.bincount(labels[mask], weights=inside[tuple(b)][mask], minlength=pieces + 1)
            counts += np.bincount(labels[mask], minlength=pieces + 1)
    return np.where(counts > 0, votes / np.maximum(counts, 1), 0.5)


class PointField:
    """The points' own surface over a dense cloud, for a grid of cell size `cell`: build it with the
    canonical points (N, 3) and their median spacing, then correct() the network's grid and drop the bubbles from the mesh marching cubes gives
    (without_bubbles). See the module's docstring; report says what it did."""

    def __init__(self, points: np.ndarray, spacing: float, cell: float,
                 settings: PointFieldSettings = PointFieldSettings()):
        start = time.perf_counter()
        self.settings, self.cell = settings, cell
        self.points = np.asarray(points, dtype=np.float64)
        self.spacing = spacing
        if settings.field_spacing_cells is not None and spacing < settings.field_spacing_cells * cell:
            subset = thinned_indices(self.points, spacing, settings.field_spacing_cells * cell)
            self.points, self.spacing = self.points[subset], settings.field_spacing_cells * cell
        self.tree = NearestPoints(self.points)
        if len(self.points) < settings.neighbours:
            # A spacing that undersells the cloud (pairs of points far closer than the rest) thins it to
            # a handful: too few for one plane, so the grid stays the network's.
            self.report = PointFieldReport(applied=False, points=len(self.points), seconds=time.perf_counter() - start)
            return
        _, self.neighbours = self.tree.query(self.points, k=settings.neighbours)
        self.principal, spread = principal_normals(self.points, self.neighbours)
        noise = float(np.percentile(spread, NOISE_PERCENTILE)) / cell
        self.report = PointFieldReport(applied=noise <= settings.max_noise_cells, points=len(self.points),
                                       noise_cells=noise, seconds=time.perf_counter() - start)

    def correct(self, values: np.ndarray, level: float, box_min: float,
                should_cancel: Callable[[], bool] | None = None) -> None:
        """Correct the grid values (n,)^3 (inside > level, index i at box_min + i * cell) in place,
        unless the points are too noisy (report.applied)."""
        if not self.report.applied:
            return
        start = time.perf_counter()
        settings, cell, report = self.settings, self.cell, self.report
        _check_cancel(should_cancel)
        outward = oriented_by_grid(self.points, self.principal, self.neighbours, values, box_min, cell, settings)
        _check_cancel(should_cancel)

        band = settings.band_cells * cell
        places = near_candidates(self.points, box_min, cell, values.shape[0], band)
        distance, near = inside_distance(self.points, outward, self.tree, box_min + places * cell, band,
                                         settings.sigma_spacings * self.spacing, settings.neighbours)
        places, distance = places[near], distance[near]
        _check_cancel(should_cancel)

        in_band = np.zeros(values.shape, dtype=bool)
        in_band[tuple(places.T)] = True
        sure = np.abs(distance) > settings.margin_cells * cell
        if settings.grow_cells is not None:
            network = values[tuple(places.T)]
            sure &= (distance < 0) | (network > level - settings.slope * settings.grow_cells * cell)
        trusted = np.zeros(values.shape, dtype=bool)
        trusted[tuple(places[sure].T)] = True
        inside = np.zeros(values.shape, dtype=bool)
        inside[tuple(places[distance > 0].T)] = True

        far_labels, pieces = ndimage.label(~in_band, FACE_CONNECTIVITY)
        share = piece_sides(far_labels, pieces, trusted, inside)
        _check_cancel(should_cancel)

        before = values > level
        values[tuple(places[sure].T)] = level + settings.slope * distance[sure]
        deep = level + settings.slope * band
        made_inside, made_outside = share >= settings.piece_vote, share <= 1.0 - settings.piece_vote
        made_inside[0] = made_outside[0] = False
        side = made_inside[far_labels]
        values[side] = np.maximum(values[side], deep)
        side = made_outside[far_labels]
        values[side] = np.minimum(values[side], 2.0 * level - deep)
        report.corrected = int(np.count_nonzero(before != (values > level)))
        report.pieces_inside, report.pieces_outside = int(made_inside.sum()), int(made_outside.sum())
        report.seconds += time.perf_counter() - start

    def without_bubbles(self, vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The mesh (V, 3) / (F, 3) of the corrected grid without its pieces away from the points
        (without_far_pieces, a cell's reach)."""
        start = time.perf_counter()
        vertices, faces, self.report.bubbles = without_far_pieces(vertices, faces, self.tree, self.cell)
        self.report.seconds += time.perf_counter() - start
        return vertices, faces


def without_far_pieces(vertices: np.ndarray, faces: np.ndarray, points: NearestPoints, reach: float
                       ) -> tuple[np.ndarray, np.ndarray, int]:
    """The mesh (V, 3) / (F, 3) without its connected pieces (other than the largest) whose vertices
    lie mostly (median) further than reach from every point (a tree of them): over a dense cloud every real
    surface runs through the points, so such a piece is a bubble the network left inside the body.
    Returns the vertices and faces left (renumbered) and how many pieces were dropped."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    count = len(vertices)
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]]])
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(count, count))
    pieces, piece = connected_components(graph, directed=False)
    if pieces == 1:
        return vertices, faces, 0
    face_piece = piece[faces[:, 0]]
    distance, _ = points.query(vertices, distance_upper_bound=reach)
    near = np.bincount(piece, weights=np.isfinite(distance), minlength=pieces)
    far = near < 0.5 * np.bincount(piece, minlength=pieces)       # the median vertex is beyond reach
    far[np.bincount(face_piece, minlength=pieces).argmax()] = False
    far &= np.bincount(face_piece, minlength=pieces) > 0
    if not far.any():
        return vertices, faces, 0
    kept = faces[~far[face_piece]]
    used = np.unique(kept)
    renumber = np.zeros(count, faces.dtype)
    renumber[used] = np.arange(len(used), dtype=faces.dtype)
    return vertices[used], renumber[kept], int(far.sum())


def _check_cancel(should_cancel: Callable[[], bool] | None) -> None:
    if should_cancel is not None and should_cancel():
        raise Cancelled()
