"""From a value grid to a triangle mesh: marching cubes (scikit-image) on a padded grid, so every
mesh is closed, and decimation to a face budget or to a geometric tolerance."""

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from skimage import measure

from ..errors import Cancelled

# Value given to the one-cell border around the grid: far outside, so the surface always closes
# inside the grid instead of running open at its edge.
OUTSIDE = -1e6


@dataclass
class MeshArrays:
    vertices: np.ndarray  # (V, 3) float32
    faces: np.ndarray     # (F, 3) int32, counter-clockwise seen from outside


def grid_to_mesh(values: np.ndarray, level: float, box_min: float, spacing: float) -> MeshArrays:
    """values (R+1,)^3 with inside > level -> watertight mesh in the grid's coordinates, where grid
    index i maps to box_min + i * spacing. An empty mesh when nothing is inside."""
    inside = values > level
    if not inside.any():
        return MeshArrays(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32))
    # The surface lies within one grid point of the inside: marching cubes needs only that box (on
    # a chair at 256^3 a third of the time of the whole grid).
    occupied = [np.flatnonzero(inside.any(axis=others)) for others in ((1, 2), (0, 2), (0, 1))]
    low = [max(int(layers[0]) - 1, 0) for layers in occupied]
    crop = values[tuple(slice(start, int(layers[-1]) + 2) for start, layers in zip(low, occupied))]
    padded = np.pad(crop.astype(np.float32, copy=False), 1, mode="constant", constant_values=OUTSIDE)
    verts, faces, _, _ = measure.marching_cubes(padded, level=level, allow_degenerate=False)
    # Inside is the larger value; scikit-image then winds faces clockwise seen from outside.
    faces = faces[:, ::-1]
    # Where values sit exactly at the level, the degenerate faces scikit-image drops can leave
    # vertices of no face: loose points in Blender and in the files (a viewer mesh of a cow: 8).
    used = np.zeros(len(verts), bool)
    used[faces.ravel()] = True
    if not used.all():
        verts, faces = verts[used], (np.cumsum(used) - 1)[faces]
    verts = (verts - 1.0 + np.array(low, np.float32)) * spacing + box_min
    return MeshArrays(verts.astype(np.float32), np.ascontiguousarray(faces, dtype=np.int32))


def simplify_mesh(mesh: MeshArrays, max_faces: int,
                  should_cancel: Callable[[], bool] | None = None) -> MeshArrays:
    """Quadric decimation down to at most max_faces (fast-simplification), unchanged if already
    within budget. should_cancel() is checked before each decimation pass (each takes seconds on
    a million faces), raising Cancelled."""
    if max_faces <= 0:
        raise ValueError("the face budget must be positive")
    if len(mesh.faces) <= max_faces:
        return mesh
    try:
        import fast_simplification
    except ImportError as exc:
        raise RuntimeError("decimation needs the fast-simplification package "
                           "(pip install fast-simplification)") from exc
    ratio = 1.0 - max_faces / len(mesh.faces)
    _check_cancel(should_cancel)
    verts, faces = fast_simplification.simplify(mesh.vertices, mesh.faces, target_reduction=ratio)
    # The target is approximate; a last few collapses could overshoot, so trim honestly by retrying.
    if len(faces) > max_faces:
        _check_cancel(should_cancel)
        ratio = 1.0 - max_faces / len(faces)
        verts, faces = fast_simplification.simplify(verts, faces, target_reduction=ratio)
    return MeshArrays(np.asarray(verts, np.float32), np.asarray(faces, np.int32))


# fast-simplification (Fast-Quadric-Mesh-Simplification) collapses, in its iteration i of 100, every
# edge whose quadric error is below 1e-9 * (i + 3) ** agg (Simplify.h, simplify_mesh). Choosing agg
# so that the last threshold is tolerance^2 bounds every collapse by that error; a quadric error is a
# sum of squared distances to the original planes merged into a vertex, so no original face plane
# ends up further than the tolerance from the vertex that replaced it. tests/test_extraction.py checks
# the bound, so a change of schedule in the library shows.
_QUADRIC_SCALE = 1e-9
_LAST_ITERATION_BASE = 102


