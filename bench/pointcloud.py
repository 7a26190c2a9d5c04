"""Point-cloud reconstruction on meshes the models never saw: the default model against Open3D's
screened Poisson on the very same noisy points. Prints one JSON line per shape and method, then a
table per protocol: means over shapes, and the shapes won (the fraction of shapes on which ours beats
Poisson on that metric: higher IoU, NC and F-score, lower Chamfer and seconds; a tie is no win),
and below it the shapes not scored and why (a shape whose worker died is tried once more).

    python bench/pointcloud.py [--meshes ../shared/data/meshes/classic] [--protocol occnet convonet]
                               [--checkpoint PATH] [--resolution 128] [--workers 1] [--csv out.csv]
                               [--no-support]

--no-support switches off the point-cloud safety net (backend/extraction/support.py) for ours.

Protocols (points sampled on the normalised mesh, Gaussian noise of std sigma):
  occnet:  N=300,  sigma=0.005     convonet: N=3000, sigma=0.005
Metrics as training/metrics.py defines them (Chamfer-L1 printed x10, F-score at 1% of the unit cube);
IoU from the winding number of each mesh at 100k uniform points of the padded box, for both methods.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROTOCOLS = {"occnet": (300, 0.005), "convonet": (3000, 0.005)}
METRICS = ("iou", "chamfer_l1_x10", "normal_consistency", "fscore", "seconds")
LOWER_IS_BETTER = {"chamfer_l1_x10", "seconds"}
OURS, POISSON = "occnet_default", "screened_poisson"
EVAL_POINTS = 100_000

_reconstructor = None  # one per worker process, so the model loads once


def poisson_mesh(points: np.ndarray, depth: int = 8):
    """Screened Poisson (Open3D) on points (N, 3): normals estimated from 30 neighbours and
    oriented consistently over a k-nearest-neighbour graph. -> vertices (V, 3), faces (F, 3)."""
    import open3d as o3d

    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.astype(np.float64)))
    cloud.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(knn=30))
    cloud.orient_normals_consistent_tangent_plane(15)
    mesh, _ = o3d.geometry.TriangleMesh.create_from_point_cloud_poisson(cloud, depth=depth)
    return np.asarray(mesh.vertices), np.asarray(mesh.triangles)


def score(vertices, faces, gt_surface, gt_normals, queries, occupancy, rng) -> dict:
    from training.meshprep import inside
    from training.metrics import mesh_metrics, occupancy_iou, sample_mesh_surface

    points, normals = sample_mesh_surface(vertices, faces, EVAL_POINTS, rng)
    out = mesh_metrics(points, normals, gt_surface, gt_normals)
    pred_inside = inside(np.asarray(vertices, np.float64), np.asarray(faces, np.int64), queries) if len(faces) else \
        np.zeros(len(queries), bool)
    out["iou"] = occupancy_iou(pred_inside, occupancy)
    return out


def _mesh_arrays(result):
    return result.vertices, result.faces


def evaluate_shape(task: dict) -> list[dict]:
    """All protocols and both methods on one mesh; runs in an isolated worker process."""
    global _reconstructor
    from backend.pipeline import Reconstructor, ReconstructOptions
    from training.meshprep import apply_normalisation, inside, load_mesh, normalisation, sample_surface

    rng = np.random.default_rng(task["seed"])
    vertices, faces = load_mesh(task["path"])
    center, scale = normalisation(vertices)
    vertices = apply_normalisation(vertices, center, scale)
    gt_surface, gt_normals = sample_surface(rng, vertices, faces, EVAL_POINTS)
    queries = rng.uniform(-0.55, 0.55, size=(EVAL_POINTS, 3))
    occupancy = inside(vertices, faces, queries)
    if not occupancy.any():
        raise ValueError("the mesh encloses no volume (a flat or open surface): IoU is undefined, shape skipped")
    if _reconstructor is None:
        _reconstructor = Reconstructor(task["device"])
    if task.get("no_support"):
        import backend.pipeline
        backend.pipeline.POINT_SUPPORT = None
    rows = []
    for protocol in task["protocols"]:
        count, sigma = PROTOCOLS[protocol]
        surface, _ = sample_surface(rng, vertices, faces, count)
        noisy = surface + rng.normal(scale=sigma, size=surface.shape)
        options = ReconstructOptions(checkpoint=task["checkpoint"], resolution=task["resolution"])
        support = {}

        def ours():
            result = _reconstructor.reconstruct_points(noisy, options)
            support.update(result.stats.get("support") or {})
            return _mesh_arrays(result)

        methods = {OURS: ours, POISSON: lambda: poisson_mesh(noisy)}
        for method, run in methods.items():
            start = time.perf_counter()
            error = None
            try:
                v, f = run()
            except Exception as exc:  # a method that fails on a shape scores as an empty mesh
                v, f, error = np.zeros((0, 3)), np.zeros((0, 3), np.int64), f"{type(exc).__name__}: {exc}"
            seconds = time.perf_counter() - start
            metrics = score(v, f, gt_surface, gt_normals, queries, occupancy, rng)
            rows.append({"shape": task["name"], "protocol": protocol, "method": method, "points": count,
                         "sigma": sigma, "seconds": seconds, "faces": int(len(f)), "error": error,
                         **{k: metrics[k] for k in ("iou", "chamfer_l1_x10", "normal_consistency", "fscore")},
                         # what the safety net did (ours only): evaluations it cut far from the points, added
                         "support_removed": support.get("removed_evaluations") if method == OURS else None,
                         "support_added": support.get("added_evaluations") if method == OURS else None})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for protocol in PROTOCOLS:
        for method in (OURS, POISSON):
            sel = [r for r in rows if r["protocol"] == protocol and r["method"] == method]
            if sel:
                out.append({"protocol": protocol, "method": method, "shapes": len(sel),
                            **{m: float(np.mean([r[m] for r in sel])) for m in METRICS}})
    return out


def shapes_won(rows: list[dict]) -> list[dict]:
    """Per protocol: for each metric, the fraction of shapes (measured by both methods) on which
    ours is strictly better than Poisson."""
    out = []
    for protocol in PROTOCOLS:
        pairs = {}
        for r in rows:
            if r["protocol"] == protocol and r["method"] in (OURS, POISSON):
                pairs.setdefault(r["shape"], {})[r["method"]] = r
        pairs = [p for p in pairs.values() if len(p) == 2]
        if not pairs:
            continue
        won = {}
        for m in METRICS:
            better = [(p[OURS][m] < p[POISSON][m]) if m in LOWER_IS_BETTER else (p[OURS][m] > p[POISSON][m])
                      for p in pairs]
            won[m] = float(np.mean(better))
        out.append({"protocol": protocol, "method": "shapes won", "shapes": len(pairs), **won})
    return out


def evaluate_all(tasks: list[dict], workers: int) -> tuple[list[dict], dict[str, str], list[str]]:
    """Every shape's rows (printed as they come), the shapes not scored {name: why} and the names
    of those whose worker died (a native crash in a geometry library) and which were tried once
    more in a fresh one."""
    from training.prepare import run_isolated

    rows, failures, retried, pending = [], {}, [], tasks
    while pending:
        died = []
        for task, ok, result in run_isolated(evaluate_shape, pending, workers, timeout_s=1800):
            if ok:
                failures.pop(task["name"], None)
                for row in result:
                    print(json.dumps(row), flush=True)
                rows.extend(result)
                continue
            print(json.dumps({"shape": task["name"], "error": result}), flush=True)
            failures[task["name"]] = result
            if result.startswith("worker process died") and task["name"] not in retried:
                died.append(task)
        retried += [task["name"] for task in died]
        pending = died
    return rows, failures, retried


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meshes", type=Path, default=ROOT.parent / "shared" / "data" / "meshes" / "classic")
    parser.add_argument("--protocol", nargs="+", choices=sorted(PROTOCOLS), default=["occnet", "convonet"])
    parser.add_argument("--checkpoint", help="default: the shipped point-cloud model")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="only the first N meshes")
    parser.add_argument("--csv", type=Path, help="write per-shape rows here")
    parser.add_argument("--no-support", action="store_true", help="switch the point-cloud safety net off for ours")
    args = parser.parse_args(argv)
    if not args.meshes.is_dir():
        print(f"skipped: benchmark meshes not found at {args.meshes} (the shared data folder is absent)")
        return 0
    try:
        import open3d  # noqa: F401
    except ImportError as exc:  # without the baseline every "shape won" would be a win over an empty mesh
        print(f"error: screened Poisson, the baseline, needs Open3D ({exc}): pip install -e '.[bench]' "
              "(on Debian also apt-get install libusb-1.0-0)", file=sys.stderr)
        return 2
    paths = sorted(p for p in args.meshes.iterdir() if p.suffix.lower() in (".obj", ".off", ".ply", ".stl", ".glb"))
    paths = paths[: args.limit] if args.limit else paths
    tasks = [{"path": str(p), "name": p.stem, "seed": i, "protocols": args.protocol, "checkpoint": args.checkpoint,
              "resolution": args.resolution, "device": args.device, "no_support": args.no_support}
             for i, p in enumerate(paths)]
    rows, failures, retried = evaluate_all(tasks, args.workers)
    if args.csv and rows:
        import csv
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    summary = summarise(rows)
    won = shapes_won(rows)
    for row in summary + won:
        print(json.dumps({"summary": True, **row}), flush=True)
    print(f"\n{'protocol':<10}{'method':<18}{'shapes':>7}" + "".join(f"{m:>20}" for m in METRICS))
    for protocol in PROTOCOLS:
        for row in summary + won:
            if row["protocol"] == protocol:
                print(f"{row['protocol']:<10}{row['method']:<18}{row['shapes']:>7}"
                      + "".join(f"{row[m]:>20.4f}" for m in METRICS))
    for name, reason in failures.items():
        print(f"not scored: {name}: {reason}")
    for name in retried:
        if name not in failures:
            print(f"scored on a second try: {name} (its first worker died)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
