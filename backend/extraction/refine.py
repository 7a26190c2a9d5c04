"""Test-time refinement of a mesh extracted from a point-cloud model: shrink-wrap it onto the
input points.

The network decides what is inside (the topology, the parts the points only hint at), but its
surface is only as precise as its feature planes: a plane cell is ~1/64 of the box, and on shapes
unlike the training data the surface can sit a few cells away from the points. The input points
are measured data. So, a few rounds of:
  * move every vertex with enough input points around it onto a moving-least-squares plane of
    those points (Gaussian weights at the scale of the nearest few points, so the plane is local
    even where the neighbourhood is wide), by at most `max_move` per round; where the mesh is
    bulky, onto a quadratic height field over that plane instead (a plane's centroid lies inside a
    curved surface; on thin parts the wider fit would reach the far face);
  * a few steps of Taubin smoothing (trimesh's), so neighbouring vertices move together and the
    mesh stays a clean surface rather than a set of independently snapped points, with the steps'
    shrink put back (without_shrink); over points much denser than the mesh only the smoothing's
    part along the surface (sliding_part), so that it does not pull the surface back out of
    concave corners.
Faces never change, so the mesh stays watertight. Parameters were chosen on the validation split
of our own training data (never on the benchmark meshes); see backend/weights/MODEL_CARD.md.

Speed (docs/performance.md): the fits' weights reach a few point spacings, wider than a grid cell
where the points are sparser than the mesh, so vertices share them: one local surface per fitting
site, a cube about one point spacing wide holding the vertices that face the same way
(fitting_sites), fitted at their mean and evaluated at each vertex (its quadratic height field
above the vertex, not only its plane). After the first rounds most sites move by a fraction of the
spacing of the points. Each site remembers its last surface and keeps it while it has moved less
than `refit_spacing` times the points' spacing since (0: refit every round); it remembers
SPARE_NEIGHBOURS more nearest points than a fit uses, and searches the tree again only when it has
moved so far that its nearest points may have changed (search_neighbours says why that is exact). The plane normal is the
covariance's smallest eigenvector in closed form. With site_spacing 0 and refit_spacing 0 the
planes are those of a fresh search and a LAPACK eigensolver at every vertex every round, to float
rounding.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
from scipy import ndimage

from ..errors import Cancelled
from ..preprocess import bounding_box
from .marching import MeshArrays, averaging_operator
from .nearest import NearestPoints
from .spacing import median_spacing


@dataclass(frozen=True)
class RefineSettings:
    rounds: int = 5              # project + smooth rounds
    max_move: float = 0.03       # per round, canonical units (longest edge of the input = 1)
    radius: float = 0.2          # input points further than this from a vertex are ignored
    neighbours: int = 16         # input points per plane fit (beyond ~16 the Gaussian weights vanish)
    weight_rank: int = 4         # Gaussian weight width = distance to this nearest neighbour
    min_neighbours: int = 6      # fewer points within radius: the vertex keeps the network's position
    smoothing_steps: int = 3     # Taubin steps per round
    refit_spacing: float = 0.5    # a site that moved less than this many times the points' median
                                  # spacing since its last fit keeps that fit (0: refit every round)
    sheet_reach: float | None = 0.06  # faces closer than this make a thin part, whose far face's points
                                      # a vertex leaves out (without_far_sheet); None: all count
    curved_neighbours: int | None = 32  # where the mesh is bulky (no far face within sheet_reach), a
                                        # quadratic height field over this many nearest points instead
                                        # of the plane (on a curved surface a plane's centroid lies
                                        # inside it); None: planes everywhere
    curved_weight_rank: int = 12  # its Gaussian weight width = distance to this nearest neighbour
    site_spacing: float = 1.0     # vertices share fits: one per cube of this many times the points'
                                  # median spacing and per facing direction (fitting_sites); 0: one each
    dense_slide: float | None = 0.45  # where the points' median spacing is below this many times the mesh's
                                      # median edge, the rounds' smoothing only slides vertices along the
                                      # surface (sliding_part); None: never
    shrink_cell: float | None = 10.0  # elsewhere the smoothing's shrink, its displacement along the normals
                                      # averaged over cells of this many median edges, is put back
                                      # (without_shrink); None: kept


# Each vertex keeps this many more of its nearest points than a plane fit uses. The more it keeps,
# the further it may move before it has to search again (see search_neighbours); 8 more make the
# rounds after the first search for few vertices (docs/performance.md).
SPARE_NEIGHBOURS = 8
# median_edge measures about this many of a mesh's faces (evenly strided; all 62k faces of a 128^3
# sphere took 8.8 ms, 4096 of them 0.55 ms, with the median the same to four digits)
EDGE_SAMPLE_FACES = 4096
# local_thickness: inward probes per vertex, evenly spaced up to the reach
THICKNESS_PROBES = 2
# without_far_sheet: a far face needs this many points on each side, and this share of the
# thickness between the two sides' means (a single noisy layer split at its middle has far less)
MIN_LAYER_POINTS = 3
TWO_LAYERS = 0.6


@dataclass
class SiteMemory:
    """What the refinement keeps of each fitting site (fitting_sites) from one round to the next:
    its search and its local surface (fit_local_surfaces). Rows of a block are views (`rows`), so
    a block's updates land in the whole."""
    candidates: np.ndarray  # (S, C) int64 the C nearest points within the radius when searched; len(points): none
    searched_at: np.ndarray  # (S, 3) float64 where the site was then
    slack: np.ndarray        # (S,) float64 while closer than this to searched_at, its k nearest are candidates
    fitted_at: np.ndarray    # (S, 3) float64 where the site was at its last fit (inf: never fitted)
    usable: np.ndarray       # (S,) bool the fit had settings.min_neighbours points or more
    origin: np.ndarray       # (S, 3) float64 the fitted plane's point (the points' weighted centroid)
    normal: np.ndarray       # (S, 3) float64 its unit normal, along which vertices move
    frame: np.ndarray        # (S, 3, 3) float32 tangent, tangent, normal: the height field's axes
    spread: np.ndarray       # (S,) float32 the height field's unit of tangent length
    coefficients: np.ndarray  # (S, 6) float64 the height field's (monomials); zero: the plane

    @classmethod
    def empty(cls, count: int, candidates: int) -> "SiteMemory":
        """Nothing searched or fitted: the first round does both for every site."""
        return cls(np.empty((count, candidates), np.int64), np.full((count, 3), np.inf), np.zeros(count),
                   np.full((count, 3), np.inf), np.zeros(count, bool), np.zeros((count, 3)), np.zeros((count, 3)),
                   np.zeros((count, 3, 3), np.float32), np.ones(count, np.float32), np.zeros((count, 6)))

    def rows(self, block: slice) -> "SiteMemory":
        return SiteMemory(*(getattr(self, f.name)[block] for f in fields(self)))


