"""Pure mesh functions for data preparation: load + validate + normalise, inside test, sampling.

Everything here works on plain numpy arrays so it can be tested without files and reused by the
renderer. Coordinates follow docs/CONTRACTS.md: a normalised shape fits in [-0.5, 0.5]^3 and
occupancy queries live in the padded box [-0.5 - padding/2, 0.5 + padding/2]^3.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backend.sampling import sample_triangles

MESH_SUFFIXES = (".obj", ".off", ".ply", ".stl", ".glb")
# Formats whose specification says +y is up (glTF); the others here are read as z-up, like CAPOD.
Y_UP_SUFFIXES = (".glb", ".gltf")

# A point is inside when its generalised winding number exceeds this (1 inside, 0 outside for a
# closed surface; holes blur it smoothly, which is why it works for non-watertight meshes).
WINDING_INSIDE_THRESHOLD = 0.5


class MeshError(ValueError):
    """A mesh that cannot be prepared (unreadable, empty, non-finite, degenerate)."""


def load_mesh(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a mesh file as one triangle mesh (scenes are merged) and validate it.

    Returns vertices (V, 3) float64 and faces (F, 3) int64, in the file's own coordinates.
    Raises MeshError for anything that would crash or poison later stages.
    """
    import trimesh

    try:
        # process=False: merging vertices etc. on raw data is exactly what crashes on NaN input,
        # so validation must come first.
        mesh = trimesh.load(str(path), force="mesh", process=False)
    except Exception as exc:  # trimesh raises many different types for unreadable files
        raise MeshError(f"cannot read mesh: {type(exc).__name__}: {exc}") from exc
    if not isinstance(mesh, trimesh.Trimesh):
        raise MeshError(f"file holds no triangle mesh (got {type(mesh).__name__})")
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    validate_mesh(vertices, faces)
    if Path(path).suffix.lower() in Y_UP_SUFFIXES:
        vertices = y_up_to_z_up(vertices)
    return vertices, faces


def y_up_to_z_up(vertices: np.ndarray) -> np.ndarray:
    """(V, 3) -> (V, 3): glTF's +y up becomes the +z up of Blender and of every other shape here
    (x stays, glTF's +z front becomes -y, Blender's front)."""
    return np.stack([vertices[:, 0], -vertices[:, 2], vertices[:, 1]], axis=1)


def validate_mesh(vertices: np.ndarray, faces: np.ndarray) -> None:
    """Raise MeshError unless vertices (V, 3) are finite and faces (F, 3) index them."""
    if vertices.ndim != 2 or vertices.shape[1] != 3 or len(vertices) == 0:
        raise MeshError(f"mesh has no vertices (vertex array shape {vertices.shape})")
    if faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
        raise MeshError(f"mesh has no triangles (face array shape {faces.shape})")
    bad = ~np.isfinite(vertices).all(axis=1)
    if bad.any():
        raise MeshError(f"{int(bad.sum())} of {len(vertices)} vertices have NaN/inf coordinates")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise MeshError(f"face indices out of range [0, {len(vertices)})")


