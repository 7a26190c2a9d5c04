"""Points sampled on a triangle mesh, uniformly by area (the data preparation's surface samples and
the image path's occluders both draw them)."""

from __future__ import annotations

import numpy as np


def sample_triangles(rng: np.random.Generator, vertices: np.ndarray, faces: np.ndarray, count: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Area-weighted surface samples of vertices (V, 3), faces (F, 3): points (count, 3) and the
    index (count,) of each one's triangle. Raises ValueError when no triangle has any area."""
    corners = vertices[faces]
    areas = np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1) / 2.0
    total = areas.sum()
    if not total > 0:
        raise ValueError("mesh has zero surface area (all triangles degenerate)")
    face_index = rng.choice(len(faces), size=count, p=areas / total)
    # Uniform barycentric coordinates: fold the unit square onto the triangle.
    u, v = rng.random(count), rng.random(count)
    fold = u + v > 1
    u[fold], v[fold] = 1 - u[fold], 1 - v[fold]
    tri = corners[face_index]
    return tri[:, 0] + u[:, None] * (tri[:, 1] - tri[:, 0]) + v[:, None] * (tri[:, 2] - tri[:, 0]), face_index
