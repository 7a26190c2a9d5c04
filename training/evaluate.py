"""Evaluate a checkpoint on a prepared split, the Occupancy Networks way:

    python -m training.evaluate CHECKPOINT DATA_DIR --split test [--resolution 128] [--out CSV]

Per shape, the input is what a user would give (point cloud: N surface points + Gaussian noise, in
the canonical frame; image: one rendered view), and the mesh comes from the very pipeline users run
(backend.pipeline.Reconstructor: a point cloud is normalised by its own bounding box, as a user's
scan is; no test-time refinement unless --refine, so that the numbers measure the network):
  * iou: the network's occupancy (probability > threshold) at the uniform points of points.npz
    against their ground truth, the input encoded in the canonical frame as in training;
  * 100k points with face normals are sampled on the mesh and compared with the 100k points +
    normals of pointcloud.npz (training.metrics.mesh_metrics: accuracy, completeness, Chamfer-L1
    (raw and x10, the paper's table scale), normal consistency, F-score at 1% of the unit cube).
Viewer-centred image models get the render's true focal length and are scored in the view's viewer
frame (backend.camera): the ground truth is moved there, and iou compares the winding-number
inside of the returned mesh with the ground truth at the uniform points.
Results per shape go to --out (CSV), means per class to <out>_classes.csv, and a table is printed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from backend import camera
from backend.checkpoint import read_header
from backend.errors import OccnetError
from backend.pipeline import RESOLUTIONS, ReconstructOptions, Reconstructor
from backend.preprocess import image_to_model_input
from backend.viewer import FULL_FRAME_DIAGONAL_MM

from .dataset import ShapeArrays, ShapeStore, decode_view, read_split, sample_surface_input, split_by_renders
from .errors import TrainingError
from .metrics import mesh_metrics, occupancy_iou, sample_mesh_surface, unit_normals

METRIC_COLUMNS = ("iou", "chamfer_l1", "chamfer_l1_x10", "normal_consistency", "fscore", "accuracy",
                  "completeness", "chamfer_l2", "precision", "recall")
TABLE_COLUMNS = ("iou", "chamfer_l1_x10", "normal_consistency", "fscore")


def observation(kind: str, shape: ShapeArrays, rng: np.random.Generator, num_points: int, noise: float,
                view: int) -> np.ndarray:
    """What a user gives for the shape: points (N, 3) on its surface, or one rendered view (H, W, 4)."""
    if kind == "points":
        return sample_surface_input(shape.surface_points, num_points, noise, rng)
    return decode_view(shape.views[view % len(shape.views)])


@torch.no_grad()
def canonical_code(model, config: dict, observed: np.ndarray, device):
    """The network's code for an observation in the shape's canonical frame, as in training."""
    if model.input_kind == "points":
        inputs = torch.from_numpy(observed)[None]
    else:
        inputs = torch.from_numpy(image_to_model_input(observed, int(config["input"]["image_size"])))[None]
    return model.encode(inputs.to(device))


@torch.no_grad()
def predict_occupancy_logits(model, code, points: np.ndarray, device, batch_points: int = 100000) -> np.ndarray:
    """Logits (M,) of the network at canonical points (M, 3)."""
    out = []
    for start in range(0, len(points), batch_points):
        p = torch.from_numpy(np.asarray(points[start:start + batch_points], dtype=np.float32)).to(device)[None]
        out.append(model.decode(p, code)[0].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def mesh_or_empty(reconstruct) -> tuple[np.ndarray, np.ndarray]:
    """(vertices, faces) from reconstruct(); empty when the network found no surface, which is
    scored as the worst case rather than stopping the evaluation."""
    try:
        return reconstruct()
    except OccnetError as error:
        if error.code != "empty_mesh":
            raise
        return np.zeros((0, 3)), np.zeros((0, 3), np.int64)


def shape_row(shape: ShapeArrays, iou: float, vertices, faces, gt_points, gt_normals, input_points: int,
              rng: np.random.Generator, args, start: float) -> dict:
    """One CSV row: the mesh (vertices, faces) scored against the ground-truth surface samples."""
    pred_points, pred_normals = sample_mesh_surface(vertices, faces, args.surface_points, rng)
    metrics = mesh_metrics(pred_points, pred_normals, gt_points, gt_normals, args.fscore_threshold)
    row = {"shape_id": shape.shape_id, "class": shape.class_name, "iou": iou}
    row.update({k: metrics[k] for k in METRIC_COLUMNS if k != "iou"})
    row.update({"empty_mesh": metrics["empty_mesh"], "faces": len(faces), "input_points": input_points,
                "seconds": round(time.perf_counter() - start, 3)})
    return row


def evaluate_shape(reconstructor: Reconstructor, options: ReconstructOptions, kind: str, shape: ShapeArrays,
                   index: int, args) -> dict:
    """All metrics of a canonical model (input kind "points" or "image") for one shape -> one CSV row."""
    start = time.perf_counter()
    rng = np.random.default_rng([args.seed, index])
    model, config, device = reconstructor.model_for(kind, options)
    noise = float(config["input"].get("noise", 0.0)) if args.noise is None else args.noise
    num_points = int(config["input"].get("num_points", 3000)) if args.num_points is None else args.num_points
    observed = observation(kind, shape, rng, num_points, noise, args.view)
    code = canonical_code(model, config, observed, device)
    logits = predict_occupancy_logits(model, code, shape.uniform_points, device)
    iou = occupancy_iou(logits > model.surface_level(args.threshold), shape.uniform_occupancies)
    reconstruct = reconstructor.reconstruct_points if kind == "points" else reconstructor.reconstruct_image

    def mesh():
        result = reconstruct(observed, options)
        return result.vertices, result.faces

    vertices, faces = mesh_or_empty(mesh)
    return shape_row(shape, iou, vertices, faces, shape.surface_points, shape.surface_normals,
                     num_points if kind == "points" else 0, rng, args, start)


def focal_35mm(camera_mat: np.ndarray, height: int, width: int) -> float:
    """The 35 mm equivalent focal length (diagonal convention) of intrinsics (3, 3) for an H x W image."""
    return float(camera_mat[0, 0] * FULL_FRAME_DIAGONAL_MM / math.hypot(height, width))


def viewer_ground_truth(alpha: np.ndarray, world_mat: np.ndarray, camera_mat: np.ndarray) -> np.ndarray:
    """(4, 4) similarity from a shape's canonical frame to the viewer frame of a render with alpha
    (H, W) and camera (4, 4), (3, 3): the frame a viewer-centred model predicts in for that picture."""
    crop = camera.crop_camera(camera_mat, camera.crop_box(alpha > 0.5))
    return camera.viewer_from_world(world_mat, crop)


def to_output_inverse(result) -> np.ndarray:
    """The returned mesh's vertices (V, 3) moved back into the viewer frame."""
    transform = np.asarray(result.stats["viewer_to_output"], dtype=np.float64)
    return (result.vertices.astype(np.float64) - transform[:3, 3]) @ transform[:3, :3]


