"""How well an image model's result is coloured, on the prepared test split: the colour of surface
points in each render's look (training.prepare's looks.npz, flat-lit albedo in sRGB) against what
the image path gives them, split into the points the picture shows and those it hides.

    nice -n 10 python bench/image_colours.py CHECKPOINT [--data data/prepared] [--max-shapes 80]
                                             [--view 0] [--dataset NAME] [--shapes ID ...]

Methods, per point (all through the mirror averaging the pipeline uses):
  picture   the picture's colour at the point's pixel (the image path without a texture head)
  head      the texture head's colour (a checkpoint with one)
  both      the picture where it shows the point, the head where it hides it
  lit       the pipeline's choice: as both, the head's colours times the per-channel gains that make
            them agree with the picture where it shows the surface (backend.viewer.picture_where_shown)
A point is shown when its viewer depth is within 0.02 of the render's own front depth at its pixel.
Pictures on white, as validation sees them. Prints one JSON line per shape, then mean L1 (in [0, 1]
sRGB) and PSNR (dB, from the mean squared error over all points) per method and visibility.
"""

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHOWN_TOLERANCE = 0.02


def sample_image(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """(3, S, S) image, (N, 2) pixel coordinates (pixel centres at integers) -> (N, 3) bilinear."""
    from scipy.ndimage import map_coordinates

    coords = np.stack([uv[:, 1], uv[:, 0]])
    return np.stack([map_coordinates(channel, coords, order=1, mode="nearest") for channel in image], axis=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default=str(ROOT / "data" / "prepared"))
    parser.add_argument("--max-shapes", type=int, default=80)
    parser.add_argument("--view", type=int, default=0)
    parser.add_argument("--dataset", help="only this dataset's shapes (the start of their ids)")
    parser.add_argument("--shapes", nargs="+", help="these test shapes instead")
    args = parser.parse_args(argv)
    data = Path(args.data)
    if not (data / "split" / "test.txt").is_file():
        print(f"skipped: no prepared data at {data} (run training.prepare with views; see README)")
        return 0

    import torch

    from backend import camera
    from backend.checkpoint import load_checkpoint
    from backend.viewer import MirrorAveraged, picture_where_shown
    from training.dataset import OccupancyDataset, SamplingConfig, ShapeStore, read_split, split_by_renders

    model, config, _ = load_checkpoint(args.checkpoint, "cpu")
    ids, _ = split_by_renders(data, read_split(data, "test"))
    ids = [i for i in ids if (data / i / "looks.npz").is_file() and (not args.dataset or i.startswith(f"{args.dataset}_"))
           and (not args.shapes or i in args.shapes)]
    ids = ids[: args.max_shapes]
    if not ids:
        print(f"no test shapes with looks.npz in {data}: run training.prepare ... --only-prepared to add them")
        return 1
    size = int(config["input"]["image_size"])
    store = ShapeStore(data, ids, surface=False, images=True, layers=True, looks=True)
    examples = OccupancyDataset(store, SamplingConfig(input_kind="image", image_size=size, frame="viewer", layers=True,
                                                      view=args.view, background="white", query_points=1,
                                                      colour_points=4096), deterministic=True)
    averaged = MirrorAveraged(model)
    methods = ("picture", "head", "both", "lit") if model.has_texture else ("picture",)
    sums = {(m, part): [0.0, 0.0, 0] for m in methods for part in ("shown", "hidden", "all")}
    for index in range(len(ids)):
        item = examples[index]
        points, truth = item["colour_points"].numpy().astype(np.float64), item["colours"].numpy().astype(np.float64)
        focal = float(item["focal"])
        uv, depth = camera.project_viewer(points, size, focal)
        col, row = np.clip(np.round(uv).astype(int), 0, size - 1).T
        front = item["layers"][0].numpy()[row, col]
        shown = np.isfinite(front) & (points[:, 2] <= front + SHOWN_TOLERANCE)
        colours = {"picture": sample_image(item["inputs"].numpy(), uv)}
        if model.has_texture:
            with torch.inference_mode():
                code = averaged.encode(item["inputs"][None], item["focal"][None], item["mask"][None])
                colours["head"] = averaged.decode_colour(item["colour_points"][None], code)[0].numpy()
            colours["both"] = np.where(shown[:, None], colours["picture"], colours["head"])
            colours["lit"] = picture_where_shown(colours["head"], colours["picture"][shown], shown) if shown.any() \
                else colours["head"]
        row_out = {"shape": ids[index], "shown_fraction": round(float(shown.mean()), 3)}
        for method, predicted in colours.items():
            error = np.abs(predicted - truth)
            for part, chosen in (("shown", shown), ("hidden", ~shown), ("all", np.ones_like(shown))):
                total = sums[(method, part)]
                total[0] += float(error[chosen].mean(axis=1).sum())
                total[1] += float((error[chosen] ** 2).mean(axis=1).sum())
                total[2] += int(chosen.sum())
            row_out[f"{method}_l1"] = round(float(error.mean()), 4)
        print(json.dumps(row_out), flush=True)
        store.forget(index)

    print(json.dumps({"checkpoint": args.checkpoint, "shapes": len(ids), "view": args.view,
                      "machine": platform.processor() or platform.machine()}))
    print(f"\n{'method':<10}{'part':<8}{'points':>9}{'L1':>9}{'PSNR dB':>9}")
    for (method, part), (l1, squared, count) in sums.items():
        if count:
            psnr = -10 * math.log10(max(squared / count, 1e-12))
            print(f"{method:<10}{part:<8}{count:>9}{l1 / count:>9.4f}{psnr:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