def normalisation(vertices: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre (3,) of the bounding box and its longest edge (the scale), as in the contract."""
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    scale = float((hi - lo).max())
    if not scale > 0:
        raise MeshError("mesh has zero extent (all vertices coincide)")
    return (lo + hi) / 2.0, scale


def apply_normalisation(vertices: np.ndarray, center: np.ndarray, scale: float) -> np.ndarray:
    """(V, 3) -> (V, 3): x_norm = (x - center) / scale."""
    return (vertices - np.asarray(center, dtype=np.float64)) / float(scale)


def triangle_areas_and_normals(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Areas (F,) and unit normals (F, 3) of the triangles; degenerate ones get area 0, normal 0."""
    tri = vertices[faces]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    double_area = np.linalg.norm(cross, axis=1)
    normals = np.zeros_like(cross)
    ok = double_area > 0
    normals[ok] = cross[ok] / double_area[ok, None]
    return double_area / 2.0, normals


def winding_numbers(vertices: np.ndarray, faces: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Generalised winding number (Q,) of each query point (Q, 3) w.r.t. the triangle soup."""
    import igl

    return igl.fast_winding_number(
        np.ascontiguousarray(vertices, dtype=np.float64),
        np.ascontiguousarray(faces, dtype=np.int64),
        np.ascontiguousarray(queries, dtype=np.float64),
    )


def split_long_edges(vertices: np.ndarray, faces: np.ndarray, max_edge: float) -> tuple[np.ndarray, np.ndarray]:
    """The same surface with triangles subdivided until no edge exceeds max_edge.

    The winding number of the surface is unchanged, but igl's fast winding number becomes ~7x
    faster on low-poly meshes (its octree cannot separate queries from a few huge triangles,
    so nearly every query falls back to exact evaluation).
    """
    import trimesh

    try:
        return trimesh.remesh.subdivide_to_size(vertices, faces, max_edge=max_edge)
    except ValueError:  # needs too many halvings (degenerate slivers): exactness matters more
        return vertices, faces


def inside(vertices: np.ndarray, faces: np.ndarray, queries: np.ndarray, max_edge: float | None = 0.1) -> np.ndarray:
    """Occupancy (Q,) bool of query points (Q, 3) w.r.t. a mesh in canonical units.

    |w| rather than w: a mesh whose triangles all face inwards gives w = -1 inside; the absolute
    value makes that case right too without guessing the orientation.
    """
    if max_edge is not None:
        vertices, faces = split_long_edges(vertices, faces, max_edge)
    return np.abs(winding_numbers(vertices, faces, queries)) > WINDING_INSIDE_THRESHOLD


def sample_uniform(rng: np.random.Generator, count: int, half_extent: float) -> np.ndarray:
    """(count, 3) points uniform in [-half_extent, half_extent]^3."""
    return rng.uniform(-half_extent, half_extent, size=(count, 3))


def sample_surface(
    rng: np.random.Generator, vertices: np.ndarray, faces: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Area-weighted surface samples: points (count, 3) and their triangles' unit normals (count, 3)."""
    try:
        points, face_index = sample_triangles(rng, vertices, faces, count)
    except ValueError as exc:
        raise MeshError(str(exc)) from None
    return points, triangle_areas_and_normals(vertices, faces)[1][face_index]


def perturb(rng: np.random.Generator, points: np.ndarray, sigmas: tuple[float, ...]) -> np.ndarray:
    """Surface points (N, 3) + isotropic Gaussian noise; the N points are split evenly over sigmas."""
    sigma_per_point = np.asarray(sigmas, dtype=np.float64)[np.arange(len(points)) % len(sigmas)]
    return points + rng.normal(size=points.shape) * sigma_per_point[:, None]


def as_stored_float16(points: np.ndarray) -> np.ndarray:
    """(N, 3) -> (N, 3) float16, the storage precision; labels are computed on these rounded
    positions so a stored point never carries the label of its unrounded neighbour."""
    return points.astype(np.float16)


def shape_samples(
    vertices: np.ndarray,
    faces: np.ndarray,
    rng: np.random.Generator,
    count: int = 100_000,
    padding: float = 0.1,
    near_sigmas: tuple[float, ...] = (0.01, 0.03),
) -> dict[str, np.ndarray]:
    """All training samples of one normalised mesh (vertices in the unit box).

    Returns points (count, 3) f16, occupancies (ceil(count/8),) u8 packed,
    near_points (count, 3) f16, near_occupancies packed u8,
    surface_points (count, 3) f32, surface_normals (count, 3) f32.
    """
    surface_points, surface_normals = sample_surface(rng, vertices, faces, count)
    uniform_points = as_stored_float16(sample_uniform(rng, count, 0.5 + padding / 2))
    near_points = as_stored_float16(perturb(rng, surface_points, near_sigmas))
    occupancy = inside(vertices, faces, np.concatenate([uniform_points, near_points]).astype(np.float64))
    return {
        "points": uniform_points,
        "occupancies": np.packbits(occupancy[:count]),
        "near_points": near_points,
        "near_occupancies": np.packbits(occupancy[count:]),
        "surface_points": surface_points.astype(np.float32),
        "surface_normals": surface_normals.astype(np.float32),
    }