@dataclass
class LocalSurfaces:
    """Fitted local surfaces of S sites (fit_local_surfaces)."""
    origin: np.ndarray        # (S, 3) float64 the plane's point (the points' weighted centroid)
    normal: np.ndarray        # (S, 3) float64 unit normal
    usable: np.ndarray        # (S,) bool fitted to settings.min_neighbours points or more
    frame: np.ndarray         # (S, 3, 3) float32 the height field's axes (quadratic_fit)
    spread: np.ndarray        # (S,) float32
    coefficients: np.ndarray  # (S, 6) float64; zero where the surface is the plane


def fitted_count(settings: RefineSettings) -> int:
    """The most nearest points any fit uses."""
    return max(settings.neighbours, settings.curved_neighbours or 0)


def search_neighbours(vertices: np.ndarray, tree: NearestPoints, settings: RefineSettings) -> tuple[np.ndarray, np.ndarray]:
    """Candidates (V, C) and slack (V,) of vertices (V, 3): the C = fitted_count(settings) +
    SPARE_NEIGHBOURS nearest points within settings.radius. A point that is no candidate lies at
    least d_C = min(C-th distance, radius) from where the vertex was, and its k-th nearest candidate
    at d_k; each changes by at most the vertex's move, so while it moves less than
    (d_C - min(d_k, radius)) / 2 its k nearest points within the radius are all candidates."""
    k = min(fitted_count(settings), tree.n)
    count = k + SPARE_NEIGHBOURS
    distances, index = tree.query(vertices, k=count, distance_upper_bound=settings.radius)
    bounded = np.minimum(distances.reshape(len(vertices), count), settings.radius)
    return index.reshape(len(vertices), count), 0.5 * (bounded[:, count - 1] - bounded[:, k - 1])


def smallest_eigenvectors(a00, a01, a02, a11, a12, a22) -> np.ndarray:
    """Unit eigenvectors (V, 3) of the smallest eigenvalue of the symmetric 3x3 matrices whose upper
    triangles are the arrays (V,), in closed form (float64): eigenvalues by the trigonometric
    method, the eigenvector as the longest cross product of two rows of (A - smallest I). Where the
    two smallest eigenvalues (nearly) coincide, the points on a line or at one spot, every vector of
    their plane is as good and LAPACK picks one."""
    a00, a01, a02, a11, a12, a22 = (np.asarray(x, np.float64) for x in (a00, a01, a02, a11, a12, a22))
    mean = (a00 + a11 + a22) / 3.0
    b00, b11, b22 = a00 - mean, a11 - mean, a22 - mean
    p = np.maximum(np.sqrt((b00 * b00 + b11 * b11 + b22 * b22 + 2.0 * (a01 * a01 + a02 * a02 + a12 * a12)) / 6.0),
                   1e-90)
    det = b00 * (b11 * b22 - a12 * a12) - a01 * (a01 * b22 - a12 * a02) + a02 * (a01 * a12 - b11 * a02)
    angle = np.arccos(np.clip(det / (2.0 * p ** 3), -1.0, 1.0)) / 3.0
    smallest = mean + 2.0 * p * np.cos(angle + 2.0 * np.pi / 3.0)
    rows = np.stack([np.stack([a00 - smallest, a01, a02], -1), np.stack([a01, a11 - smallest, a12], -1),
                     np.stack([a02, a12, a22 - smallest], -1)], axis=1)                    # (V, 3, 3)
    crosses = np.cross(rows[:, [0, 0, 1]], rows[:, [1, 2, 2]])                          # (V, 3, 3)
    lengths = np.einsum("vij,vij->vi", crosses, crosses)
    best = lengths.argmax(axis=1)
    longest = np.take_along_axis(lengths, best[:, None], axis=1)[:, 0]
    vectors = np.take_along_axis(crosses, best[:, None, None], axis=1)[:, 0] / np.sqrt(np.maximum(longest, 1e-300))[:, None]
    # Near-equal smallest eigenvalues make every cross product short: hand those few to LAPACK.
    unsure = longest <= 1e-8 * np.einsum("vij,vij->v", rows, rows) ** 2
    if unsure.any():
        vectors[unsure] = np.linalg.eigh(rows[unsure] + smallest[unsure, None, None] * np.eye(3))[1][:, :, 0]
    return vectors


