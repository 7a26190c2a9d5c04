"""Test-time refinement of a mesh extracted from a point-cloud model: pull the surface onto the
input points, then smooth.

The network's surface is only as precise as its feature planes (a cell is ~1/64 of the box). The
input points are measured data: where enough of them lie around a vertex, a plane fitted to them
(a moving-least-squares step) says where the surface is, and the vertex is moved along that
plane's normal. Sparse regions (few points nearby) keep the network's surface. Taubin smoothing
(no shrinkage) then removes the marching-cubes staircase and the remaining noise.
"""

import numpy as np
from scipy.spatial import cKDTree


def project_onto_points(vertices: np.ndarray, points: np.ndarray, neighbours: int = 32, radius: float = 0.05,
                        min_neighbours: int = 6, max_move: float = 0.015) -> np.ndarray:
    """vertices (V, 3) -> (V, 3): each vertex with at least min_neighbours input points (P, 3)
    within radius moves onto the least-squares plane of those points, by at most max_move.
    Units are those of the canonical box (longest edge 1)."""
    if len(points) < min_neighbours or len(vertices) == 0:
        return vertices.copy()
    k = min(neighbours, len(points))
    distances, index = cKDTree(points).query(vertices, k=k, distance_upper_bound=radius)
    distances, index = distances.reshape(len(vertices), k), index.reshape(len(vertices), k)
    valid = np.isfinite(distances)
    weights = valid.astype(np.float64)
    near = points[np.where(valid, index, 0)]                                  # (V, k, 3)
    count = weights.sum(axis=1)
    centroid = (near * weights[..., None]).sum(axis=1) / np.maximum(count, 1.0)[:, None]
    spread = (near - centroid[:, None]) * weights[..., None]
    covariance = np.einsum("vki,vkj->vij", spread, spread)
    normal = np.linalg.eigh(covariance)[1][:, :, 0]                           # smallest eigenvector
    move = -np.einsum("vi,vi->v", vertices - centroid, normal)[:, None] * normal
    length = np.linalg.norm(move, axis=1, keepdims=True)
    move *= np.minimum(1.0, max_move / np.maximum(length, 1e-12))
    out = vertices.astype(np.float64, copy=True)
    fitted = count >= min_neighbours
    out[fitted] += move[fitted]
    return out


def taubin_smooth(vertices: np.ndarray, faces: np.ndarray, iterations: int = 10) -> np.ndarray:
    """Taubin's lambda/mu smoothing (trimesh): removes high-frequency noise without shrinking."""
    import trimesh

    mesh = trimesh.Trimesh(vertices, faces, process=False)
    trimesh.smoothing.filter_taubin(mesh, iterations=iterations)
    return np.asarray(mesh.vertices)


def refine_to_points(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray,
                     smoothing_iterations: int = 10) -> np.ndarray:
    """The whole refinement: (V, 3) canonical vertices -> (V, 3) float32; faces are unchanged, so
    the mesh stays watertight."""
    moved = project_onto_points(vertices.astype(np.float64), points.astype(np.float64))
    return taubin_smooth(moved, faces, smoothing_iterations).astype(np.float32)
