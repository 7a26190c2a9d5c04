"""Mesh extraction: multiresolution octree evaluation (MISE) and marching cubes."""

from .marching import MeshArrays, grid_to_mesh, simplify_mesh
from .mise import MiseResult, dense_grid, mise

__all__ = ["MeshArrays", "MiseResult", "dense_grid", "grid_to_mesh", "mise", "simplify_mesh"]
