"""Test-time refinement of a mesh extracted from a point-cloud model: shrink-wrap it onto the
input points.

The network decides what is inside (the topology, the parts the points only hint at), but its
surface is only as precise as its feature planes: a plane cell is ~1/64 of the box, and on shapes
unlike the training data the surface can sit a few cells away from the points. The input points
are measured data. So, a few rounds of:
  * move every vertex with enough input points around it onto a moving-least-squares plane of
    those points (Gaussian weights at the scale of the nearest few points, so the plane is local
    even where the neighbourhood is wide), by at most `max_move` per round;
  * a few steps of Taubin smoothing (trimesh's, no shrinkage), so neighbouring vertices move together and
    the mesh stays a clean surface rather than a set of independently snapped points.
Faces never change, so the mesh stays watertight. Parameters were chosen on the validation split
of our own training data (never on the benchmark meshes); see backend/weights/MODEL_CARD.md.
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.spatial import cKDTree

from ..errors import Cancelled


@dataclass(frozen=True)
class RefineSettings:
    rounds: int = 5              # project + smooth rounds
    max_move: float = 0.03       # per round, canonical units (longest edge of the input = 1)
    radius: float = 0.2          # input points further than this from a vertex are ignored
    neighbours: int = 16         # input points per plane fit (beyond ~16 the Gaussian weights vanish)
    weight_rank: int = 4         # Gaussian weight width = distance to this nearest neighbour
    min_neighbours: int = 6      # fewer points within radius: the vertex keeps the network's position
    smoothing_steps: int = 3     # Taubin steps per round


def plane_projection(vertices: np.ndarray, tree: cKDTree, points: np.ndarray, settings: RefineSettings) -> np.ndarray:
    """Displacements (V, 3) that move each vertex (V, 3) onto the weighted least-squares plane of
    its nearby input points (P, 3), capped at settings.max_move; zero where too few points.
    Works in float32 on coordinates relative to each vertex (this runs once per round on every
    vertex, and is the refinement's whole cost)."""
    k = min(settings.neighbours, len(points))
    distances, index = tree.query(vertices, k=k, distance_upper_bound=settings.radius, workers=-1)
    distances, index = distances.reshape(len(vertices), k), index.reshape(len(vertices), k)
    valid = np.isfinite(distances)
    rank = min(settings.weight_rank, k) - 1
    width = np.where(valid[:, rank], distances[:, rank], settings.radius).astype(np.float32)[:, None]
    scaled = np.where(valid, distances, 0.0).astype(np.float32) / np.maximum(width, 1e-9)
    weights = np.where(valid, np.exp(-scaled * scaled), 0.0).astype(np.float32)      # (V, k)
    offsets = points.astype(np.float32)[np.where(valid, index, 0)] - vertices.astype(np.float32)[:, None]
    total = np.maximum(weights.sum(axis=1, keepdims=True), 1e-30)
    centroid = (weights[:, None, :] @ offsets)[:, 0] / total                          # (V, 3)
    spread = (offsets - centroid[:, None]) * np.sqrt(weights)[..., None]
    normal = np.linalg.eigh(spread.transpose(0, 2, 1) @ spread)[1][:, :, 0]         # smallest eigenvector
    move = (np.einsum("vi,vi->v", centroid, normal)[:, None] * normal).astype(np.float64)
    length = np.linalg.norm(move, axis=1, keepdims=True)
    move *= np.minimum(1.0, settings.max_move / np.maximum(length, 1e-12))
    move[valid.sum(axis=1) < settings.min_neighbours] = 0.0
    return move


PROJECTION_BLOCK = 16384  # vertices per plane_projection call: ~0.1 s and ~10 MB of temporaries


def blockwise_projection(vertices: np.ndarray, tree: cKDTree, points: np.ndarray, settings: RefineSettings,
                         should_cancel: Callable[[], bool] | None = None) -> np.ndarray:
    """plane_projection over blocks of PROJECTION_BLOCK vertices, checking should_cancel before
    each. A vertex's move depends on that vertex alone, so the result is bit-identical to one
    call over all vertices; blocks bound the (V, neighbours, 3) temporaries and let a cancel land
    within a fraction of a second instead of after the round."""
    moves = np.empty_like(vertices, dtype=np.float64)
    for start in range(0, len(vertices), PROJECTION_BLOCK):
        check_cancel(should_cancel)
        stop = start + PROJECTION_BLOCK
        moves[start:stop] = plane_projection(vertices[start:stop], tree, points, settings)
    return moves


def refine_to_points(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray,
                     settings: RefineSettings = RefineSettings(),
                     progress: Callable[[float], None] | None = None,
                     should_cancel: Callable[[], bool] | None = None) -> np.ndarray:
    """Canonical vertices (V, 3) of a mesh with faces (F, 3) and input points (P, 3) -> refined
    vertices (V, 3) float32; faces are unchanged.
    progress(fraction in [0, 1]) is called after every round (a round takes seconds on a large
    256^3 mesh); should_cancel() before every block of vertices in every round, raising Cancelled."""
    import trimesh

    points = np.asarray(points, dtype=np.float64)
    if len(vertices) == 0 or len(points) < settings.min_neighbours:
        return np.asarray(vertices, dtype=np.float32).copy()
    mesh = trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), faces, process=False)
    averaging = trimesh.smoothing.laplacian_calculation(mesh)  # built once, used every round
    tree = cKDTree(points)
    for done in range(settings.rounds):
        vertices_now = np.asarray(mesh.vertices)
        mesh.vertices = vertices_now + blockwise_projection(vertices_now, tree, points, settings, should_cancel)
        trimesh.smoothing.filter_taubin(mesh, iterations=settings.smoothing_steps, laplacian_operator=averaging)
        if progress is not None:
            progress((done + 1) / settings.rounds)
    return np.asarray(mesh.vertices, dtype=np.float32)


def check_cancel(should_cancel: Callable[[], bool] | None) -> None:
    """Raise Cancelled when the caller asked to stop."""
    if should_cancel is not None and should_cancel():
        raise Cancelled()