# Point-cloud meshes are decimated by default to a tolerance (canonical units; backend/pipeline.py)
# of this fraction of the points' spacing, but never finer than DEFAULT_TOLERANCE (0.1% of the
# longest edge): the points cannot place the surface closer than their own spacing allows, so a
# sparse cloud needs fewer triangles. Chosen on validation (docs/performance.md): at 0.2 the
# faces fell by 42% at 3000 points and 46% at 300 with every metric within 1%; 0.25 takes another
# 8% (300 points) and 12% (3000) for 0.0016 of Chamfer-L1 x10 at 300 points.
SPACING_TOLERANCE = 0.25
DEFAULT_TOLERANCE = 0.001
def cloud_tolerance(spacing: float) -> float:
    """The decimation tolerance for a mesh fitted to points whose median distance to their nearest
    neighbour is spacing (spacing.median_spacing): SPACING_TOLERANCE times it, at least
    DEFAULT_TOLERANCE."""
    return max(DEFAULT_TOLERANCE, SPACING_TOLERANCE * spacing)


# Taubin's low-pass filter on refined point-cloud meshes: steps that alternately shrink (by
# TAUBIN_SHRINK) and inflate (by TAUBIN_INFLATE, slightly more, so the volume stays), an even
# number so that the last one inflates. Chosen on validation (docs/performance.md, docs/pointclouds.md).
TAUBIN_SHRINK, TAUBIN_INFLATE = 0.5, 0.52
SMOOTHING_STEPS = 8
# smoothing_steps: SPARSE_SMOOTHING x (the points' spacing / the mesh's edge)^2 steps, at most
# MAX_SMOOTHING_STEPS
SPARSE_SMOOTHING = 40.0
MAX_SMOOTHING_STEPS = 96


def smoothing_steps(spacing: float, edge: float) -> int:
    """Taubin steps for a mesh with median edge `edge` refined onto points with median spacing
    `spacing`: an even number, SMOOTHING_STEPS where the points are denser than about 0.45 edges
    (30,000 points on an object at 128^3 are 0.2 to 0.4 apart), growing with the square of their
    spacing (3000 points, about 0.9 edges: 32 steps) up to MAX_SMOOTHING_STEPS from 1.55 edges (300
    points are 1.9 to 3.8 apart). Between sparse points each vertex fits its own noisy
    neighbourhood, and the ripple this leaves is as wide as their spacing; a diffusion smooths
    over a width that grows with the square root of its steps."""
    wanted = SPARSE_SMOOTHING * (spacing / max(edge, 1e-12)) ** 2
    return int(min(MAX_SMOOTHING_STEPS, max(SMOOTHING_STEPS, 2 * round(wanted / 2))))


def averaging_operator(mesh: MeshArrays):
    """The sparse (V, V) CSR matrix whose product with the vertices (V, 3) gives each vertex the
    mean of its neighbours (trimesh's umbrella operator; trimesh builds it as COO, whose products
    take 20% longer). The refinement's rounds, the final smoothing and chords_onto_surface share one."""
    import trimesh

    surface = trimesh.Trimesh(mesh.vertices.astype(np.float64), mesh.faces, process=False)
    return trimesh.smoothing.laplacian_calculation(surface).tocsr()


def subdivided(mesh: MeshArrays) -> MeshArrays:
    """The mesh (V, 3) / (F, 3) with every face split in four at its edges' midpoints (V + E
    vertices, 4F faces): the same surface, every edge halved."""
    import trimesh

    vertices, faces = trimesh.remesh.subdivide(mesh.vertices.astype(np.float64), mesh.faces)
    return MeshArrays(vertices.astype(np.float32), faces)


def spanned(mesh: MeshArrays, free: np.ndarray, averaging=None) -> MeshArrays:
    """The mesh (V, 3) / (F, 3) with its free vertices (bool (V,)) on the membrane the others span:
    each the mean of its neighbours (the discrete harmonic surface, solved directly), the smoothest
    surface over a hole in a scan whose rim the held vertices make. Free vertices whose piece of the
    free ones touches no held vertex stay where they are. averaging: the mesh's averaging_operator,
    built here when not given."""
    from scipy.sparse import identity
    from scipy.sparse.csgraph import connected_components
    from scipy.sparse.linalg import spsolve

    averaging = averaging_operator(mesh) if averaging is None else averaging
    rows = np.flatnonzero(free)
    if len(rows) == 0:
        return mesh
    held = np.flatnonzero(~free)
    among, across = averaging[rows][:, rows], averaging[rows][:, held]
    count, piece = connected_components(among, directed=False)
    anchored = np.zeros(count, bool)
    anchored[piece[np.diff(across.indptr) > 0]] = True
    keep = anchored[piece]
    if not keep.any():
        return mesh
    among, across, rows = among[keep][:, keep], across[keep], rows[keep]
    vertices = mesh.vertices.astype(np.float64)
    vertices[rows] = spsolve((identity(len(rows), format="csc") - among).tocsc(), across @ vertices[held])
    return MeshArrays(vertices.astype(np.float32), mesh.faces)


