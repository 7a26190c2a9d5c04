"""Writing meshes to files (trimesh picks the format from the extension)."""

from pathlib import Path

import numpy as np

from .errors import OccnetError

MESH_SUFFIXES = (".obj", ".ply", ".glb", ".stl", ".off")


def check_output_path(path) -> Path:
    """Refuse an output we could not write before any work is done."""
    path = Path(path)
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise OccnetError("bad_output", f"{path}: unknown mesh format {path.suffix or '(no extension)'!r}; "
                                        f"use one of {' '.join(MESH_SUFFIXES)}")
    if not path.parent.exists():
        raise OccnetError("bad_output", f"{path}: the folder {path.parent} does not exist")
    return path


def save_mesh(path, vertices: np.ndarray, faces: np.ndarray, normals: np.ndarray | None = None,
              colors: np.ndarray | None = None) -> Path:
    """Write (V, 3) vertices and (F, 3) faces as they are (no merging or reordering)."""
    import trimesh

    path = check_output_path(path)
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, vertex_normals=normals, process=False)
    if colors is not None:
        mesh.visual.vertex_colors = (np.clip(colors, 0.0, 1.0) * 255).astype(np.uint8)
    tmp = path.with_name(path.name + ".part")
    try:
        mesh.export(tmp, file_type=path.suffix.lower().lstrip("."))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