def local_thickness(probed: np.ndarray, facing: np.ndarray, surface: np.ndarray, surface_normals: np.ndarray,
                    reach: float, should_cancel: Callable[[], bool] | None = None) -> np.ndarray:
    """(V,) how thin a mesh is at its vertices probed (V, 3) with unit outward normals facing
    (V, 3), against samples of its surface (M, 3) with unit outward normals (M, 3) (the vertices
    themselves, or fewer: the refinement passes its fitting sites' means, a dozen times fewer at
    256^3; on validation every mean within 0.0005 at 3000 points, normal consistency 0.002 lower
    at 300: docs/performance.md section 4): probes step inwards along `facing` up to
    `reach`; where the sample nearest a probe faces the other way (normals more than 120 degrees
    apart), the far face is that sample's depth behind the vertex. inf where no probe meets one
    (bulky parts). should_cancel() is checked before each block of PROJECTION_BLOCK vertices."""
    tree = NearestPoints(surface)
    thickness = np.full(len(probed), np.inf)
    for start in range(0, len(probed), PROJECTION_BLOCK):
        check_cancel(should_cancel)
        block = slice(start, start + PROJECTION_BLOCK)
        here, inwards = probed[block], facing[block]
        for depth in reach * np.arange(1, THICKNESS_PROBES + 1) / THICKNESS_PROBES:
            # The probe's own place lies `depth` away, so a far face inside the reach is nearer: the
            # bound prunes the search (1.5x faster where probes sit deep in bulky parts), and a
            # probe that finds nothing within it is in a bulky part.
            _, nearest = tree.query(here - depth * inwards, distance_upper_bound=depth * 1.001 + 1e-9)
            found = nearest < len(surface)
            nearest = np.minimum(nearest, len(surface) - 1)
            behind = -np.einsum("vi,vi->v", surface[nearest] - here, inwards)
            opposite = found & (np.einsum("vi,vi->v", surface_normals[nearest], inwards) < -0.5) & (behind > 0.0)
            thickness[block] = np.where(opposite, np.minimum(thickness[block], behind), thickness[block])
    return thickness


def without_far_sheet(vertices: np.ndarray, candidates: np.ndarray, points: np.ndarray, facing: np.ndarray,
                      thickness: np.ndarray) -> np.ndarray:
    """Candidates (V, C) of vertices (V, 3) among points (P, 3) with those on a thin part's far
    face replaced by len(points), none: the points more than half the local thickness (V,)
    (local_thickness) behind the vertex along its outward normal facing (V, 3), where the points
    show two layers there (the two groups' means at least TWO_LAYERS of the thickness apart). A
    plate's two faces are then not pulled onto one plane between them, while the single layer of
    points of an open sheet, which the network wraps in a thin shell, stays whole for both of the
    shell's faces. Done when a site searches, which after the first round is rare."""
    valid = candidates < len(points)
    offsets = np.take(points, np.minimum(candidates, len(points) - 1), axis=0) - vertices.astype(np.float32)[:, None]
    behind = np.einsum("vci,vi->vc", offsets, facing.astype(np.float32))
    far = valid & (behind < -0.5 * thickness[:, None])
    near = valid & ~far
    far_count, near_count = far.sum(axis=1), near.sum(axis=1)
    gap = np.where(near, behind, 0.0).sum(axis=1) / np.maximum(near_count, 1) \
        - np.where(far, behind, 0.0).sum(axis=1) / np.maximum(far_count, 1)
    two_layers = (far_count >= MIN_LAYER_POINTS) & (near_count >= MIN_LAYER_POINTS) & (gap >= TWO_LAYERS * thickness)
    return np.where(far & two_layers[:, None], len(points), candidates)


