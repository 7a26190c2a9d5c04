"""Writing meshes to files (trimesh picks the format from the extension). Vertex colours travel
as PLY red/green/blue/alpha, OBJ `v x y z r g b` and GLB COLOR_0; STL and OFF hold none."""

from pathlib import Path

import numpy as np

from .atomic import atomic_write, check_writable_folder
from .errors import OutputError

MESH_SUFFIXES = (".obj", ".ply", ".glb", ".stl", ".off")


def check_output_path(path) -> Path:
    """Refuse an output we could not write before any work is done."""
    path = Path(path)
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise OutputError(f"{path}: unknown mesh format {path.suffix or '(no extension)'!r}; "
                          f"use one of {' '.join(MESH_SUFFIXES)}")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; name a mesh file to write")
    if not path.parent.is_dir():
        raise OutputError(f"{path}: the folder {path.parent} does not exist")
    try:
        check_writable_folder(path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write into {path.parent} ({exc.strerror or exc})") from exc
    return path


def save_mesh(path, vertices: np.ndarray, faces: np.ndarray, normals: np.ndarray | None = None,
              colors: np.ndarray | None = None) -> Path:
    """Write (V, 3) vertices and (F, 3) faces as they are (no merging or reordering), atomically;
    normals (V, 3) and colors (V, 3|4) RGB(A) in [0, 1] where the format holds them."""
    import trimesh

    path = check_output_path(path)
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, vertex_normals=normals, process=False)
    if colors is not None:
        mesh.visual.vertex_colors = np.round(np.clip(colors, 0.0, 1.0) * 255).astype(np.uint8)
    file_type = path.suffix.lower().lstrip(".")
    try:
        atomic_write(path, lambda temp: mesh.export(temp, file_type=file_type))
    except OSError as exc:  # a full disk, a quota, a folder that became read-only meanwhile
        raise OutputError(f"{path}: cannot write the mesh ({exc.strerror or exc})") from exc
    return path
