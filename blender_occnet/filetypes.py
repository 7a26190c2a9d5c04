"""Which files the add-on takes, by extension (stdlib only: the batch command imports this before
it knows whether bpy is there). The backend reads the point clouds (backend/pointclouds.py, asked
through the read_points request), so every format it knows works here; a test keeps the two lists
equal."""

import os

POINT_EXTENSIONS = (".ply", ".las", ".laz", ".e57", ".pcd", ".xyz", ".txt", ".pts", ".csv", ".npy", ".npz",
                    ".obj", ".off")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tga", ".tif", ".tiff", ".exr", ".webp")


def input_kind(path):
    """"points", "image", or None for a file the add-on does not take."""
    ext = os.path.splitext(path)[1].lower()
    if ext in POINT_EXTENSIONS:
        return "points"
    if ext in IMAGE_EXTENSIONS:
        return "image"
    return None
