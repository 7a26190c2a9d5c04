"""MISE against the dense grid, and decoder throughput. Prints one JSON line per measurement.

    python bench/extraction.py [--resolutions 128 256] [--full] [--device cpu|cuda]

Dense grids of the paper's decoder at 256^3 take minutes on a small CPU (17M evaluations); they
are skipped unless --full is given or the device is CUDA.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="also run the slow dense grids")
    args = parser.parse_args()
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