def evaluate_viewer_shape(reconstructor: Reconstructor, options: ReconstructOptions, shape: ShapeArrays,
                          index: int, args) -> dict:
    """All metrics of a viewer-centred image model for one shape's view -> one CSV row."""
    from .meshprep import inside

    start = time.perf_counter()
    rng = np.random.default_rng([args.seed, index])
    view = args.view % len(shape.views)
    rgba = decode_view(shape.views[view])
    world_mat, camera_mat = shape.world_mats[view], shape.camera_mats[view]
    similarity = viewer_ground_truth(rgba[..., 3], world_mat, camera_mat)
    gt_points = camera.transform_points(similarity, shape.surface_points.astype(np.float64))
    gt_normals = unit_normals(shape.surface_normals.astype(np.float64) @ similarity[:3, :3].T)
    queries = camera.transform_points(similarity, shape.uniform_points.astype(np.float64))
    options = dataclasses.replace(options, focal_length=focal_35mm(camera_mat, *rgba.shape[:2]))

    predicted_up = []

    def mesh():
        result = reconstructor.reconstruct_image(rgba, options)
        predicted_up.append(np.asarray(result.stats["viewer_to_output"])[2, :3])  # output +z, in the viewer frame
        return to_output_inverse(result), result.faces

    vertices, faces = mesh_or_empty(mesh)
    predicted_inside = inside(vertices, faces.astype(np.int64), queries) if len(faces) else np.zeros(len(queries), bool)
    iou = occupancy_iou(predicted_inside, shape.uniform_occupancies)
    row = shape_row(shape, iou, vertices, faces, gt_points, gt_normals, 0, rng, args, start)
    row["up_error_deg"] = float("nan")  # no mesh, no placement: the pipeline stopped before it
    if predicted_up:
        cosine = float(np.clip(predicted_up[0] @ camera.up_in_viewer(similarity), -1.0, 1.0))
        row["up_error_deg"] = round(math.degrees(math.acos(cosine)), 2)
    return row


def class_means(rows: list[dict]) -> list[dict]:
    """Mean of each metric per class, then "mean (classes)" (mean of class means, the paper's
    summary) and "mean (shapes)"."""
    by_class: dict[str, list[dict]] = {}
    for row in rows:
        by_class.setdefault(row["class"], []).append(row)

    def mean_row(name: str, group: list[dict]) -> dict:
        out = {"class": name, "shapes": len(group)}
        out.update({k: float(np.mean([r[k] for r in group])) for k in METRIC_COLUMNS})
        out["empty_meshes"] = int(sum(bool(r["empty_mesh"]) for r in group))
        return out

    summary = [mean_row(name, group) for name, group in sorted(by_class.items())]
    if summary:
        class_mean = {"class": "mean (classes)", "shapes": len(rows)}
        class_mean.update({k: float(np.mean([s[k] for s in summary])) for k in METRIC_COLUMNS})
        class_mean["empty_meshes"] = sum(s["empty_meshes"] for s in summary)
        summary += [class_mean, mean_row("mean (shapes)", rows)]
    return summary


