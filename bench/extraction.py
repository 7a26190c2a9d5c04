"""MISE against the dense grid, and decoder throughput. Prints one JSON line per measurement.

    python bench/extraction.py [--resolutions 128 256] [--full] [--device cpu|cuda]
    python bench/extraction.py --decimation [--tolerances 0.001 0.002] [--meshes DIR] [--limit N]
    python bench/extraction.py --refinement [--resolutions 128] [--meshes DIR] [--limit N]

Dense grids of the paper's decoder at 256^3 take minutes on a small CPU (17M evaluations); they
are skipped unless --full is given or the device is CUDA.

--decimation: faces against quality of the point-cloud path's output. bench/pointcloud.py's
convonet protocol (3000 noisy points per classic mesh, its metrics and its screened Poisson); each
cloud is reconstructed once, with every face of the grid kept, and that same mesh is then
decimated to each tolerance (canonical units), so the rows differ in the decimation alone.
--refinement: the same clouds; the unrefined grid mesh refined with fresh searches and fits every
round and with the defaults (which keep planes and neighbours while they hold): seconds (wall and
CPU, the refinement alone) and quality; with every neighbour in the plane fits (sheet_reach None: a
thin part's far face too); then with the points' normals (the mesh's own, and those
turned about 10 degrees to either side, as a scanner estimates them).
"""

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.extraction import dense_grid, grid_to_mesh, mise  # noqa: E402
from backend.models import build_model, preset  # noqa: E402

BATCH = 65536


def sphere(p):
    return 0.35 - p.norm(dim=1)


def torus(p):
    ring = torch.sqrt(p[:, 0] ** 2 + p[:, 2] ** 2) - 0.3
    return 0.1 - torch.sqrt(ring ** 2 + p[:, 1] ** 2)


def random_decoder(name: str, device):
    """A full-size decoder with random weights and a random input, and the median of its values in
    the box as the level (so a surface runs through it)."""
    torch.manual_seed(0)
    model = build_model(preset(name)).to(device).eval()
    if name == "onet_points":
        for block in model.decoder.blocks:  # a fresh model's residual branches are zero
            torch.nn.init.normal_(block.fc_1.weight, std=0.05)
        with torch.inference_mode():
            code = torch.randn(1, 512, device=device)
    else:
        pts = (torch.rand(1, 3000, 3, device=device) - 0.5) * 0.8
        with torch.inference_mode():
            code = model.encode(pts)

    def evaluate(p):
        return model.decode(p[None], code)[0]

    with torch.inference_mode():
        level = float(evaluate(torch.rand(50000, 3, device=device) * 1.1 - 0.55).median())
    return evaluate, level


def trained_point_model(device):
    """The shipped default point-cloud model on the example point cloud (examples/chair_points.xyz),
    or None when no default model is installed."""
    from backend.defaults import DEFAULT_CHECKPOINTS
    from backend.checkpoint import load_checkpoint
    from backend.inputs import load_points, normalisation

    path = DEFAULT_CHECKPOINTS["points"]
    if not path.is_file():
        return None
    model, _, _ = load_checkpoint(path, device)
    points = load_points(Path(__file__).resolve().parents[1] / "examples" / "chair_points.xyz")
    center, scale = normalisation(points)
    with torch.inference_mode():
        code = model.encode(torch.from_numpy((points - center) / scale).float().to(device)[None])

    def evaluate(p):
        return model.decode(p[None], code)[0]

    return evaluate


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = fn()
    sync(device)
    return out, time.perf_counter() - start


