"""DVR multi-view fitting against 3D supervision on closed shapes of the prepared test split: the
same network and the same time budget (CPU seconds) for each kind of supervision. Prints one JSON line per
shape and mode, then a table of means per mode.

    nice -n 10 python bench/dvr.py [--data data/prepared] [--shapes ID ...] [--views 24] [--size 64]
                                   [--seconds 12] [--threads 1] [--modes masks masks+rgb ...]
                                   [--hidden 64] [--blocks 3] [--pictures OUT.png]

Views: 24 training and 4 held-out cameras of training.render (random azimuth, elevation and lens,
each as far as it needs for the canonical box), ray cast on the normalised mesh (Open3D: exact
masks and depths), coloured by a fixed colour field on the surface, the same from every side
(DVR's assumption of a diffuse object; the prepared renders' random per-view looks break it).
Modes (training/dvr.py's losses): masks; masks+rgb (the paper's 2D supervision); masks+depth
(2.5D); 3d (occupancy at the prepared points: what Occupancy Networks train on).
Metrics (training/metrics.py): IoU at the prepared uniform points; Chamfer-L1 x10 and normal
consistency from 100k points on the mesh extracted at 128^3 (MISE) against the prepared surface
points; PSNR of the held-out views rendered by the ray marcher (black background both sides),
for the modes that see colour.
--pictures: a sheet rendered with Blender, a row per shape: two of the input views, each mode's
mesh in its colours (grey for modes without colour), the truth in its colour field, all from the
same viewpoint above the shape.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_SHAPES = ("basemeshes_d20_dice", "basemeshes_flower_pot", "capod_m101")
MODES = {
    "masks": {"mask": 1.0},
    "masks+rgb": {"mask": 1.0, "rgb": 1.0},
    "masks+depth": {"mask": 1.0, "depth": 1.0},
    "3d": {"points": 1.0},
}
HELD_OUT_VIEWS = 4
EVAL_POINTS = 100_000
METRICS = ("iou", "chamfer_l1_x10", "normal_consistency", "psnr", "steps")


def colour_field(points: np.ndarray) -> np.ndarray:
    """A smooth, varied albedo (N, 3) in [0.1, 0.9]: colour changes across every shape."""
    return (0.5 + 0.4 * np.sin(np.stack([7.0 * points[:, 0] + 2.0, 5.0 * points[:, 1] - 3.0 * points[:, 2],
                                         6.0 * points[:, 2] + 4.0 * points[:, 0]], axis=1))).astype(np.float32)


def source_mesh(shape_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (V, 3) in the canonical box and faces (F, 3) of a prepared shape's source mesh."""
    from training.prepare import normalised_mesh

    source = json.loads((shape_dir / "shape.json").read_text())["source"]
    vertices, faces, _, _ = normalised_mesh(str(ROOT / source) if not Path(source).is_absolute() else source)
    return vertices, faces


def shape_views(shape_dir: Path, views: int, size: int, seed: int):
    """(training views, held-out views) of a prepared shape's normalised source mesh."""
    from training.posed_images import cast_views, mesh_caster
    from training.render import random_cameras

    vertices, faces = source_mesh(shape_dir)
    world_mats, camera_mats = random_cameras(np.random.default_rng(seed), views + HELD_OUT_VIEWS, size)
    all_views = cast_views(mesh_caster(vertices, faces), world_mats, camera_mats, size, colour_field)
    return all_views.subset(range(views)), all_views.subset(range(views, views + HELD_OUT_VIEWS))


def evaluate(model, truth, held_out, sees_colour: bool, rng) -> tuple[dict, tuple]:
    """(metrics, the fitted mesh as training.dvr.fitted_mesh returns it)."""
    from training.dvr import fitted_mesh, predicted_occupancy, psnr, render
    from training.metrics import mesh_metrics, occupancy_iou, sample_mesh_surface

    mesh = vertices, faces, _ = fitted_mesh(model)
    points, normals = sample_mesh_surface(vertices, faces, EVAL_POINTS, rng)
    out = mesh_metrics(points, normals, truth.surface_points, truth.surface_normals)
    out["iou"] = occupancy_iou(predicted_occupancy(model, truth.uniform_points.astype(np.float32)),
                               truth.uniform_occupancies)
    out["psnr"] = psnr(render(model, held_out)[1], held_out.colours) if sees_colour else float("nan")
    return out, mesh


def model_config(hidden: int, blocks: int) -> dict:
    return {"input": {"kind": "none"}, "encoder": {"name": "none"},
            "decoder": {"name": "textured_field", "hidden": hidden, "n_blocks": blocks, "texture": True}}