def fit_local_surfaces(sites: np.ndarray, points: np.ndarray, candidates: np.ndarray, settings: RefineSettings,
                       normals: np.ndarray | None = None, curved: np.ndarray | None = None) -> LocalSurfaces:
    """The local surface at each site (S, 3) among input points (P, 3), found among candidates
    (S, C) (len(points): none) within settings.radius: the weighted least-squares plane of the
    settings.neighbours nearest points or, where curved (S,) bool, the quadratic height field
    (quadratic_fit) over the plane of the settings.curved_neighbours nearest. Gaussian weights at
    the scale of the settings.weight_rank-th (curved: curved_weight_rank-th) nearest; candidates
    beyond the k nearest get zero weight. Float32 on coordinates relative to each site. With the
    points' own normals (P, 3) the plane's normal is their weighted mean instead, each turned to
    the side of the fitted one (scanners do not agree on which side is out); where they cancel
    out, the fitted normal stays."""
    curved = np.zeros(len(sites), bool) if curved is None or settings.curved_neighbours is None else curved
    flat_k = min(settings.neighbours, len(points))
    curved_k = min(settings.curved_neighbours or flat_k, len(points), candidates.shape[1])
    k = np.where(curved, curved_k, flat_k)                                                  # (S,)
    rank = np.minimum(np.where(curved, settings.curved_weight_rank, settings.weight_rank), k) - 1
    offsets = np.take(points, np.minimum(candidates, len(points) - 1), axis=0)            # (S, C, 3)
    offsets -= sites.astype(np.float32)[:, None]
    squared = np.einsum("vci,vci->vc", offsets, offsets)                                    # (S, C)
    squared[(candidates >= len(points)) | (squared > np.float32(settings.radius ** 2))] = np.inf
    ranked = np.sort(squared, axis=1)
    rows = np.arange(len(sites))
    kth, width = ranked[rows, k - 1][:, None], ranked[rows, rank][:, None]
    valid = np.isfinite(squared) & (squared <= kth)                                         # the k nearest
    width = np.where(np.isfinite(width), width, np.float32(settings.radius ** 2))
    weights = np.where(valid, np.exp(-squared / np.maximum(width, np.float32(1e-18))), np.float32(0.0))
    total = np.maximum(weights.sum(axis=1, keepdims=True), 1e-30)
    centroid = (weights[:, None, :] @ offsets)[:, 0] / total                                # (S, 3)
    offsets -= centroid[:, None]
    covariance = (offsets * weights[:, :, None]).transpose(0, 2, 1) @ offsets             # (S, 3, 3)
    normal = smallest_eigenvectors(covariance[:, 0, 0], covariance[:, 0, 1], covariance[:, 0, 2],
                                   covariance[:, 1, 1], covariance[:, 1, 2], covariance[:, 2, 2])
    if normals is not None:
        given = np.take(normals, np.minimum(candidates, len(points) - 1), axis=0)          # (S, C, 3)
        sides = np.sign(np.einsum("vci,vi->vc", given, normal.astype(np.float32)))
        mean = np.einsum("vc,vci->vi", weights * sides, given).astype(np.float64)
        length = np.linalg.norm(mean, axis=1)
        agreed = length > 0.5 * weights.sum(axis=1)
        normal[agreed] = mean[agreed] / length[agreed, None]
    frame = np.zeros((len(sites), 3, 3), np.float32)
    spread = np.ones(len(sites), np.float32)
    coefficients = np.zeros((len(sites), 6))
    if curved.any():
        frame[curved], spread[curved], coefficients[curved] = quadratic_fit(offsets[curved], weights[curved],
                                                                            normal[curved])
    return LocalSurfaces(sites + centroid.astype(np.float64), normal, valid.sum(axis=1) >= settings.min_neighbours,
                         frame, spread, coefficients)


# quadratic_fit: a fit whose weights add up to fewer points than this (sum / largest) keeps the
# plane; the curvature terms are shrunk towards zero by this share of the total weight
MIN_QUADRATIC_SUPPORT = 8.0
QUADRATIC_RIDGE = 1e-3


def quadratic_fit(offsets: np.ndarray, weights: np.ndarray, normal: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The weighted least-squares quadratic h(u, v) = c0 + c1 u + c2 v + c3 u^2 + c4 uv + c5 v^2
    through points given as offsets (V, C, 3) from a point of their plane, weights (V, C) (0: not a
    neighbour), heights along the plane's unit normal (V, 3) -> its frame (V, 3, 3) float32 (rows:
    two tangents and the normal), spread (V,) float32 (the unit of u and v: the neighbourhood's
    weighted tangent spread) and coefficients (V, 6) float64, all zero where the weights hold too
    few points to fix six coefficients (the plane)."""
    helper = np.where(np.abs(normal[:, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
    first = np.cross(normal, helper)
    first /= np.linalg.norm(first, axis=1, keepdims=True)
    frame = np.stack([first, np.cross(normal, first), normal], axis=1).astype(np.float32)  # (V, 3, 3)
    local = offsets @ frame.transpose(0, 2, 1)                                             # (V, C, 3)
    total = np.maximum(weights.sum(axis=1), 1e-30)
    spread = np.sqrt(np.maximum((weights * (local[..., 0] ** 2 + local[..., 1] ** 2)).sum(axis=1) / total,
                                1e-12))                                                    # (V,)
    gram, moments = weighted_moments(local[..., 0] / spread[:, None], local[..., 1] / spread[:, None],
                                     local[..., 2], weights)
    gram += np.diag([1e-6, 1e-6, 1e-6, QUADRATIC_RIDGE, QUADRATIC_RIDGE, QUADRATIC_RIDGE]) * total[:, None, None]
    coefficients = solve_positive_definite(gram, moments)
    supported = total / np.maximum(weights.max(axis=1), 1e-30) >= MIN_QUADRATIC_SUPPORT
    return frame, spread.astype(np.float32), np.where(supported[:, None], coefficients, 0.0)


# The exponents (of u, v) of monomials' six terms.
MONOMIAL_EXPONENTS = ((0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2))


def weighted_moments(u: np.ndarray, v: np.ndarray, h: np.ndarray, weights: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The normal equations of the weighted least-squares quadratic through heights h (V, C) over
    tangent coordinates u, v (V, C) with weights (V, C): Gram matrices (V, 6, 6) and right-hand
    sides (V, 6), float64, of the monomials' terms. Built from the 15 weighted moments
    sum w u^a v^b (a + b <= 4) rather than a (V, C, 6) design matrix: the whole fit in about half the time."""
    u_powers, v_powers = [np.ones_like(u), u], [np.ones_like(v), v]
    for _ in range(3):
        u_powers.append(u_powers[-1] * u)
        v_powers.append(v_powers[-1] * v)
    weighted = [weights * power for power in u_powers]
    moment = {(a, b): np.einsum("vc,vc->v", weighted[a], v_powers[b]).astype(np.float64)
              for a in range(5) for b in range(5 - a)}
    gram = np.stack([np.stack([moment[(a + c, b + d)] for c, d in MONOMIAL_EXPONENTS], axis=-1)
                     for a, b in MONOMIAL_EXPONENTS], axis=-2)
    weighted_heights = weights * h
    rhs = np.stack([np.einsum("vc,vc,vc->v", weighted_heights, u_powers[a], v_powers[b]).astype(np.float64)
                    for a, b in MONOMIAL_EXPONENTS], axis=-1)
    return gram, rhs


