"""Procedural training shapes: random smooth solids written as watertight meshes.

    python -m training.procedural OUT_DIR [--count 600] [--seed 0] [--resolution 128] [--family solid|thin]

Why: the real training meshes (CAPOD, pybullet blocks) are mostly thin parts or faceted low-poly
blocks. A point-cloud model trained on them alone leaves the inside of large, smooth, organic
solids empty (measured on our own validation split and on unseen scans). These shapes are unions,
blends and cuts of random ellipsoids, rounded boxes, capsules, tori and cylinders with a
low-frequency bump field: bulky and smooth, with concavities, handles and sharp creases, and with
labels that are exact because they are closed by construction. They are written as OBJ files and
go through `training.prepare` like any other folder of meshes, so nothing downstream knows.

`--family thin` writes rods, boards and plates instead (1:10 to 1:30 thin, some with a second thin
part across): the family the point model fails on (docs/pointclouds.md). Labels stay exact: the
marching-cubes grid is fine enough for four cells across the thinnest part.

Each shape depends only on (seed, index), so a run is reproducible and resumable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .dataset import random_rotation

GRID_HALF_EXTENT = 0.6  # the field is sampled on [-0.6, 0.6]^3; primitives stay well inside


# ---------------------------------------------------------------------------------------------
# Signed distance functions of primitives in their local frame: points (M, 3) -> (M,)
# (negative inside; exact or a close bound, which is all smooth blending needs)

def sdf_ellipsoid(p: np.ndarray, radii: np.ndarray) -> np.ndarray:
    k0 = np.linalg.norm(p / radii, axis=1)
    k1 = np.linalg.norm(p / (radii * radii), axis=1)
    outside = k0 * (k0 - 1.0) / np.maximum(k1, 1e-12)
    # The usual bound degenerates to 0/0 at the centre; inside, scaling by the smallest radius is one too.
    return np.where(k0 < 1.0, (k0 - 1.0) * radii.min(), outside)


def sdf_round_box(p: np.ndarray, half: np.ndarray, rounding: float) -> np.ndarray:
    q = np.abs(p) - (half - rounding)
    outside = np.linalg.norm(np.maximum(q, 0.0), axis=1)
    inside = np.minimum(q.max(axis=1), 0.0)
    return outside + inside - rounding


def sdf_capsule(p: np.ndarray, half_length: float, radius: float) -> np.ndarray:
    q = p.copy()
    q[:, 2] -= np.clip(q[:, 2], -half_length, half_length)
    return np.linalg.norm(q, axis=1) - radius


def sdf_torus(p: np.ndarray, major: float, minor: float) -> np.ndarray:
    ring = np.linalg.norm(p[:, :2], axis=1) - major
    return np.sqrt(ring * ring + p[:, 2] ** 2) - minor


def sdf_cylinder(p: np.ndarray, half_length: float, radius: float) -> np.ndarray:
    d = np.stack([np.linalg.norm(p[:, :2], axis=1) - radius, np.abs(p[:, 2]) - half_length], axis=1)
    return np.minimum(d.max(axis=1), 0.0) + np.linalg.norm(np.maximum(d, 0.0), axis=1)


# ---------------------------------------------------------------------------------------------
# Blending

def smooth_union(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum of two fields (M,); k = blend radius, 0 = hard union."""
    if k <= 0:
        return np.minimum(a, b)
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def smooth_subtraction(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """a with b carved out, blended over k."""
    return -smooth_union(-a, b, k)


def random_primitive(rng: np.random.Generator, size: float):
    """A closure field(points (M, 3)) -> (M,) for one randomly placed, rotated primitive."""
    kind = rng.choice(["ellipsoid", "round_box", "capsule", "torus", "cylinder"], p=[0.35, 0.25, 0.15, 0.1, 0.15])
    rotation = random_rotation("so3", 2, rng)
    center = rng.uniform(-0.25, 0.25, size=3)
    if kind == "ellipsoid":
        radii = size * rng.uniform(0.35, 1.0, size=3)
        local = lambda p: sdf_ellipsoid(p, radii)
    elif kind == "round_box":
        half = size * rng.uniform(0.3, 0.9, size=3)
        rounding = float(rng.uniform(0.0, 0.6) * half.min())
        local = lambda p: sdf_round_box(p, half, rounding)
    elif kind == "capsule":
        half_length, radius = size * rng.uniform(0.3, 0.9), size * rng.uniform(0.15, 0.45)
        local = lambda p: sdf_capsule(p, half_length, radius)
    elif kind == "torus":
        major = size * rng.uniform(0.5, 0.9)
        minor = major * rng.uniform(0.15, 0.4)
        local = lambda p: sdf_torus(p, major, minor)
    else:
        half_length, radius = size * rng.uniform(0.2, 0.9), size * rng.uniform(0.2, 0.7)
        local = lambda p: sdf_cylinder(p, half_length, radius)
    return lambda p: local((p - center) @ rotation)


def bump_field(rng: np.random.Generator, amplitude: float, waves: int = 6):
    """A smooth random displacement field(points (M, 3)) -> (M,): a sum of random plane waves."""
    directions = rng.normal(size=(waves, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    frequencies = rng.uniform(4.0, 16.0, size=waves)
    phases = rng.uniform(0.0, 2 * np.pi, size=waves)
    weights = amplitude * rng.uniform(0.3, 1.0, size=waves) / np.sqrt(waves)
    return lambda p: (np.sin(p @ (directions * frequencies[:, None]).T + phases) * weights).sum(axis=1)


def random_solid(rng: np.random.Generator):
    """field(points (M, 3)) -> (M,) signed distance bound of one random solid (inside < 0)."""
    count = int(rng.integers(1, 9))
    size = float(rng.uniform(0.18, 0.4)) * (1.0 if count < 4 else 0.8)
    blend = float(rng.choice([0.0, rng.uniform(0.02, 0.12)], p=[0.3, 0.7]))
    parts = [random_primitive(rng, size * float(rng.uniform(0.6, 1.2))) for _ in range(count)]
    cuts = [random_primitive(rng, size * float(rng.uniform(0.3, 0.8))) for _ in range(int(rng.integers(0, 3)))]
    bumps = bump_field(rng, float(rng.choice([0.0, rng.uniform(0.005, 0.03)], p=[0.4, 0.6])))

    def field(p: np.ndarray) -> np.ndarray:
        d = parts[0](p)
        for part in parts[1:]:
            d = smooth_union(d, part(p), blend)
        for cut in cuts:
            d = smooth_subtraction(d, cut(p), blend * 0.5)
        return d + bumps(p)

    return field


# ---------------------------------------------------------------------------------------------
# Meshing

def field_to_mesh(field, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes of field's zero level on a (resolution+1)^3 grid of [-0.6, 0.6]^3, keeping
    the largest connected piece (specks left by cuts are noise, not shape).
    -> vertices (V, 3) float64, faces (F, 3) int64; both empty if the field has no surface."""
    import trimesh
    from skimage.measure import marching_cubes

    axis = np.linspace(-GRID_HALF_EXTENT, GRID_HALF_EXTENT, resolution + 1)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    values = field(grid).reshape((resolution + 1,) * 3)
    # Pad with "outside" so the surface is closed even where the solid touches the grid's edge.
    values = np.pad(values, 1, constant_values=1.0)
    if values.min() >= 0:
        return np.zeros((0, 3)), np.zeros((0, 3), np.int64)
    verts, faces, _, _ = marching_cubes(values, 0.0)
    spacing = 2 * GRID_HALF_EXTENT / resolution
    verts = (verts - 1.0) * spacing - GRID_HALF_EXTENT
    mesh = trimesh.Trimesh(verts, faces, process=True)
    pieces = mesh.split(only_watertight=False)
    if len(pieces) > 1:
        mesh = max(pieces, key=lambda m: abs(m.volume))
    return np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64)


def decimate(vertices: np.ndarray, faces: np.ndarray, max_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric decimation to at most about max_faces; keeps the mesh closed."""
    if len(faces) <= max_faces:
        return vertices, faces
    import fast_simplification

    v, f = fast_simplification.simplify(vertices.astype(np.float32), faces.astype(np.int32),
                                        target_reduction=1.0 - max_faces / len(faces))
    return np.asarray(v, np.float64), np.asarray(f, np.int64)


def make_shape(seed: int, index: int, resolution: int = 96, max_faces: int = 20000):
    """The index-th shape of a seed -> vertices (V, 3), faces (F, 3); retries until a solid of
    reasonable volume comes out."""
    import trimesh

    rng = np.random.default_rng([seed, index])
    for _ in range(20):
        vertices, faces = field_to_mesh(random_solid(rng), resolution)
        if len(faces) == 0:
            continue
        extent = np.ptp(vertices, axis=0)
        volume = abs(trimesh.Trimesh(vertices, faces, process=False).volume)
        # Skip slivers: they teach nothing the real data doesn't already have.
        if volume / extent.max() ** 3 > 0.02:
            return decimate(vertices, faces, max_faces)
    raise RuntimeError(f"no usable solid for seed {seed}, index {index}")


# ---------------------------------------------------------------------------------------------
# Thin solids: rods, boards and plates (the family the point model fails on; docs/pointclouds.md)

THIN_KINDS = ("rod", "board", "plate")
THIN_RATIO = (10.0, 30.0)  # longest edge over thickness


def thin_part(rng: np.random.Generator, kind: str, length: float):
    """(field, thickness) of one thin part centred at the origin, long along x: a rod (capsule,
    cylinder or square bar), a board (width 0.15-0.35 of its length) or a plate (0.4-1.0), its
    thickness 1/10 to 1/30 of its length."""
    thickness = length / float(rng.uniform(*THIN_RATIO))
    if kind == "rod":
        profile = rng.choice(["capsule", "cylinder", "bar"])
        if profile == "bar":
            half = np.array([length / 2, thickness / 2, thickness / 2])
            rounding = float(rng.uniform(0.0, 0.5)) * thickness / 2
            return (lambda p: sdf_round_box(p, half, rounding)), thickness
        along_x = lambda p: p[:, [1, 2, 0]]  # the capsule and cylinder run along z
        if profile == "capsule":
            return (lambda p: sdf_capsule(along_x(p), length / 2 - thickness / 2, thickness / 2)), thickness
        return (lambda p: sdf_cylinder(along_x(p), length / 2, thickness / 2)), thickness
    width = length * float(rng.uniform(0.15, 0.35) if kind == "board" else rng.uniform(0.4, 1.0))
    half = np.array([length / 2, width / 2, thickness / 2])
    rounding = float(rng.uniform(0.0, 0.5)) * thickness / 2
    return (lambda p: sdf_round_box(p, half, rounding)), thickness


def random_thin_solid(rng: np.random.Generator):
    """(field(points (M, 3)) -> (M,), thinnest thickness): a rod, a board or a plate spanning most of
    the box, randomly rotated; in a third of the shapes a second thin part crosses it (a sign on a
    post, a sword's guard, a shelf on a side)."""
    length = float(rng.uniform(0.8, 1.0))
    main, thickness = thin_part(rng, str(rng.choice(THIN_KINDS)), length)
    parts = [(main, np.eye(3), np.zeros(3))]
    if rng.random() < 1 / 3:
        other, other_thickness = thin_part(rng, str(rng.choice(THIN_KINDS)), length * float(rng.uniform(0.3, 0.7)))
        thickness = min(thickness, other_thickness)
        offset = np.array([rng.uniform(-0.3, 0.3) * length, 0.0, 0.0])
        parts.append((other, random_rotation("so3", 2, rng), offset))
    rotation = random_rotation("so3", 2, rng)

    def field(p: np.ndarray) -> np.ndarray:
        local = p @ rotation
        return np.min([part((local - offset) @ turn) for part, turn, offset in parts], axis=0)

    return field, thickness


def make_thin_shape(seed: int, index: int, max_faces: int = 20000, cells_per_thickness: float = 4.0):
    """The index-th thin shape of a seed -> vertices (V, 3), faces (F, 3). The marching-cubes grid
    is fine enough for cells_per_thickness cells across its thinnest part (48 to 256 a side)."""
    import trimesh

    rng = np.random.default_rng([seed, index, 1])  # a stream apart from the bulky solids'
    for _ in range(20):
        field, thickness = random_thin_solid(rng)
        resolution = int(np.clip(np.ceil(2 * GRID_HALF_EXTENT * cells_per_thickness / thickness), 48, 256))
        vertices, faces = field_to_mesh(field, resolution)
        if len(faces) == 0:
            continue
        # Quadric decimation can open a part this thin: a larger budget, else none.
        for budget in (max_faces, 2 * max_faces):
            v, f = decimate(vertices, faces, budget)
            if trimesh.Trimesh(v, f, process=False).is_watertight:
                return v, f
        return vertices, faces
    raise RuntimeError(f"no usable thin solid for seed {seed}, index {index}")


def write_obj(path: Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    """Write atomically, so an interrupted run never leaves a half-written mesh to be prepared."""
    import trimesh

    temp = path.with_suffix(".tmp")
    trimesh.Trimesh(vertices, faces, process=False).export(temp, file_type="obj")
    temp.replace(path)


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(prog="python -m training.procedural", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder for the OBJ files (then: python -m training.prepare it)")
    parser.add_argument("--count", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=96, help="marching-cubes grid per axis")
    parser.add_argument("--max-faces", type=int, default=20000)
    parser.add_argument("--family", choices=["solid", "thin"], default="solid",
                        help="solid: bulky smooth solids; thin: rods, boards and plates (1:10 to 1:30 thin; "
                             "the grid follows the thickness, --resolution is ignored)")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for index in tqdm(range(args.count), desc="shapes", unit="shape"):
        path = args.out_dir / f"{args.family}_{args.seed:02d}_{index:04d}.obj"
        if path.exists():
            continue
        if args.family == "thin":
            vertices, faces = make_thin_shape(args.seed, index, args.max_faces)
        else:
            vertices, faces = make_shape(args.seed, index, args.resolution, args.max_faces)
        write_obj(path, vertices, faces)
    return 0


if __name__ == "__main__":
    sys.exit(main())
