"""Evaluate a checkpoint on a prepared split, the Occupancy Networks way:

    python -m training.evaluate CHECKPOINT DATA_DIR --split test [--resolution 128] [--out CSV]

Per shape: the input (point cloud: N surface points + Gaussian noise, in the canonical frame;
image: one view on white) is encoded once, then
  * iou: the network's occupancy (probability > threshold) at the uniform points of points.npz
    against their ground truth;
  * a mesh is extracted (backend.extraction: MISE + marching cubes), 100k points with face normals
    are sampled on it and compared with the 100k points + normals of pointcloud.npz
    (training.metrics.mesh_metrics: accuracy, completeness, Chamfer-L1 (raw and x10, the paper's
    table scale), normal consistency, F-score at 1% of the unit cube).
Results per shape go to --out (CSV), means per class to <out>_classes.csv, and a table is printed.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from backend.checkpoint import load_checkpoint
from backend.extraction import grid_to_mesh, mise
from backend.preprocess import image_to_model_input

from .dataset import ShapeArrays, ShapeStore, decode_view, read_split, sample_surface_input, split_by_renders
from .metrics import mesh_metrics, occupancy_iou, sample_mesh_surface

QUERY_BOX = (-0.55, 0.55)
COARSE_RESOLUTION = 32
METRIC_COLUMNS = ("iou", "chamfer_l1", "chamfer_l1_x10", "normal_consistency", "fscore", "accuracy",
                  "completeness", "chamfer_l2", "precision", "recall")
TABLE_COLUMNS = ("iou", "chamfer_l1_x10", "normal_consistency", "fscore")


def logit(probability: float) -> float:
    return math.log(probability / (1.0 - probability))


def model_input(model, config: dict, shape: ShapeArrays, rng: np.random.Generator, num_points: int,
                noise: float, view: int) -> torch.Tensor:
    """The encoder's input for one shape, batch of one: (1, N, 3) points or (1, 3, S, S) image."""
    if model.input_kind == "points":
        return torch.from_numpy(sample_surface_input(shape.surface_points, num_points, noise, rng))[None]
    rgba = decode_view(shape.views[view % len(shape.views)])
    return torch.from_numpy(image_to_model_input(rgba, int(config["input"]["image_size"])))[None]


@torch.no_grad()
def predict_occupancy_logits(model, code, points: np.ndarray, device, batch_points: int = 100000) -> np.ndarray:
    """Logits (M,) of the network at canonical points (M, 3)."""
    out = []
    for start in range(0, len(points), batch_points):
        p = torch.from_numpy(np.asarray(points[start:start + batch_points], dtype=np.float32)).to(device)[None]
        out.append(model.decode(p, code)[0].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


@torch.no_grad()
def extract_mesh(model, code, resolution: int, level: float, device, seed_points: torch.Tensor | None):
    """MISE from 32^3 up to resolution^3, then marching cubes -> (vertices (V, 3), faces (F, 3)),
    both possibly empty, in canonical coordinates."""
    steps = int(round(math.log2(resolution / COARSE_RESOLUTION))) if resolution > COARSE_RESOLUTION else 0
    grid = mise(lambda p: model.decode(p[None], code)[0].float(), min(resolution, COARSE_RESOLUTION), steps,
                level=level, box=QUERY_BOX, seed_points=seed_points, device=device)
    mesh = grid_to_mesh(grid.values, level, grid.box_min, grid.spacing)
    return mesh.vertices, mesh.faces


def evaluate_shape(model, config: dict, shape: ShapeArrays, index: int, args, device) -> dict:
    """All metrics for one shape -> one CSV row."""
    start = time.perf_counter()
    rng = np.random.default_rng([args.seed, index])
    noise = float(config["input"].get("noise", 0.0)) if args.noise is None else args.noise
    num_points = int(config["input"].get("num_points", 3000)) if args.num_points is None else args.num_points
    inputs = model_input(model, config, shape, rng, num_points, noise, args.view).to(device)
    level = logit(args.threshold)
    with torch.no_grad():
        code = model.encode(inputs)
    logits = predict_occupancy_logits(model, code, shape.uniform_points, device)
    iou = occupancy_iou(logits > level, shape.uniform_occupancies)
    seeds = inputs[0] if model.input_kind == "points" else None
    vertices, faces = extract_mesh(model, code, args.resolution, level, device, seeds)
    pred_points, pred_normals = sample_mesh_surface(vertices, faces, args.surface_points, rng)
    metrics = mesh_metrics(pred_points, pred_normals, shape.surface_points, shape.surface_normals, args.fscore_threshold)
    row = {"shape_id": shape.shape_id, "class": shape.class_name, "iou": iou}
    row.update({k: metrics[k] for k in METRIC_COLUMNS if k != "iou"})
    row.update({"empty_mesh": metrics["empty_mesh"], "faces": len(faces), "input_points": num_points if seeds is not None else 0,
                "seconds": round(time.perf_counter() - start, 3)})
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
    p.add_argument("--resolution", type=int, default=128, help="final marching-cubes grid (MISE from 32)")
    p.add_argument("--out", help="per-shape CSV (per-class means go to <out>_classes.csv)")
    p.add_argument("--threshold", type=float, default=0.5, help="occupancy probability of the surface")
    p.add_argument("--num-points", type=int, help="input points (default: the checkpoint's input.num_points)")
    p.add_argument("--noise", type=float, help="input noise sigma (default: the checkpoint's input.noise)")
    p.add_argument("--view", type=int, default=0, help="rendered view used for image models")
    p.add_argument("--surface-points", type=int, default=100000, help="points sampled on the predicted mesh")
    p.add_argument("--fscore-threshold", type=float, default=0.01, help="F-score distance (1%% of the unit cube)")
    p.add_argument("--max-shapes", type=int, help="evaluate only the first K shapes of the split")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0.0 < args.threshold < 1.0:
        p.error("--threshold must lie strictly between 0 and 1")
    if args.resolution < COARSE_RESOLUTION and args.resolution not in (16, 8):
        p.error("--resolution must be 8, 16, or 32 * 2**k")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model, config, _ = load_checkpoint(args.checkpoint, device)
    ids = read_split(Path(args.data_dir), args.split)
    if model.input_kind == "image":
        ids, bare = split_by_renders(args.data_dir, ids)
        if bare:
            print(f"left out {len(bare)} shapes without rendered views", file=sys.stderr)
    if args.max_shapes:
        ids = ids[: args.max_shapes]
    if not ids:
        print(f"no shapes in split {args.split!r} of {args.data_dir}", file=sys.stderr)
        return 1
    store = ShapeStore(args.data_dir, ids, surface=True, normals=True, images=model.input_kind == "image")
    rows = []
    from tqdm import tqdm
    for index in tqdm(range(len(store)), desc=f"evaluating {args.split}", unit="shape", dynamic_ncols=True):
        rows.append(evaluate_shape(model, config, store.get(index), index, args, device))
        store.forget(index)  # one shape at a time: the test split need not fit in memory
    summary = class_means(rows)
    print(format_table(summary))
    print("chamfer_l1_x10 is Chamfer-L1 x 10 (the Occupancy Networks paper's table scale); "
          f"F-score at {args.fscore_threshold}; IoU at probability {args.threshold}")
    if args.out:
        out = Path(args.out)
        write_csv(out, rows)
        write_csv(out.with_name(out.stem + "_classes.csv"), summary)
        print(f"wrote {out} and {out.with_name(out.stem + '_classes.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