def format_table(summary: list[dict]) -> str:
    """Text table of the per-class summary (chamfer_l1_x10 = Chamfer-L1 x 10, as in the paper)."""
    head = f"{'class':<20} {'shapes':>6} " + " ".join(f"{c:>18}" for c in TABLE_COLUMNS) + f" {'empty':>6}"
    lines = [head, "-" * len(head)]
    for s in summary:
        lines.append(f"{s['class']:<20} {s['shapes']:>6} " + " ".join(f"{s[c]:>18.4f}" for c in TABLE_COLUMNS)
                     + f" {s['empty_meshes']:>6}")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("data_dir")
    p.add_argument("--split", default="test")
    p.add_argument("--resolution", type=int, default=128, choices=RESOLUTIONS,
                   help="final marching-cubes grid (MISE from 32)")
    p.add_argument("--out", help="per-shape CSV (per-class means go to <out>_classes.csv)")
    p.add_argument("--threshold", type=float, default=0.5, help="occupancy probability of the surface")
    p.add_argument("--num-points", type=int, help="input points (default: the checkpoint's input.num_points)")
    p.add_argument("--noise", type=float, help="input noise sigma (default: the checkpoint's input.noise)")
    p.add_argument("--view", type=int, default=0, help="rendered view used for image models")
    p.add_argument("--surface-points", type=int, default=100000, help="points sampled on the predicted mesh")
    p.add_argument("--fscore-threshold", type=float, default=0.01, help="F-score distance (1%% of the unit cube)")
    p.add_argument("--max-shapes", type=int, help="evaluate only the first K shapes of the split")
    p.add_argument("--dataset", help="evaluate only the shapes of this dataset (the mesh folder training.prepare "
                                     "read them from, which begins their ids)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--refine", action="store_true",
                   help="point clouds: the pipeline's test-time refinement onto the input points, as users get it")
    args = p.parse_args(argv)
    if not 0.0 < args.threshold < 1.0:
        p.error("--threshold must lie strictly between 0 and 1")
    return args


def evaluate_split(args) -> list[dict]:
    """One row per shape of the split, each reconstructed by the pipeline from the checkpoint."""
    config, _ = read_header(args.checkpoint)
    kind, frame = config["input"]["kind"], config["input"].get("frame", "canonical")
    ids = read_split(Path(args.data_dir), args.split)
    if args.dataset:
        ids = [i for i in ids if i.startswith(f"{args.dataset}_")]
    if kind == "image":
        ids, bare = split_by_renders(args.data_dir, ids)
        if bare:
            print(f"left out {len(bare)} shapes without rendered views", file=sys.stderr)
    ids = ids[: args.max_shapes] if args.max_shapes else ids
    if not ids:
        dataset = f" from dataset {args.dataset!r}" if args.dataset else ""
        raise TrainingError(f"no shapes{dataset} in split {args.split!r} of {args.data_dir}")
    reconstructor = Reconstructor(args.device)
    options = ReconstructOptions(checkpoint=args.checkpoint, resolution=args.resolution, threshold=args.threshold,
                                 refine=args.refine)
    store = ShapeStore(args.data_dir, ids, surface=True, normals=True, images=kind == "image")
    rows = []
    from tqdm import tqdm
    for index in tqdm(range(len(store)), desc=f"evaluating {args.split}", unit="shape", dynamic_ncols=True):
        if frame == "viewer":
            rows.append(evaluate_viewer_shape(reconstructor, options, store.get(index), index, args))
        else:
            rows.append(evaluate_shape(reconstructor, options, kind, store.get(index), index, args))
        store.forget(index)  # one shape at a time: the test split need not fit in memory
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        rows = evaluate_split(args)
    except (TrainingError, OccnetError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    summary = class_means(rows)
    print(format_table(summary))
    print("chamfer_l1_x10 is Chamfer-L1 x 10 (the Occupancy Networks paper's table scale); "
          f"F-score at {args.fscore_threshold}; IoU at probability {args.threshold}")
    up_errors = [row["up_error_deg"] for row in rows if not math.isnan(row.get("up_error_deg", math.nan))]
    if up_errors:
        print(f"up direction (camera elevation and roll) error: median {np.median(up_errors):.1f} deg, "
              f"mean {np.mean(up_errors):.1f} deg, over {len(up_errors)} views")
    if args.out:
        out = Path(args.out)
        write_csv(out, rows)
        write_csv(out.with_name(out.stem + "_classes.csv"), summary)
        print(f"wrote {out} and {out.with_name(out.stem + '_classes.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