def taubin_smoothed(mesh: MeshArrays, steps: int = SMOOTHING_STEPS, averaging=None) -> MeshArrays:
    """The mesh (V, 3) / (F, 3) with its vertices low-pass filtered by Taubin's method over `steps`
    steps; the faces unchanged. The refinement fits each vertex to its own neighbourhood of noisy
    points, which leaves a ripple finer than the points' spacing; this takes it out without the
    shrinking of plain Laplacian smoothing. averaging: the mesh's averaging_operator, built here
    when not given."""
    import trimesh

    surface = trimesh.Trimesh(mesh.vertices.astype(np.float64), mesh.faces, process=False)
    trimesh.smoothing.filter_taubin(surface, lamb=TAUBIN_SHRINK, nu=TAUBIN_INFLATE, iterations=steps,
                                    laplacian_operator=averaging_operator(mesh) if averaging is None else averaging)
    return MeshArrays(np.asarray(surface.vertices, np.float32), mesh.faces)


# Which collapses leave a pinch depends on the tolerance almost at random (on a bunny at 256^3:
# none at 0.0015 after the repair, one at 0.002), so a retry at a slightly smaller tolerance
# usually succeeds and keeps most of the reduction.
RETRY_FACTOR = 0.8


def simplify_to_tolerance(mesh: MeshArrays, tolerance: float,
                          should_cancel: Callable[[], bool] | None = None, attempts: int = 6) -> MeshArrays:
    """Quadric decimation of mesh (V, 3) / (F, 3) that spends triangles where the surface bends:
    edges collapse only while the surface moves less than about tolerance (the mesh's units), so
    flat and gently curved parts end with a few large triangles and detail keeps its small ones.
    fast-simplification does not check that a collapse keeps the surface a manifold: where two
    sheets come close (a chair's thin seat, a bunny's ears) they can end up sharing an edge with
    four faces, or two faces end up back to back; such pillows are dropped, pinches split and the
    small holes this leaves closed (decimated). A closed mesh that still comes back open is
    decimated again from the start at RETRY_FACTOR times the tolerance, up to `attempts` times in
    all (a sparse cloud's coarse tolerance may need several: 300 points on the bunny closed at the
    fourth, 0.51 of it), and otherwise is returned as it is. should_cancel() is checked before
    each attempt. Without the fast-simplification package (an extra) the mesh comes back as it is."""
    if tolerance <= 0:
        raise ValueError("the tolerance must be positive")
    small = closed_decimation(mesh, tolerance, should_cancel, attempts)
    return mesh if small is None else small


def closed_decimation(mesh: MeshArrays, tolerance: float, should_cancel: Callable[[], bool] | None = None,
                      attempts: int = 6) -> MeshArrays | None:
    """simplify_to_tolerance's attempts, or None when a closed mesh came back open from all of
    them (the mesh unchanged when fast-simplification is not installed)."""
    try:
        import fast_simplification  # noqa: F401
    except ImportError:
        return mesh
    must_stay_closed = is_closed(mesh.faces)
    for attempt in range(attempts):
        _check_cancel(should_cancel)
        small = decimated(mesh, tolerance * RETRY_FACTOR ** attempt, repair=must_stay_closed)
        if not must_stay_closed or is_closed(small.faces):
            return small
    return None


def decimated(mesh: MeshArrays, tolerance: float, repair: bool = True) -> MeshArrays:
    """One pass of fast-simplification's quadric decimation of mesh (V, 3) / (F, 3) to the
    tolerance (through its aggressiveness: its last iteration allows a quadric error of
    tolerance^2); with repair, where that leaves the mesh open, pillows dropped, pinches split and
    holes of up to SMALL_HOLE edges closed (for a mesh that was closed: an open one keeps its
    holes)."""
    import fast_simplification

    aggressiveness = math.log(tolerance ** 2 / _QUADRIC_SCALE) / math.log(_LAST_ITERATION_BASE)
    verts, faces = fast_simplification.simplify(mesh.vertices, mesh.faces, target_count=4, agg=aggressiveness)
    small = MeshArrays(np.asarray(verts, np.float32), np.asarray(faces, np.int32))
    if not repair or is_closed(small.faces):
        return small
    return with_small_holes_closed(split_pinches(drop_pillows(small)))


# Holes with at most this many edges are closed by with_small_holes_closed: what a dropped pillow
# leaves (on a bunny's 30,000 points at 128^3: seven holes of 4 and 8 edges), far below any hole
# that shows in a surface.
SMALL_HOLE = 12