def compare(name, evaluate, level, resolution, device, run_dense: bool):
    steps = int(np.log2(resolution // 32))
    sparse, t_sparse = timed(lambda: mise(evaluate, 32, steps, level=level, batch_points=BATCH, device=device), device)
    row = {"bench": "mise_vs_dense", "function": name, "resolution": resolution, "device": str(device),
           "mise_evaluations": sparse.evaluations, "mise_seconds": round(t_sparse, 3)}
    if run_dense:
        dense, t_dense = timed(lambda: dense_grid(evaluate, resolution, batch_points=BATCH, device=device), device)
        a = grid_to_mesh(sparse.values, level, sparse.box_min, sparse.spacing)
        b = grid_to_mesh(dense.values, level, dense.box_min, dense.spacing)
        same_triangles = bool(np.array_equal(a.faces, b.faces))
        # Batched matrix products round differently from one batch size to the next, so vertices
        # agree up to float noise; measured in voxels of the final grid.
        offset = float(np.abs(a.vertices - b.vertices).max() / sparse.spacing) if same_triangles else None
        row.update(dense_evaluations=dense.evaluations, dense_seconds=round(t_dense, 3),
                   evaluation_ratio=round(dense.evaluations / sparse.evaluations, 1),
                   speedup=round(t_dense / t_sparse, 1), same_triangles=same_triangles,
                   max_vertex_offset_voxels=offset,
                   same_signs=bool(np.array_equal(sparse.values > level, dense.values > level)), faces=len(a.faces))
    else:
        dense_evals = (resolution + 1) ** 3
        row.update(dense_evaluations=dense_evals, evaluation_ratio=round(dense_evals / sparse.evaluations, 1),
                   dense_seconds=None, note="dense grid skipped (use --full)")
    print(json.dumps(row), flush=True)


def throughput(name: str, device, repeats: int = 3):
    torch.manual_seed(0)
    config = preset(name)
    model = build_model(config).to(device).eval()
    if config["input"]["kind"] == "image":
        size = config["input"]["image_size"]
        inputs = torch.rand(1, 3, size, size, device=device)
    else:
        inputs = torch.rand(1, 3000, 3, device=device) - 0.5
    p = torch.rand(1, BATCH, 3, device=device) * 1.1 - 0.55
    with torch.inference_mode():
        code = model.encode(inputs)
        model.decode(p, code)  # warm-up
    _, seconds = timed(lambda: [model.decode(p, code) for _ in range(repeats)], device)
    row = {"bench": "decoder_throughput", "model": name, "decoder": config["decoder"]["name"],
           "batch_points": BATCH, "device": str(device), "points_per_second": round(BATCH * repeats / seconds),
           "parameters": sum(t.numel() for t in model.decoder.parameters())}
    print(json.dumps(row), flush=True)
    return row["points_per_second"]


@dataclass
class ScanCase:
    """One benchmark mesh, normalised, as the convonet protocol scans it: its ground truth
    (surface points and normals, occupancy at uniform queries) and 3000 noisy points with the
    true normals of the points they were sampled at."""
    rng: np.random.Generator
    gt_surface: np.ndarray  # (EVAL_POINTS, 3)
    gt_normals: np.ndarray  # (EVAL_POINTS, 3)
    queries: np.ndarray     # (EVAL_POINTS, 3) uniform in the padded box
    occupancy: np.ndarray   # (EVAL_POINTS,) bool
    noisy: np.ndarray       # (N, 3)
    normals: np.ndarray     # (N, 3)


def scan_case(path: Path, seed: int) -> ScanCase | None:
    """The ScanCase of a mesh file; None for a mesh that encloses no volume."""
    from bench.pointcloud import EVAL_POINTS, PROTOCOLS
    from training.meshprep import apply_normalisation, inside, load_mesh, normalisation, sample_surface

    rng = np.random.default_rng(seed)
    vertices, faces = load_mesh(path)
    vertices = apply_normalisation(vertices, *normalisation(vertices))
    gt_surface, gt_normals = sample_surface(rng, vertices, faces, EVAL_POINTS)
    queries = rng.uniform(-0.55, 0.55, size=(EVAL_POINTS, 3))
    occupancy = inside(vertices, faces, queries)
    if not occupancy.any():
        return None
    count, sigma = PROTOCOLS["convonet"]
    surface, normals = sample_surface(rng, vertices, faces, count)
    noisy = surface + rng.normal(scale=sigma, size=surface.shape)
    return ScanCase(rng, gt_surface, gt_normals, queries, occupancy, noisy, normals)


def decimation_rows(reconstructor, path: Path, seed: int, tolerances: list[float], resolution: int) -> list[dict]:
    """Rows (method, faces, seconds, metrics) for one mesh: the grid's mesh as is, decimated to each
    tolerance, and screened Poisson, all on the same 3000 noisy points."""
    from backend.extraction import MeshArrays
    from backend.extraction.marching import simplify_to_tolerance
    from backend.pipeline import ReconstructOptions
    from bench.pointcloud import poisson_mesh, score

    case = scan_case(path, seed)
    if case is None:
        return []
    rng, noisy = case.rng, case.noisy
    gt_surface, gt_normals, queries, occupancy = case.gt_surface, case.gt_normals, case.queries, case.occupancy
    start = time.perf_counter()
    result = reconstructor.reconstruct_points(noisy, ReconstructOptions(resolution=resolution, max_faces=2 ** 31 - 1))
    seconds = time.perf_counter() - start
    center, scale = np.asarray(result.stats["center"]), result.stats["scale"]
    canonical = MeshArrays(((result.vertices - center) / scale).astype(np.float32), result.faces)
    meshes = {"grid": (canonical, seconds)}
    for tolerance in tolerances:
        start = time.perf_counter()
        meshes[f"tolerance_{tolerance:g}"] = (simplify_to_tolerance(canonical, tolerance), time.perf_counter() - start)
    rows = []
    for method, (mesh, seconds) in meshes.items():
        metrics = score(mesh.vertices.astype(np.float64) * scale + center, mesh.faces, gt_surface, gt_normals,
                        queries, occupancy, rng)
        rows.append({"shape": path.stem, "method": method, "faces": len(mesh.faces), "seconds": seconds, **metrics})
    start = time.perf_counter()
    v, f = poisson_mesh(noisy)
    rows.append({"shape": path.stem, "method": "screened_poisson", "faces": len(f),
                 "seconds": time.perf_counter() - start, **score(v, f, gt_surface, gt_normals, queries, occupancy, rng)})
    return rows


def refinement_rows(reconstructor, path: Path, seed: int, resolution: int) -> list[dict]:
    """Rows (settings, refine seconds wall and CPU, metrics) for one mesh: the grid's unrefined
    mesh refined with fresh searches and fits every round (refit_spacing 0, the planes of the
    refinement as first written, to float rounding), with the defaults, and with the defaults and
    the points' normals, on the same points."""
    from backend.extraction.refine import RefineSettings, refine_to_points
    from backend.pipeline import ReconstructOptions
    from bench.pointcloud import score

    case = scan_case(path, seed)
    if case is None:
        return []
    rng, noisy, normals = case.rng, case.noisy, case.normals
    gt_surface, gt_normals, queries, occupancy = case.gt_surface, case.gt_normals, case.queries, case.occupancy
    # a scanner's estimated normals: about 10 degrees off, and either side of the surface
    turned = (normals + rng.normal(scale=np.tan(np.radians(10.0)) / np.sqrt(2.0), size=normals.shape)) * \
        rng.choice([-1.0, 1.0], size=(len(normals), 1))
    raw = reconstructor.reconstruct_points(noisy, ReconstructOptions(resolution=resolution, refine=False,
                                                                     max_faces=2 ** 31 - 1))
    center, scale = np.asarray(raw.stats["center"]), raw.stats["scale"]
    canonical, points = (raw.vertices - center) / scale, (noisy - center) / scale
    rows = []
    variants = (("every_round", RefineSettings(refit_spacing=0.0), None), ("default", RefineSettings(), None),
                ("both_sheets", RefineSettings(sheet_reach=None), None),
                ("true_normals", RefineSettings(), normals), ("normals_10deg_either_side", RefineSettings(), turned))
    for name, settings, given in variants:
        wall, cpu = time.perf_counter(), time.process_time()
        refined = refine_to_points(canonical, raw.faces, points, settings, normals=given)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        metrics = score(refined.astype(np.float64) * scale + center, raw.faces, gt_surface, gt_normals, queries,
                        occupancy, rng)
        rows.append({"shape": path.stem, "method": name, "faces": len(raw.faces), "seconds": wall, "cpu_seconds": cpu,
                     **metrics})
    return rows


def shape_table(bench: str, shape_rows, meshes: Path, resolution: int, limit: int | None) -> None:
    """bench --decimation or --refinement: shape_rows(reconstructor, path, seed) for each mesh as one
    JSON line per shape and method, then the means as a Markdown table."""
    from backend.pipeline import Reconstructor

    reconstructor = Reconstructor("cpu")
    paths = sorted(p for p in meshes.iterdir() if p.suffix.lower() in (".obj", ".off", ".ply", ".stl", ".glb"))
    rows = []
    for seed, path in enumerate(paths[:limit]):
        try:
            found = shape_rows(reconstructor, path, seed)
        except Exception as exc:  # as bench/pointcloud.py: a mesh that cannot be read is skipped, and named
            print(json.dumps({"bench": bench, "shape": path.stem, "error": f"{type(exc).__name__}: {exc}"}))
            continue
        for row in found:
            row = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()
                   if k in ("shape", "method", "faces", "seconds", "cpu_seconds", "iou", "chamfer_l1_x10",
                            "normal_consistency", "fscore")}
            print(json.dumps({"bench": bench, "resolution": resolution, **row}), flush=True)
            rows.append(row)
    columns = ("faces", "iou", "chamfer_l1_x10", "normal_consistency", "fscore", "seconds") + \
        (("cpu_seconds",) if rows and "cpu_seconds" in rows[0] else ())
    print(f"\n{resolution}^3, means over {len(rows) and len({r['shape'] for r in rows})} shapes\n")
    print("| method | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for method in dict.fromkeys(r["method"] for r in rows):
        means = [np.mean([r[c] for r in rows if r["method"] == method]) for c in columns]
        print(f"| {method} | {means[0]:,.0f} | " + " | ".join(f"{m:.4f}" for m in means[1:]) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="also run the slow dense grids")
    parser.add_argument("--decimation", action="store_true", help="faces against quality at 3000 points instead")
    parser.add_argument("--refinement", action="store_true", help="refinement time and quality at 3000 points instead")
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.0005, 0.001, 0.002, 0.004])
    parser.add_argument("--meshes", type=Path, default=ROOT.parent / "shared" / "data" / "meshes" / "classic")
    parser.add_argument("--limit", type=int, default=None, help="only the first N meshes")
    args = parser.parse_args()
    if args.decimation or args.refinement:
        for resolution in args.resolutions:
            if args.decimation:
                shape_table("decimation", lambda *a: decimation_rows(*a, args.tolerances, resolution), args.meshes,
                            resolution, args.limit)
            else:
                shape_table("refinement", lambda *a: refinement_rows(*a, resolution), args.meshes, resolution,
                            args.limit)
        return
    device = torch.device(args.device)
    print(json.dumps({"bench": "machine", "cpu": platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device),
                      "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}), flush=True)
    speeds = {name: throughput(name, device) for name in ("onet_points", "onet_image", "local_points")}
    print(json.dumps({"bench": "decoder_speed_ratio", "local_over_cbn":
                      round(speeds["local_points"] / speeds["onet_points"], 1)}), flush=True)
    functions = [("sphere", sphere, 0.0), ("torus", torus, 0.0)]
    for model_name, label in (("onet_points", "cbn_decoder_random"), ("local_points", "local_decoder_random")):
        evaluate, level = random_decoder(model_name, device)
        functions.append((label, evaluate, level))
    trained = trained_point_model(device)
    if trained is not None:
        functions.append(("local_decoder_trained_chair", trained, 0.0))
    for resolution in args.resolutions:
        for name, evaluate, level in functions:
            slow = name == "cbn_decoder_random" and resolution >= 256 and device.type == "cpu"
            compare(name, evaluate, level, resolution, device, run_dense=args.full or not slow)


if __name__ == "__main__":
    main()