def quadratic_height(frame: np.ndarray, spread: np.ndarray, coefficients: np.ndarray, at: np.ndarray) -> np.ndarray:
    """(V,) the height along each frame's normal of the quadratic_fit (frame (V, 3, 3), spread
    (V,), coefficients (V, 6)) at `at` (V, 3), given from the plane's point. 0 (the plane) where
    the quadratic would put `at` further from the plane than the neighbourhood is wide (the points
    are no height field there)."""
    target = (at.astype(np.float32)[:, None] @ frame.transpose(0, 2, 1))[:, 0] / spread[:, None]  # (V, 3)
    height = np.einsum("vk,vk->v", monomials(target[:, 0], target[:, 1]).astype(np.float64), coefficients)
    return np.where((np.abs(height) <= spread) & np.isfinite(height), height, 0.0)


def monomials(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(..., 6): 1, u, v, u^2, uv, v^2 of u, v (...)."""
    return np.stack([np.ones_like(u), u, v, u * u, u * v, v * v], axis=-1)


def solve_positive_definite(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x (V, n) with a x = b for symmetric positive definite a (V, n, n) and b (V, n), by a
    Cholesky factorisation vectorised across V: for thousands of small systems a few dozen array
    operations instead of numpy's per-matrix LAPACK calls (16,384 systems of n = 6: 0.016 s against
    0.056 s)."""
    n = a.shape[1]
    lower = np.zeros_like(a)
    for j in range(n):
        pivot = a[:, j, j] - np.einsum("vk,vk->v", lower[:, j, :j], lower[:, j, :j])
        lower[:, j, j] = np.sqrt(np.maximum(pivot, 1e-300))
        for i in range(j + 1, n):
            lower[:, i, j] = (a[:, i, j] - np.einsum("vk,vk->v", lower[:, i, :j], lower[:, j, :j])) / lower[:, j, j]
    y = np.zeros_like(b)
    for i in range(n):
        y[:, i] = (b[:, i] - np.einsum("vk,vk->v", lower[:, i, :i], y[:, :i])) / lower[:, i, i]
    x = np.zeros_like(b)
    for i in reversed(range(n)):
        x[:, i] = (y[:, i] - np.einsum("vk,vk->v", lower[:, i + 1:, i], x[:, i + 1:])) / lower[:, i, i]
    return x


def plane_moves(vertices: np.ndarray, centre: np.ndarray, normal: np.ndarray, usable: np.ndarray,
                settings: RefineSettings) -> np.ndarray:
    """Displacements (V, 3) of vertices (V, 3) onto planes through centre (V, 3) with unit normal
    (V, 3), capped at settings.max_move; zero where not usable (V,)."""
    move = np.einsum("vi,vi->v", centre - vertices, normal)[:, None] * normal
    length = np.linalg.norm(move, axis=1, keepdims=True)
    move *= np.minimum(1.0, settings.max_move / np.maximum(length, 1e-12))
    move[~usable] = 0.0
    return move


def surface_targets(vertices: np.ndarray, surfaces: LocalSurfaces | SiteMemory, site: np.ndarray) -> np.ndarray:
    """The point (V, 3) of each vertex's (V, 3) local surface above or below it: surfaces of the
    sites, site (V,) each vertex's."""
    origin = surfaces.origin[site]
    height = quadratic_height(surfaces.frame[site], surfaces.spread[site], surfaces.coefficients[site],
                              vertices - origin)
    return origin + height[:, None] * surfaces.normal[site]


def surface_projection(vertices: np.ndarray, tree: NearestPoints, points: np.ndarray, settings: RefineSettings) -> np.ndarray:
    """Moves (V, 3) of vertices (V, 3) onto the local surfaces of points (P, 3) (every vertex its own
    site, taken as bulky), with a fresh search of tree (over points) and fresh fits: one round of
    the refinement without its memory, far-sheet test or smoothing."""
    surfaces = fit_local_surfaces(vertices, points.astype(np.float32), search_neighbours(vertices, tree, settings)[0],
                                  settings, curved=np.ones(len(vertices), bool))
    centre = surface_targets(vertices, surfaces, np.arange(len(vertices)))
    return plane_moves(vertices, centre, surfaces.normal, surfaces.usable, settings)


PROJECTION_BLOCK = 16384  # sites per block: a few hundredths of a second, ~15 MB of temporaries


def fitting_sites(vertices: np.ndarray, facing: np.ndarray, edge: float) -> np.ndarray:
    """The site (V,) int64 of each vertex (V, 3) with unit outward normal facing (V, 3): vertices in
    one cube of the given edge that face the same way (the axis and sign of their normal's largest
    component) share a local surface, so the two faces of a thin part never do; edge 0: each
    vertex its own site. Sites are numbered 0 .. S-1."""
    if edge <= 0.0:
        return np.arange(len(vertices))
    axis = np.abs(facing).argmax(axis=1)
    way = 2 * axis + (facing[np.arange(len(facing)), axis] < 0.0)
    cells = np.floor(vertices / edge).astype(np.int64)
    lowest, highest = bounding_box(cells)
    cells -= lowest
    extent = highest - lowest + 1
    # One integer per (cell, way), ordered as the rows (x, y, z, way) would be: np.unique over
    # integers is several times faster than over rows and numbers the sites alike.
    keys = ((cells[:, 0] * extent[1] + cells[:, 1]) * extent[2] + cells[:, 2]) * 6 + way
    return np.unique(keys, return_inverse=True)[1].ravel()


def site_means(values: np.ndarray, site: np.ndarray, sites: int) -> np.ndarray:
    """Mean (S, D) over each site's vertices of values (V, D)."""
    counts = np.maximum(np.bincount(site, minlength=sites), 1)
    return np.stack([np.bincount(site, weights=values[:, d], minlength=sites) for d in range(values.shape[1])],
                    axis=1) / counts[:, None]


# fits_on_two_threads: fewer sites than this are fitted on one thread (the hand-over costs more)
MIN_SITES_PER_THREAD = 2048
_fitting_pool: ThreadPoolExecutor | None = None


def fits_on_two_threads(sites: np.ndarray, points: np.ndarray, candidates: np.ndarray, settings: RefineSettings,
                        normals: np.ndarray | None, curved: np.ndarray) -> LocalSurfaces:
    """fit_local_surfaces over the two halves of the sites at once: a site's fit depends on that
    site alone, so the result is identical, and numpy leaves the interpreter lock while it works
    on the halves' arrays (1.8 times faster on two idle cores)."""
    global _fitting_pool
    if len(sites) < 2 * MIN_SITES_PER_THREAD or (os.cpu_count() or 1) < 2:
        return fit_local_surfaces(sites, points, candidates, settings, normals, curved)
    if _fitting_pool is None:
        _fitting_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="occnet-fits")
    half = len(sites) // 2
    parts = list(_fitting_pool.map(lambda part: fit_local_surfaces(sites[part], points, candidates[part], settings,
                                                                   normals, curved[part]),
                                   (slice(0, half), slice(half, None))))
    return LocalSurfaces(*(np.concatenate([getattr(part, f.name) for part in parts]) for f in fields(LocalSurfaces)))