def with_small_holes_closed(mesh: MeshArrays) -> MeshArrays:
    """Every hole of mesh (V, 3) / (F, 3) whose rim is a simple loop of at most SMALL_HOLE edges
    closed by a fan of triangles around a new vertex at the rim's mean, wound like the faces
    around it; larger or tangled holes stay open."""
    faces = np.asarray(mesh.faces, np.int64)
    if not len(faces):
        return mesh
    keys, unique, counts = edge_counts(faces)
    open_corner = counts[np.searchsorted(unique, keys)] == 1                     # (3F,) per corner's edge
    if not open_corner.any():
        return mesh
    # A rim edge a -> b of a face is run b -> a by the fan triangle (b, a, centre).
    start, end = faces.reshape(-1)[open_corner], np.roll(faces, -1, axis=1).reshape(-1)[open_corner]
    if len(np.unique(start)) != len(start) or len(np.unique(end)) != len(end):
        return mesh                                                                # tangled rims: left as they are
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    count = len(mesh.vertices)
    graph = coo_matrix((np.ones(len(start)), (start, end)), shape=(count, count))
    _, rim = connected_components(graph, directed=False)
    loop = rim[start]                                                             # each rim edge's loop
    sizes = np.bincount(loop)
    small = sizes[loop] <= SMALL_HOLE
    if not small.any():
        return mesh
    _, index = np.unique(loop[small], return_inverse=True)
    centres = np.stack([np.bincount(index, weights=mesh.vertices[start[small], axis]) for axis in range(3)], axis=1)
    centres /= np.bincount(index)[:, None]
    fan = np.stack([end[small], start[small], count + index], axis=1)
    return MeshArrays(np.concatenate([mesh.vertices, centres]).astype(np.float32),
                      np.concatenate([faces, fan]).astype(np.int32))


