"""Single-image reconstruction on objects the models never saw: photo-like renders of the meshes
in `classic` (Cycles, 4 views each: three 3/4 views and one from above), every method run on the
PNG alone. Prints one JSON line per image and method, then a table of means.

    python bench/image.py [--meshes ../shared/data/meshes/classic] [--renders out/bench_image]
                          [--checkpoint PATH] [--old-checkpoint PATH] [--resolution R] [--limit N] [--full]

Methods
  ours:  the default image model (viewer-centred); compared with the truth in the view's viewer
         frame (backend.camera) as returned, with no alignment.
  old:   the previous canonical-frame model (image_resnet18), after the best similarity alignment
         to the truth (its frame is not the viewer's), so its numbers are a generous upper bound.
  slab:  the picture's outline extruded into a slab through the object's centre, as deep as the
         outline's narrower side.
Metrics (training.metrics): Chamfer-L1 x10, normal consistency and F-score at 1% in the viewer
frame (the object is about one unit wide there); silhouette IoU of the result projected back through
the input camera against the input mask; seconds per image with the model loaded (warm).
Renders are cached in --renders; the meshes are read as y-up (how these OBJ files are stored).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VIEWS = ((45.0, 20.0), (165.0, 20.0), (285.0, 20.0), (100.0, 60.0))  # (azimuth, elevation) degrees
IMAGE_SIZE = 256
FOCAL_35MM = 50.0
SURFACE_POINTS = 100_000
METHODS = ("ours", "old", "slab")
COLUMNS = ("fscore", "chamfer_l1_x10", "normal_consistency", "silhouette_iou", "seconds")


def view_cameras(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The benchmark's cameras: (4, 4, 4) world->camera and (4, 3, 3) intrinsics of a 50 mm
    (35 mm equivalent, diagonal) lens, each far enough for the canonical box to fit."""
    from backend import camera
    from backend.viewer import FULL_FRAME_DIAGONAL_MM

    focal = FOCAL_35MM * math.sqrt(2.0) / FULL_FRAME_DIAGONAL_MM    # fraction of a square image's width
    distance = camera.fitting_distance(focal)
    world_mats = []
    for azimuth, elevation in VIEWS:
        a, e = math.radians(azimuth), math.radians(elevation)
        eye = distance * np.array([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])
        world_mats.append(camera.look_at(eye))
    return np.stack(world_mats), np.repeat(camera.intrinsics(size, focal)[None], len(VIEWS), axis=0)


