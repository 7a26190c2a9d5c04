"""From a value grid to a triangle mesh: marching cubes (scikit-image) on a padded grid, so every
mesh is closed, and optional decimation to a face budget."""

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
    padded = np.pad(values.astype(np.float32, copy=False), 1, mode="constant", constant_values=OUTSIDE)
    if not (padded > level).any():
        return MeshArrays(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32))
    verts, faces, _, _ = measure.marching_cubes(padded, level=level, allow_degenerate=False)
    # Inside is the larger value; scikit-image then winds faces clockwise seen from outside.
    faces = faces[:, ::-1]
    verts = (verts - 1.0) * spacing + box_min
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


def _check_cancel(should_cancel: Callable[[], bool] | None) -> None:
    if should_cancel is not None and should_cancel():
        raise Cancelled()
