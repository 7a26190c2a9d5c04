"""Synthetic prepared data in the docs/CONTRACTS.md format: ellipsoids and boxes with analytic
occupancy, surface samples with normals and orthographic silhouette renders. Small and fast, for
the training / evaluation tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

HALF_EXTENT = 0.55  # padded query box, padding 0.1


def random_shape(rng: np.random.Generator, kind: str) -> dict:
    """A canonical shape: longest bbox edge 1, centred at the origin. half: (3,) half extents."""
    half = rng.uniform(0.2, 0.5, size=3)
    half[rng.integers(0, 3)] = 0.5
    return {"kind": kind, "half": half}


def inside(shape: dict, points: np.ndarray) -> np.ndarray:
    """Analytic occupancy (N,) bool of points (N, 3)."""
    h = shape["half"]
    if shape["kind"] == "ellipsoid":
        return ((points / h) ** 2).sum(axis=1) <= 1.0
    return (np.abs(points) <= h).all(axis=1)


def surface_samples(shape: dict, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Points (count, 3) on the surface and their unit outward normals (count, 3)."""
    h = shape["half"]
    if shape["kind"] == "ellipsoid":
        u = rng.normal(size=(count, 3))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        pts = u * h
        normals = pts / h ** 2
    else:
        areas = np.array([h[1] * h[2], h[0] * h[2], h[0] * h[1]])
        axis = rng.choice(3, size=count, p=areas / areas.sum())
        sign = rng.choice([-1.0, 1.0], size=count)
        pts = rng.uniform(-h, h, size=(count, 3))
        pts[np.arange(count), axis] = sign * h[axis]
        normals = np.zeros((count, 3))
        normals[np.arange(count), axis] = sign
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    return pts.astype(np.float32), normals.astype(np.float32)


def silhouette(shape: dict, axis: int, size: int) -> np.ndarray:
    """Orthographic RGBA render (size, size, 4) uint8 looking along `axis`; alpha = mask."""
    a, b = [i for i in range(3) if i != axis]
    coords = (np.arange(size) + 0.5) / size * 2 * HALF_EXTENT - HALF_EXTENT
    u, v = np.meshgrid(coords, -coords)  # row 0 = top
    h = shape["half"]
    if shape["kind"] == "ellipsoid":
        r2 = (u / h[a]) ** 2 + (v / h[b]) ** 2
        mask = r2 <= 1.0
        shade = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
    else:
        mask = (np.abs(u) <= h[a]) & (np.abs(v) <= h[b])
        shade = np.full(u.shape, 0.8)
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    color = np.array([200, 80, 60]) if shape["kind"] == "ellipsoid" else np.array([60, 120, 200])
    rgba[..., :3] = (color * (0.3 + 0.7 * shade)[..., None]).astype(np.uint8)
    rgba[..., 3] = np.where(mask, 255, 0)
    return rgba


def write_shape(folder: Path, shape: dict, shape_id: str, rng: np.random.Generator, points_per_shape: int,
                views: int, image_size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    uniform = rng.uniform(-HALF_EXTENT, HALF_EXTENT, size=(points_per_shape, 3))
    surface, normals = surface_samples(shape, points_per_shape, rng)
    near = surface + rng.normal(0.0, 0.01, size=surface.shape)
    np.savez(folder / "points.npz",
             points=uniform.astype(np.float16),
             occupancies=np.packbits(inside(shape, uniform.astype(np.float16).astype(np.float64))),
             near_points=near.astype(np.float16),
             near_occupancies=np.packbits(inside(shape, near.astype(np.float16).astype(np.float64))))
    np.savez(folder / "pointcloud.npz", points=surface, normals=normals)
    (folder / "shape.json").write_text(json.dumps({
        "id": shape_id, "source": "synthetic", "class": shape["kind"], "center": [0.0, 0.0, 0.0],
        "scale": 1.0, "watertight_input": True,
        "synthetic": {"kind": shape["kind"], "half": [float(v) for v in shape["half"]]}}))
    if views:
        (folder / "images").mkdir(exist_ok=True)
        for view in range(views):
            Image.fromarray(silhouette(shape, (2 - view) % 3, image_size)).save(folder / "images" / f"{view:03d}.png")


def make_prepared_dataset(root, n_train: int = 8, n_val: int = 2, n_test: int = 2, points_per_shape: int = 20000,
                          views: int = 2, image_size: int = 64, seed: int = 0) -> Path:
    """Write a prepared folder with ellipsoids and boxes (alternating) and return its path."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    splits = {"train": n_train, "val": n_val, "test": n_test}
    root.mkdir(parents=True, exist_ok=True)
    (root / "split").mkdir(exist_ok=True)
    counter = 0
    for split, count in splits.items():
        ids = []
        for _ in range(count):
            kind = "ellipsoid" if counter % 2 == 0 else "box"
            shape_id = f"synthetic_{kind}_{counter:03d}"
            write_shape(root / shape_id, random_shape(rng, kind), shape_id, rng, points_per_shape, views, image_size)
            ids.append(shape_id)
            counter += 1
        (root / "split" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "meta.json").write_text(json.dumps({"format": 1, "points_per_shape": points_per_shape, "padding": 0.1,
                                                "views": views, "image_size": image_size}))
    (root / "failures.json").write_text("[]")
    return root
