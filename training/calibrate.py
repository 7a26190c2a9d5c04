"""Choose at which of its own probabilities a trained network's surface lies, on validation.

    python -m training.calibrate CHECKPOINT DATA_DIR [--split val] [--probabilities 0.3 0.4 0.5 ...]
                                 [--resolution 64] [--max-shapes K] [--write]

Each candidate probability p is evaluated the way `training.evaluate` does (the whole pipeline,
every metric); the best by mean IoU (the Occupancy Networks paper chooses its threshold so) is
printed and, with --write, stored in the checkpoint's configuration as "surface_probability" with
the sweep in its metadata ("calibration"). The pipeline then puts a user's threshold 0.5 there
(OccupancyNetwork.surface_level). The checkpoint's weights are left bit for bit as they were.
"""

import argparse
import math
import sys

import numpy as np

from backend.checkpoint import read_header, with_new_header
from backend.errors import CheckpointError, OccnetError
from backend.models.registry import probability_to_logit

from .errors import TrainingError
from .evaluate import evaluate_split
from .evaluate import parse_args as evaluate_args

METRICS = ("iou", "chamfer_l1_x10", "normal_consistency", "fscore")


def relative_threshold(probability: float, surface_probability: float) -> float:
    """The user threshold at which the pipeline's surface lies at the network's own probability,
    for a checkpoint whose surface_probability is already set: logits add."""
    logit = probability_to_logit(probability) - probability_to_logit(surface_probability)
    return 1.0 / (1.0 + math.exp(-logit))


def sweep(args) -> dict[float, dict]:
    """{probability: mean metrics over the split's shapes} for each candidate probability."""
    config, _ = read_header(args.checkpoint)
    stored = float(config.get("surface_probability", 0.5))
    base = evaluate_args([args.checkpoint, args.data_dir, "--split", args.split, "--resolution", str(args.resolution),
                          "--surface-points", str(args.surface_points), "--device", args.device,
                          *(["--max-shapes", str(args.max_shapes)] if args.max_shapes else [])])
    means = {}
    for probability in args.probabilities:
        rows = evaluate_split(argparse.Namespace(**{**vars(base), "threshold": relative_threshold(probability, stored)}))
        means[probability] = {m: float(np.mean([row[m] for row in rows])) for m in METRICS} | {"shapes": len(rows)}
        print(f"p = {probability:.3f}: " + ", ".join(f"{m} {means[probability][m]:.4f}" for m in METRICS), flush=True)
    return means


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training.calibrate", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("data_dir")
    p.add_argument("--split", default="val")
    p.add_argument("--probabilities", type=float, nargs="+", default=[0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6])
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--max-shapes", type=int)
    p.add_argument("--surface-points", type=int, default=50_000)
    p.add_argument("--device", default="auto")
    p.add_argument("--write", action="store_true", help="store the best probability in the checkpoint")
    args = p.parse_args(argv)
    if not all(0.0 < q < 1.0 for q in args.probabilities):
        p.error("--probabilities must lie strictly between 0 and 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        means = sweep(args)
        best = max(means, key=lambda q: means[q]["iou"])
        print(f"best by mean IoU: surface_probability {best}")
        if args.write:
            config, metadata = read_header(args.checkpoint)
            calibration = {"split": args.split, "resolution": args.resolution, "data_dir": str(args.data_dir),
                           "by_probability": {str(q): {k: round(v, 5) for k, v in m.items()} for q, m in means.items()}}
            with_new_header(args.checkpoint, {**config, "surface_probability": best},
                            {**metadata, "calibration": calibration})
            print(f"wrote surface_probability {best} into {args.checkpoint}")
    except (TrainingError, OccnetError, CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