def load_normalised(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A classic mesh, y-up turned z-up, normalised to the canonical box."""
    from training import meshprep

    vertices, faces = meshprep.load_mesh(path)
    vertices = meshprep.y_up_to_z_up(vertices)
    centre, scale = meshprep.normalisation(vertices)
    return meshprep.apply_normalisation(vertices, centre, scale), faces


def render_mesh(task: dict) -> dict:
    """Worker: render the views of one mesh into task["out"] (skipping existing files)."""
    from training import render
    from training.prepare import stable_seed

    out = Path(task["out"])
    paths = [out / f"{Path(task['mesh']).stem}_{view}.png" for view in range(len(VIEWS))]
    if all(p.is_file() for p in paths):
        return {"mesh": task["mesh"], "rendered": 0}
    vertices, faces = load_normalised(task["mesh"])
    world_mats, camera_mats = view_cameras(IMAGE_SIZE)
    renderer = render.CyclesRenderer(IMAGE_SIZE, samples=32)
    rng = np.random.default_rng(stable_seed(Path(task["mesh"]).stem, "bench_image"))
    out.mkdir(parents=True, exist_ok=True)
    for view, path in enumerate(paths):
        renderer.render_photo(vertices, faces, world_mats[view], camera_mats[view], rng, path)
    return {"mesh": task["mesh"], "rendered": len(paths)}


def render_all(meshes: list[Path], out: Path, workers: int) -> list[Path]:
    """Render every mesh's views in isolated workers; the meshes whose renders exist afterwards."""
    from training.prepare import run_isolated

    tasks = [{"mesh": str(m), "out": str(out)} for m in meshes]
    for task, ok, result in run_isolated(render_mesh, tasks, workers, timeout_s=900):
        if not ok:
            print(f"render failed: {task['mesh']}: {result}", file=sys.stderr)
    return [m for m in meshes if all((out / f"{m.stem}_{v}.png").is_file() for v in range(len(VIEWS)))]


def rasterise(vertices_uv: np.ndarray, faces: np.ndarray, size: int) -> np.ndarray:
    """(size, size) bool: the triangles (F, 3) of 2D points (V, 2) (pixel coordinates) filled."""
    from PIL import Image, ImageDraw

    canvas = Image.new("1", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for triangle in vertices_uv[faces]:
        draw.polygon([tuple(p) for p in triangle], fill=1)
    return np.asarray(canvas, bool)


def silhouette_iou(viewer_vertices: np.ndarray, faces: np.ndarray, view) -> float:
    """IoU of the mesh (viewer frame) projected through the crop camera with the crop's mask."""
    from backend import camera

    size = view.mask.shape[0]
    if len(faces) == 0:
        return 0.0
    uv, _ = camera.project_viewer(viewer_vertices, size, view.crop.focal)
    drawn = rasterise(uv, faces, size)
    union = (drawn | view.mask).sum()
    return float((drawn & view.mask).sum() / union) if union else 1.0


def slab_mesh(view, resolution: int):
    """The outline extruded through viewer depth 0, as deep as the outline's narrower side."""
    import torch

    from backend import camera
    from backend.extraction import grid_to_mesh, mise
    from backend.viewer import inside_mask

    mask_t = torch.from_numpy(view.mask)
    rows, cols = np.nonzero(view.mask)
    size = view.mask.shape[0]
    corners = np.array([[cols.min(), rows.min()], [cols.max(), rows.max()]], dtype=float)
    extent = camera.unproject_viewer(corners, np.full(2, camera.object_depth(view.crop.focal)), size, view.crop.focal)
    depth = float(np.abs(extent[1, :2] - extent[0, :2]).min())

    def evaluate(p: torch.Tensor) -> torch.Tensor:
        inside = inside_mask(p, mask_t, view.crop.focal) & (p[:, 2].abs() < depth / 2)
        return torch.where(inside, 10.0, -10.0).to(p.dtype)

    steps = int(round(math.log2(resolution / 32)))
    grid = mise(evaluate, 32, steps, level=0.0, box=(-camera.VIEW_HALF_EXTENT, camera.VIEW_HALF_EXTENT))
    mesh = grid_to_mesh(grid.values, 0.0, grid.box_min, grid.spacing)
    return mesh.vertices.astype(np.float64), mesh.faces


def best_similarity(source: np.ndarray, target: np.ndarray, iterations: int = 12) -> np.ndarray:
    """(4, 4) similarity that best aligns points source (N, 3) to target (M, 3): ICP with scale
    (Umeyama steps) from the 24 axis-aligned rotations, keeping the lowest Chamfer distance.
    Correspondences run both ways, or a scaled ICP would shrink the source onto a patch."""
    from scipy.spatial.transform import Rotation

    from backend.extraction.nearest import NearestPoints

    target_tree = NearestPoints(target)
    best, best_error = np.eye(4), np.inf
    source_centre, target_centre = source.mean(axis=0), target.mean(axis=0)
    scale0 = np.sqrt(((target - target_centre) ** 2).sum(1).mean() / max(((source - source_centre) ** 2).sum(1).mean(), 1e-12))
    for start in Rotation.create_group("O").as_matrix():
        rotation, scale = start, scale0
        translation = target_centre - scale * rotation @ source_centre
        for _ in range(iterations):  # 12 steps: the 24 starts, not the iterations, find the basin
            moved = scale * source @ rotation.T + translation
            to_target = target_tree.query(moved)[1]
            to_source = NearestPoints(moved).query(target)[1]
            pairs_source = np.concatenate([source, source[to_source]])
            pairs_target = np.concatenate([target[to_target], target])
            mu_s, mu_t = pairs_source.mean(axis=0), pairs_target.mean(axis=0)
            covariance = (pairs_target - mu_t).T @ (pairs_source - mu_s) / len(pairs_source)
            u, d, vt = np.linalg.svd(covariance)
            sign = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
            rotation = u @ sign @ vt
            scale = float(np.trace(np.diag(d) @ sign) / max(((pairs_source - mu_s) ** 2).sum(1).mean(), 1e-12))
            translation = mu_t - scale * rotation @ mu_s
        moved = scale * source @ rotation.T + translation
        error = float(target_tree.query(moved)[0].mean() + NearestPoints(moved).query(target)[0].mean())
        if error < best_error:
            best_error = error
            best = np.eye(4)
            best[:3, :3], best[:3, 3] = scale * rotation, translation
    return best


def score(vertices: np.ndarray, faces: np.ndarray, gt_points, gt_normals, view, rng) -> dict:
    from training.metrics import mesh_metrics, sample_mesh_surface

    points, normals = sample_mesh_surface(vertices, faces, SURFACE_POINTS, rng)
    metrics = mesh_metrics(points, normals, gt_points, gt_normals)
    return {"fscore": metrics["fscore"], "chamfer_l1_x10": metrics["chamfer_l1_x10"],
            "normal_consistency": metrics["normal_consistency"],
            "silhouette_iou": silhouette_iou(vertices, faces, view)}


def run_image(path: Path, mesh_path: Path, view_index: int, reconstructors: dict, args) -> list[dict]:
    from PIL import Image

    from backend import camera
    from backend.errors import OccnetError
    from backend.foreground import object_mask
    from backend.pipeline import ReconstructOptions
    from backend.viewer import photo_camera, viewer_input
    from training.evaluate import to_output_inverse, viewer_ground_truth
    from training.metrics import sample_mesh_surface, unit_normals

    rgba = np.asarray(Image.open(path).convert("RGBA"), np.float32) / 255.0
    world_mats, camera_mats = view_cameras(IMAGE_SIZE)
    similarity = viewer_ground_truth(rgba[..., 3], world_mats[view_index], camera_mats[view_index])
    vertices, faces = load_normalised(str(mesh_path))
    rng = np.random.default_rng(view_index)
    gt_points, gt_face_normals = sample_mesh_surface(vertices, faces, SURFACE_POINTS, rng)
    gt_points = camera.transform_points(similarity, gt_points.astype(np.float64))
    gt_normals = unit_normals(gt_face_normals.astype(np.float64) @ similarity[:3, :3].T)
    view = viewer_input(rgba, object_mask(rgba), photo_camera(*rgba.shape[:2]), 128)
    rows = []
    base = {"image": path.name, "mesh": mesh_path.stem, "view": view_index}
    for method in METHODS:
        start = time.perf_counter()
        failure, model_seconds = None, None
        try:
            if method == "slab":
                pred_vertices, pred_faces = slab_mesh(view, args.resolution)
            else:
                options = ReconstructOptions(checkpoint=args.checkpoint if method == "ours" else args.old_checkpoint,
                                             resolution=args.resolution)
                result = reconstructors[method].reconstruct_image(rgba, options)
                model_seconds = result.stats["seconds"]["total"] - result.stats["seconds"].get("load", 0.0)
                pred_faces = result.faces
                if method == "ours":
                    pred_vertices = to_output_inverse(result)
                else:
                    sample = sample_mesh_surface(result.vertices, result.faces, 5000, rng)[0].astype(np.float64)
                    align = best_similarity(sample, gt_points[:: max(1, len(gt_points) // 5000)])
                    pred_vertices = camera.transform_points(align, result.vertices.astype(np.float64))
        except OccnetError as error:
            failure = f"{error.code}: {error}"
            pred_vertices, pred_faces = np.zeros((0, 3)), np.zeros((0, 3), np.int64)
        # Warm: the pipeline's own time without loading the model; the alignment is not counted.
        seconds = model_seconds if model_seconds is not None else time.perf_counter() - start
        row = {**base, "method": method, **score(pred_vertices, pred_faces, gt_points, gt_normals, view, rng),
               "seconds": round(seconds, 3), "faces": int(len(pred_faces)), "failure": failure}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'method':<8}{'images':>7}" + "".join(f"{c:>20}" for c in COLUMNS) + f"{'failures':>10}"
    print(head)
    print("-" * len(head))
    for method in METHODS:
        group = [r for r in rows if r["method"] == method]
        if group:
            print(f"{method:<8}{len(group):>7}" + "".join(f"{np.mean([r[c] for r in group]):>20.4f}" for c in COLUMNS)
                  + f"{sum(r['failure'] is not None for r in group):>10}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meshes", type=Path, default=ROOT.parent / "shared" / "data" / "meshes" / "classic")
    parser.add_argument("--renders", type=Path, default=ROOT / "out" / "bench_image")
    parser.add_argument("--checkpoint", help="the viewer-centred model (default: the shipped default)")
    parser.add_argument("--old-checkpoint", default=str(ROOT / "backend" / "weights" / "image_resnet18.safetensors"))
    parser.add_argument("--resolution", type=int, help="grid per axis (default 64; 128 with --full)")
    parser.add_argument("--limit", type=int, help="only the first N meshes")
    parser.add_argument("--workers", type=int, default=2, help="render processes")
    parser.add_argument("--full", action="store_true",
                        help="all 4 views per mesh at 128^3 (default: one 3/4 view and the view from above at "
                             "64^3, under 5 min)")
    args = parser.parse_args(argv)
    args.resolution = args.resolution or (128 if args.full else 64)
    if not args.meshes.is_dir():
        print(f"skipped: {args.meshes} does not exist (the shared meshes are not here)", file=sys.stderr)
        return 0
    import torch

    from backend.pipeline import Reconstructor
    from training.meshprep import MESH_SUFFIXES

    torch.set_num_threads(2)
    meshes = sorted(p for p in args.meshes.iterdir() if p.suffix.lower() in MESH_SUFFIXES)[: args.limit]
    meshes = render_all(meshes, args.renders, args.workers)
    reconstructors = {"ours": Reconstructor("cpu"), "old": Reconstructor("cpu")}
    rows = []
    views = range(len(VIEWS)) if args.full else (0, len(VIEWS) - 1)
    for mesh in meshes:
        for view in views:
            rows += run_image(args.renders / f"{mesh.stem}_{view}.png", mesh, view, reconstructors, args)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