def remembered_fits(sites: np.ndarray, tree: NearestPoints, points: np.ndarray, memory: SiteMemory,
                    settings: RefineSettings, refit_distance: float, normals: np.ndarray | None = None,
                    facing: np.ndarray | None = None, thickness: np.ndarray | None = None) -> None:
    """One round's local surfaces of sites (S, 3) among points (P, 3) float32 (normals (P, 3)
    float32 or None; the sites' outward normals facing (S, 3) and thickness (S,), or None:
    without_far_sheet), into memory. Sites that moved refit_distance or more since their
    last fit get a fresh fit (searching the tree again only when they moved beyond their slack);
    the others keep theirs."""
    refit = np.linalg.norm(sites - memory.fitted_at, axis=1) >= refit_distance
    search = refit & (np.linalg.norm(sites - memory.searched_at, axis=1) >= memory.slack)
    if search.any():
        candidates, memory.slack[search] = search_neighbours(sites[search], tree, settings)
        thin = np.flatnonzero(np.isfinite(thickness[search])) if facing is not None else []
        if len(thin):   # a bulky site has no far face to leave out
            rows = np.flatnonzero(search)[thin]
            candidates[thin] = without_far_sheet(sites[rows], candidates[thin], points, facing[rows], thickness[rows])
        memory.candidates[search] = candidates
        memory.searched_at[search] = sites[search]
    if refit.any():
        curved = np.isinf(thickness[refit]) if thickness is not None else np.ones(int(refit.sum()), bool)
        fitted = fits_on_two_threads(sites[refit], points, memory.candidates[refit], settings, normals, curved)
        for name in ("origin", "normal", "usable", "frame", "spread", "coefficients"):
            getattr(memory, name)[refit] = getattr(fitted, name)
        memory.fitted_at[refit] = sites[refit]


def blockwise_fits(sites: np.ndarray, tree: NearestPoints, points: np.ndarray, memory: SiteMemory,
                   settings: RefineSettings, refit_distance: float, should_cancel: Callable[[], bool] | None = None,
                   normals: np.ndarray | None = None, facing: np.ndarray | None = None,
                   thickness: np.ndarray | None = None) -> None:
    """remembered_fits over blocks of PROJECTION_BLOCK sites, checking should_cancel before each. A
    site's fit depends on that site alone, so the result is bit-identical to one call over all
    sites; blocks bound the (S, C, 3) temporaries and let a cancel land within a fraction of a
    second instead of after the round."""
    for start in range(0, len(sites), PROJECTION_BLOCK):
        check_cancel(should_cancel)
        block = slice(start, start + PROJECTION_BLOCK)
        remembered_fits(sites[block], tree, points, memory.rows(block), settings, refit_distance, normals,
                        *((facing[block], thickness[block]) if facing is not None else ()))