def edge_counts(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the triangles (F, 3): each corner's outgoing edge as a key (3F,) int64 (corner k of
    face f is row 3f + k, its edge runs to corner k + 1), the sorted unique keys (E,), and how many
    corners have each (E,)."""
    faces = np.asarray(faces, np.int64)
    start, end = faces.reshape(-1), np.roll(faces, -1, axis=1).reshape(-1)
    # the lower end first, as whole columns (numpy's sort along rows of two is several times slower)
    keys = np.minimum(start, end) * (int(faces.max(initial=0)) + 1) + np.maximum(start, end)
    unique, counts = np.unique(keys, return_counts=True)
    return keys, unique, counts


def is_closed(faces: np.ndarray) -> bool:
    """Is every edge of the triangles (F, 3) shared by exactly two of them?"""
    _, _, counts = edge_counts(faces)
    return bool(len(faces)) and bool((counts == 2).all())


def drop_pillows(mesh: MeshArrays) -> MeshArrays:
    """Drop every face (F, 3) whose three vertices another face also has: two triangles back to back
    enclose nothing, and on a closed surface they give their edges four faces."""
    _, group, counts = np.unique(np.sort(mesh.faces, axis=1), axis=0, return_inverse=True, return_counts=True)
    return MeshArrays(mesh.vertices, mesh.faces[counts[group.reshape(-1)] == 1])


# split_pinches moves each copy of a pinched vertex this far (the mesh's units) into its own fan, so
# that the sheets no longer touch: tools that merge vertices by position (trimesh's default loading,
# a slicer) would otherwise join the copies again and find the mesh open.
PINCH_GAP = 1e-4


def split_pinches(mesh: MeshArrays) -> MeshArrays:
    """Give each fan of faces around a vertex its own copy of the vertex: where two sheets of a
    surface touch at an edge or a vertex (an edge with four faces), each sheet gets its own, so
    every edge has two faces again; elsewhere nothing changes but the numbering. Corners of faces
    that share a two-faced edge are one fan (scipy's connected components); each copy moves
    PINCH_GAP towards the middle of its own fan."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    faces = np.asarray(mesh.faces, np.int64)
    corners = np.arange(faces.size).reshape(-1, 3)
    keys, unique, counts = edge_counts(faces)
    manifold = counts[np.searchsorted(unique, keys)] == 2                      # per corner's edge (3F,)
    order = np.argsort(keys[manifold], kind="stable")
    pairs = np.flatnonzero(manifold)[order].reshape(-1, 2)                    # the two corners of each edge
    # Corner 3f + k starts its edge at faces[f, k] and ends at faces[f, k + 1]; a consistently
    # wound neighbour runs the edge the other way, so starts meet ends (else starts meet starts).
    start, end = corners.reshape(-1), np.roll(corners, -1, axis=1).reshape(-1)
    vertex = faces.reshape(-1)
    first, second = pairs[:, 0], pairs[:, 1]
    wound = vertex[start[first]] == vertex[end[second]]
    same_vertex = np.concatenate([
        np.stack([start[first], np.where(wound, end[second], start[second])], axis=1),
        np.stack([end[first], np.where(wound, start[second], end[second])], axis=1)])
    graph = coo_matrix((np.ones(len(same_vertex)), (same_vertex[:, 0], same_vertex[:, 1])),
                       shape=(faces.size, faces.size))
    _, fan = connected_components(graph, directed=False)
    vertex_of_fan = np.zeros(fan.max() + 1, np.int64)
    vertex_of_fan[fan] = vertex
    vertices = mesh.vertices[vertex_of_fan].astype(np.float64)
    copied = np.flatnonzero(np.bincount(vertex_of_fan, minlength=len(mesh.vertices))[vertex_of_fan] > 1)
    if len(copied):
        centroids = np.repeat(vertices[fan.reshape(-1, 3)].mean(axis=1), 3, axis=0)    # per corner (3F, 3)
        middle = np.stack([np.bincount(fan, weights=centroids[:, axis], minlength=len(vertices))
                           for axis in range(3)], axis=1) / np.bincount(fan, minlength=len(vertices))[:, None]
        inward = middle[copied] - vertices[copied]
        vertices[copied] += PINCH_GAP * inward / np.maximum(np.linalg.norm(inward, axis=1, keepdims=True), 1e-30)
    return MeshArrays(vertices.astype(np.float32), fan.reshape(-1, 3).astype(np.int32))


# without_specks: a piece of a mesh is a speck, and goes, when its area is below this many square
# cells of the grid it came from, or when it encloses less than this share of a cell's thickness:
SPECK_AREA_CELLS = 1.0
SPECK_THICKNESS_CELLS = 0.01


def without_specks(mesh: MeshArrays, cell: float) -> tuple[MeshArrays, int]:
    """The mesh (V, 3) / (F, 3) without its specks, and how many pieces went: pieces (connected by
    their faces' edges) other than the largest whose area is under SPECK_AREA_CELLS square cells
    (cell: the grid's spacing, in the mesh's units), smaller than anything the grid resolves; or,
    closed, whose volume over their area is under SPECK_THICKNESS_CELLS of a cell: shells that
    enclose nothing, a grid's speck that the decimation collapsed into a point, two triangles
    back to back or a flat sliver (docs/pointclouds.md, "Specks"). Unused vertices go with them."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    faces = np.asarray(mesh.faces, np.int64)
    if not len(faces):
        return mesh, 0
    count = len(mesh.vertices)
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]]])
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(count, count))
    _, vertex_piece = connected_components(graph, directed=False)
    piece = vertex_piece[faces[:, 0]]
    pieces = int(piece.max()) + 1
    if pieces == 1:
        return mesh, 0
    corners = np.asarray(mesh.vertices, np.float64)[faces]                                   # (F, 3, 3)
    # about each piece's first corner, so that a piece far from the origin keeps its volume's digits
    corners -= corners[np.unique(piece, return_index=True)[1][piece], 0][:, None]
    cross = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    area = np.bincount(piece, weights=0.5 * np.linalg.norm(cross, axis=1), minlength=pieces)
    volume = np.abs(np.bincount(piece, weights=np.einsum("fi,fi->f", corners[:, 0], np.cross(corners[:, 1], corners[:, 2])) / 6.0,
                                minlength=pieces))
    keys, unique, counts = edge_counts(faces)
    open_piece = np.zeros(pieces, bool)
    open_piece[piece[np.flatnonzero(counts[np.searchsorted(unique, keys)] != 2) // 3]] = True
    speck = (area < SPECK_AREA_CELLS * cell ** 2) | \
        (~open_piece & (volume < SPECK_THICKNESS_CELLS * cell * area))
    speck[area.argmax()] = False
    if not speck.any():
        return mesh, 0
    kept = faces[~speck[piece]]
    used = np.unique(kept)
    renumber = np.zeros(count, np.int64)
    renumber[used] = np.arange(len(used))
    return MeshArrays(mesh.vertices[used], renumber[kept].astype(mesh.faces.dtype)), int(speck.sum())


def _check_cancel(should_cancel: Callable[[], bool] | None) -> None:
    if should_cancel is not None and should_cancel():
        raise Cancelled()