def run_shape(data: Path, shape_id: str, modes: list[str], args, meshes: dict | None = None) -> list[dict]:
    """One row per mode; meshes, when given, gains meshes[shape_id] = {"views": training views,
    mode: (vertices, faces, colours or None), "truth": (vertices, faces, colours)}."""
    import torch

    from backend.models import build_model
    from training.dataset import load_shape
    from training.dvr import FitSettings, OccupancySamples, fit

    shape_dir = data / shape_id
    truth = load_shape(shape_dir, surface=True, normals=True, images=False)
    samples = OccupancySamples(truth.uniform_points, truth.uniform_occupancies, truth.near_points, truth.near_occupancies)
    views, held_out = shape_views(shape_dir, args.views, args.size, args.seed)
    if meshes is not None:
        meshes[shape_id] = {"views": views, "truth": truth_mesh(shape_dir)}
    rows = []
    for mode in modes:
        torch.manual_seed(args.seed)
        model = build_model(model_config(args.hidden, args.blocks))
        settings = FitSettings.from_config({"losses": MODES[mode], "steps": 10**9, "seconds": args.seconds,
                                            "rays": 1024, "lr": 1e-3, "seed": args.seed,
                                            "ray_steps": [[0, 16], [150, 32], [300, 64]]})
        log = fit(model, views, settings, samples, clock=time.process_time)
        metrics, mesh = evaluate(model, truth, held_out, "rgb" in MODES[mode], np.random.default_rng(args.seed))
        if meshes is not None:
            meshes[shape_id][mode] = mesh
        rows.append({"shape": shape_id, "mode": mode, "steps": len(log), "seconds": log[-1]["seconds"],
                     **{k: metrics[k] for k in ("iou", "chamfer_l1_x10", "normal_consistency", "psnr")}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def truth_mesh(shape_dir: Path) -> tuple:
    """The normalised source mesh of a prepared shape, in colour_field's colours."""
    vertices, faces = source_mesh(shape_dir)
    return vertices, faces, colour_field(vertices)


PICTURE_TILE = 192
PICTURE_DIRECTION = np.array([-1.0, 1.3, -0.9])   # looking down at the shape from the front right
PICTURE_INPUTS = 2


def picture_sheet(meshes: dict, modes: list[str], out: Path) -> None:
    """meshes as run_shape fills it -> a PNG sheet at out (see the module's docstring)."""
    import tempfile

    from PIL import Image

    from training.render import BlenderRenderer, framing_view

    renderer = BlenderRenderer(PICTURE_TILE)
    work = Path(tempfile.mkdtemp(prefix="occnet_dvr_pictures_"))
    columns = PICTURE_INPUTS + len(modes) + 1
    sheet = Image.new("RGB", (columns * PICTURE_TILE, len(meshes) * PICTURE_TILE), "white")
    for row, (shape_id, shown) in enumerate(meshes.items()):
        views = shown["views"]
        tiles = []
        for index in range(PICTURE_INPUTS):
            rgb = np.where(views.masks[index][..., None], views.colours[index], 1.0)
            tiles.append(Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)))
        world_mat = framing_view(shown["truth"][0], PICTURE_DIRECTION)
        for name in modes + ["truth"]:
            vertices, faces, colours = shown[name]
            colours = colours if name == "truth" or "rgb" in MODES[name] else None   # only RGB modes learn it
            if len(faces) == 0:
                tiles.append(Image.new("RGB", (PICTURE_TILE, PICTURE_TILE), "white"))
                continue
            image = renderer.picture(vertices, faces, world_mat, work / f"{shape_id}_{name}.png", colours)
            tiles.append(Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA")))
        for column, tile in enumerate(tiles):
            sheet.paste(tile.convert("RGB").resize((PICTURE_TILE, PICTURE_TILE)), (column * PICTURE_TILE, row * PICTURE_TILE))
    sheet.save(out)
    print(f"wrote {out} (columns: {PICTURE_INPUTS} input views, {', '.join(modes)}, truth)")


def table(rows: list[dict], modes: list[str]) -> str:
    lines = [f"| mode | shapes | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    for mode in modes:
        sel = [r for r in rows if r["mode"] == mode]
        means = [np.nanmean([r[m] for r in sel]) if not all(np.isnan(r[m]) for r in sel) else float("nan")
                 for m in METRICS]
        lines.append(f"| {mode} | {len(sel)} | " + " | ".join("-" if np.isnan(v) else f"{v:.3f}" if m != "steps"
                                                               else f"{v:.0f}" for m, v in zip(METRICS, means)) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "prepared")
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES))
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--views", type=int, default=24)
    parser.add_argument("--size", type=int, default=64, help="pixels per side of each view")
    parser.add_argument("--seconds", type=float, default=12.0,
                        help="fitting budget per shape and mode, in CPU seconds of this process (the same "
                             "for every mode however busy the machine is)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=64, help="width of the field's trunk")
    parser.add_argument("--blocks", type=int, default=3, help="residual blocks of the field's trunk")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pictures", type=Path, help="also write a sheet of the results rendered with Blender")
    args = parser.parse_args(argv)
    missing = [s for s in args.shapes if not (args.data / s / "points.npz").is_file()]
    if missing:
        print(f"skipped: prepared shapes not found in {args.data}: {', '.join(missing)}")
        return 0
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    meshes = {} if args.pictures else None
    rows = [row for shape_id in args.shapes for row in run_shape(args.data, shape_id, args.modes, args, meshes)]
    print(f"\n{len(args.shapes)} shapes, {args.views} views of {args.size}^2, {args.seconds:g} s per fit, "
          f"field {args.hidden} x {args.blocks} blocks, "
          f"{args.threads} thread(s), {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"total {time.monotonic() - start:.0f} s\n")
    print(table(rows, args.modes))
    if meshes:
        picture_sheet(meshes, args.modes, args.pictures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