def refine_to_points(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray,
                     settings: RefineSettings = RefineSettings(),
                     progress: Callable[[float], None] | None = None,
                     should_cancel: Callable[[], bool] | None = None,
                     normals: np.ndarray | None = None, spacing: float | None = None,
                     averaging=None, slide: bool | None = None, tree: NearestPoints | None = None) -> np.ndarray:
    """Canonical vertices (V, 3) of a mesh with faces (F, 3) and input points (P, 3) -> refined
    vertices (V, 3) float32; faces are unchanged. normals (P, 3): the points' own normals, oriented
    or not; the planes take their direction from them (docs/performance.md: they help). spacing:
    the points' median_spacing, measured here when not given. averaging: the mesh's
    marching.averaging_operator, built here when not given. slide: whether the points are denser
    than the mesh (points_denser_than_mesh), decided here from the mesh when not given. tree: a
    NearestPoints over the points, built here when not given.
    progress(fraction in [0, 1]) is called after every round; should_cancel() before every block
    of sites in every round, raising Cancelled."""
    import trimesh

    points = np.asarray(points, dtype=np.float64)
    if len(vertices) == 0 or len(points) < settings.min_neighbours:
        return np.asarray(vertices, dtype=np.float32).copy()
    faces = np.asarray(faces)
    used = np.zeros(len(vertices), bool)
    used[faces.ravel()] = True
    if not used.all():  # a vertex of no face has no surface to move along: it stays where it is
        refined = np.asarray(vertices, dtype=np.float32).copy()
        if used.any():
            renumbered = np.cumsum(used) - 1
            refined[used] = refine_to_points(np.asarray(vertices)[used], renumbered[faces], points, settings,
                                             progress, should_cancel, normals, spacing, slide=slide, tree=tree)  # its own operator
        return refined
    mesh = trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), faces, process=False)
    if averaging is None:
        averaging = averaging_operator(MeshArrays(np.asarray(vertices), faces))
    tree = NearestPoints(points) if tree is None else tree
    points32 = points.astype(np.float32)
    if normals is not None:
        normals = np.asarray(normals, np.float64)
        normals = (normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    # Sites and where the network's own shape is thin, from the mesh as it came: the rounds move
    # vertices by a fraction of a plate's thickness, too little to change which side a point is on.
    outward = outward_normals(np.asarray(mesh.vertices), faces)
    spacing = median_spacing(points) if spacing is None else spacing
    site = fitting_sites(np.asarray(mesh.vertices), outward, settings.site_spacing * spacing)
    count = int(site.max()) + 1
    facing = thickness = None
    if settings.sheet_reach is not None:
        facing = site_means(outward, site, count)
        facing /= np.maximum(np.linalg.norm(facing, axis=1, keepdims=True), 1e-30)
        site_places = site_means(np.asarray(mesh.vertices), site, count)
        vertex_thickness = local_thickness(np.asarray(mesh.vertices), outward, site_places, facing,
                                           settings.sheet_reach, should_cancel)
        thickness = np.full(count, np.inf)
        np.minimum.at(thickness, site, vertex_thickness)
    memory = SiteMemory.empty(count, min(fitted_count(settings), len(points)) + SPARE_NEIGHBOURS)
    edge = median_edge(mesh.vertices, faces)
    if slide is None:
        slide = points_denser_than_mesh(spacing, edge, settings)
    for done in range(settings.rounds):
        vertices_now = np.asarray(mesh.vertices)
        blockwise_fits(site_means(vertices_now, site, count), tree, points32, memory, settings,
                       settings.refit_spacing * spacing, should_cancel, normals, facing, thickness)
        centre = surface_targets(vertices_now, memory, site)
        mesh.vertices = projected = vertices_now + plane_moves(vertices_now, centre, memory.normal[site],
                                                               memory.usable[site], settings)
        trimesh.smoothing.filter_taubin(mesh, iterations=settings.smoothing_steps, laplacian_operator=averaging)
        if slide:
            mesh.vertices = sliding_part(projected, np.asarray(mesh.vertices), outward_normals(projected, faces))
        elif settings.shrink_cell is not None:
            mesh.vertices = without_shrink(projected, np.asarray(mesh.vertices), outward, settings.shrink_cell * edge)
        if progress is not None:
            progress((done + 1) / settings.rounds)
    return np.asarray(mesh.vertices, dtype=np.float32)


def median_edge(vertices: np.ndarray, faces: np.ndarray) -> float:
    """The median length of the edges of faces (F, 3) over vertices (V, 3), each edge counted once per
    face it borders, over EDGE_SAMPLE_FACES of the faces (evenly strided) or all where fewer."""
    corners = np.asarray(vertices, np.float64)[faces[::max(1, len(faces) // EDGE_SAMPLE_FACES)]]
    return float(np.median(np.linalg.norm(corners - np.roll(corners, -1, axis=1), axis=2)))


def points_denser_than_mesh(spacing: float, edge: float, settings: RefineSettings = RefineSettings()) -> bool:
    """Whether points with median spacing `spacing` are dense enough, against a mesh's median edge,
    for the fits alone to place the surface (settings.dense_slide): then the rounds' smoothing only
    slides (sliding_part) and the chords are lifted onto the surface (chords_onto_surface)."""
    return settings.dense_slide is not None and spacing < settings.dense_slide * edge


# chords_onto_surface: the share of each vertex's umbrella vector (along its normal) it moves back
CHORD_SAG = 0.25


def chords_onto_surface(mesh: MeshArrays, averaging=None) -> MeshArrays:
    """The mesh (V, 3) / (F, 3) with each vertex moved against the normal part of its umbrella
    vector (the mean of its neighbours less the vertex; averaging: the mesh's
    marching.averaging_operator, built here when not given) by CHORD_SAG of it. Where the vertices
    lie on a curved surface the faces between them do not: they cut inside it where it is convex
    and stand outside where it is concave. On a sphere of radius R whose vertices are h apart, a
    face lies on average h^2 / 8R inside, and the umbrella vector's normal part is h^2 / 2R inwards,
    so a quarter of it puts the faces on the surface on average; on a plane it is zero. Over points
    denser than the mesh the refinement puts the vertices on the surface (docs/pointclouds.md, "The
    faces between the vertices": the classic meshes at 300,000 points lost 0.0007-0.002 of IoU to it)."""
    vertices = mesh.vertices.astype(np.float64)
    averaging = averaging_operator(mesh) if averaging is None else averaging
    normals = outward_normals(vertices, mesh.faces)
    inward = np.einsum("vi,vi->v", averaging @ vertices - vertices, normals)
    return MeshArrays((vertices - CHORD_SAG * inward[:, None] * normals).astype(np.float32), mesh.faces)


def sliding_part(start: np.ndarray, smoothed: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Vertices (V, 3) moved from start (V, 3) by the part of their smoothing (to smoothed (V, 3))
    that runs along the surface: the part along their unit normals (V, 3) dropped. Where the points
    are denser than the mesh, each round's fits already place the surface precisely; the smoothing's
    normal part would only pull it back out of concave corners and fillets, so only its spreading
    of the vertices along the surface is kept (on validation at 30,000 and 300,000 points better on
    every number, docs/performance.md; over sparse points that normal part removes the fits' ripple
    and stays)."""
    shift = smoothed - start
    return smoothed - np.einsum("vi,vi->v", shift, normals)[:, None] * normals


def without_shrink(start: np.ndarray, smoothed: np.ndarray, normals: np.ndarray, cell: float) -> np.ndarray:
    """Vertices (V, 3) moved from start (V, 3) by their smoothing (to smoothed (V, 3)) less its
    shrink: the displacement along the unit normals (V, 3), averaged over about `cell`
    (low_pass), is taken back. Taubin steps with equal shrink and inflate factors, an odd number a
    round, take a little off every curved surface, and on a rod or a blade that is a large share
    of its thickness; what varies from vertex to vertex, the fits' ripple, is still smoothed away
    (docs/pointclouds.md, "Thin parts came back too thin")."""
    along = np.einsum("vi,vi->v", smoothed - start, normals)
    return smoothed - low_pass(start, along, cell)[:, None] * normals


def low_pass(places: np.ndarray, values: np.ndarray, cell: float) -> np.ndarray:
    """values (V,) at places (V, 3) averaged over a neighbourhood about 2 cells wide -> (V,): their
    means over a grid of cubes of the given edge, blurred over neighbouring cubes ([1 2 1] along
    each axis, sums and counts alike, so empty cubes do not pull towards zero), and interpolated
    trilinearly at the places. The two faces of a part thinner than a cube share its mean, as
    they share the smoothing's shrink."""
    origin = bounding_box(places)[0] - cell
    coords = (places - origin) / cell
    cubes = np.floor(coords).astype(np.int64)
    shape = tuple(int(n) + 2 for n in bounding_box(cubes)[1])
    flat = np.ravel_multi_index(cubes.T, shape)
    size = int(np.prod(shape))
    sums = np.bincount(flat, weights=values, minlength=size).reshape(shape)
    counts = np.bincount(flat, minlength=size).astype(np.float64).reshape(shape)
    for axis in range(3):
        sums = ndimage.convolve1d(sums, [0.25, 0.5, 0.25], axis=axis, mode="constant")
        counts = ndimage.convolve1d(counts, [0.25, 0.5, 0.25], axis=axis, mode="constant")
    # Every cube a place interpolates from touches its own occupied cube, so its blurred count is > 0.
    means = sums / np.maximum(counts, 1e-300)
    return ndimage.map_coordinates(means, (coords - 0.5).T, order=1, mode="nearest")


def outward_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Unit area-weighted vertex normals (V, 3) of a mesh (vertices (V, 3), faces (F, 3)), outward
    for the consistently wound meshes of marching cubes; (0, 0, 0) at unused vertices. A tenth of
    the time of trimesh's angle-weighted ones, which this does not need."""
    corners = vertices[faces]                                                              # (F, 3, 3)
    face_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])  # (F, 3), |n| = 2 area
    summed = np.stack([np.bincount(faces.ravel(), weights=np.repeat(face_normals[:, axis], 3),
                                   minlength=len(vertices)) for axis in range(3)], axis=1)
    return summed / np.maximum(np.linalg.norm(summed, axis=1, keepdims=True), 1e-30)


def check_cancel(should_cancel: Callable[[], bool] | None) -> None:
    """Raise Cancelled when the caller asked to stop."""
    if should_cancel is not None and should_cancel():
        raise Cancelled()
