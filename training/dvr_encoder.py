"""Single-view DVR: an image model trained across many objects without 3D supervision (the DVR
paper's 2D and 2.5D rows). Each example is one picture of an object; what supervises the model's
prediction from it are other views of the same object: their masks (2D), and with them their
depth maps (2.5D), through the losses of training.dvr.

    python -m training.dvr_encoder CONFIG [--out DIR] [--steps N] [--seconds S] [--device cuda]

Per example: a random view of a shape becomes the model's input exactly as in training.train
(the crop and viewer frame of backend.camera, colour jitter, a random background); then rays of
`other_views` other views of it are taken into that viewer frame (the similarity of
camera.viewer_from_world: distances along the rays scale with it) and the image losses of
training.dvr's ray_losses are applied to the decoder's field there, in the viewer box.

Config (JSON, see training/configs/dvr_encoder_*.json): "data_dir" (training.prepare's folder),
"split", "exclude_shapes", "model" (a viewer-centred image model), "init_weights" (a checkpoint of
the same model to start from, optional), "init_encoder" ("efficientnet_lite0_imagenet",
optional), "losses" ("mask", "depth", "normal"; training.dvr), "shapes_per_step", "other_views",
"rays_per_view", "inside_fraction", "ray_steps", "secant_steps", "lr", "steps", "seconds", "seed",
"up_loss_weight" (the up direction each picture's camera gives, so results are placed upright).
Writes OUT/model_last.safetensors (backend.checkpoint; training.evaluate scores it in 3D like any
image model) and OUT/log.csv.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from backend import camera
from backend.checkpoint import load_checkpoint, save_checkpoint
from backend.models import build_model
from backend.preprocess import over_background

from .dataset import colour_gains, jitter_colours, random_background, viewer_view
from .dvr import (Rays, budgeted_steps, csv_logger, optimisation_step, ray_losses, ray_steps_at, run_config,
                  settings_from_config)
from .posed_images import PosedViews, camera_z_per_distance, image_pixels, load_prepared_views
from .train import imagenet_state, up_loss

IMAGE_LOSSES = ("mask", "depth", "normal")
# A view whose mask holds fewer pixels is never a model input (a flat sign seen edge-on renders
# empty); it still judges other pictures' predictions (its rays are free space).
MIN_INPUT_PIXELS = 16
# The weights are written at least this often, so that a run that dies keeps what it learnt.
CHECKPOINT_SECONDS = 600.0


@dataclass
class EncoderSettings:
    """How single-view training runs (module docstring)."""
    losses: dict = field(default_factory=lambda: {"mask": 1.0})
    shapes_per_step: int = 4
    other_views: int = 2
    rays_per_view: int = 256
    inside_fraction: float = 0.5
    ray_steps: list = field(default_factory=lambda: [[0, 16], [1000, 32]])
    secant_steps: int = 8
    lr: float = 1e-4
    steps: int = 1000
    seconds: float | None = None
    seed: int = 0
    up_loss_weight: float = 0.1   # the up direction from the picture's camera, as training.train teaches it

    @classmethod
    def from_config(cls, config: dict) -> "EncoderSettings":
        settings = settings_from_config(cls, config, IMAGE_LOSSES,
                                        "a loss that cannot train an encoder from other views")
        if not any(settings.losses.values()):
            raise ValueError("every loss weight is 0: nothing to train")
        if settings.other_views < 1:
            raise ValueError("other_views must be at least 1: the picture's own view cannot supervise it")
        return settings


def rays_in_viewer_frame(views: PosedViews, view: int, similarity: np.ndarray, count: int,
                         inside_fraction: float, rng: np.random.Generator) -> Rays:
    """count random pixel rays of one view (inside_fraction of them inside its mask, as many as
    there are), expressed in the viewer frame of a similarity (4, 4) world -> viewer; depths are
    distances along the rays to the view's surface in viewer units (inf where unknown)."""
    mask = views.masks[view].ravel()
    inside, outside = np.flatnonzero(mask), np.flatnonzero(~mask)
    wanted = min(round(count * inside_fraction), len(inside)) if len(outside) else min(count, len(inside))
    picked = np.concatenate([rng.choice(inside, wanted) if wanted else inside[:0],
                             rng.choice(outside, count - wanted) if len(outside) else outside[:0]])
    height, width = views.masks.shape[1:]
    pixels = image_pixels(height, width)[picked]
    origin, directions = camera.pixel_rays(views.world_mats[view], views.camera_mats[view], pixels)
    depths = None
    if views.depths is not None:
        depths = views.depths[view].ravel()[picked] / camera_z_per_distance(views.world_mats[view], directions)
    linear = similarity[:3, :3]
    scale = float(np.cbrt(np.linalg.det(linear)))
    origins = np.broadcast_to(camera.transform_points(similarity, origin[None]), directions.shape)
    directions = directions @ (linear / scale).T

    def tensor(array):
        return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32)

    return Rays(tensor(origins), tensor(directions), torch.as_tensor(mask[picked]), None,
                None if depths is None else tensor(depths * scale))


@dataclass
class Example:
    """One picture, as the model sees it, and the rays of other views that judge its prediction."""
    image: torch.Tensor     # (3, S, S)
    focal: float
    mask: torch.Tensor      # (S, S) bool, the crop's mask
    rays: Rays              # in the picture's viewer frame
    up: torch.Tensor        # (3,) the world's up direction in the picture's viewer frame (from its camera)


class NoViewShowsTheObject(ValueError):
    """Every view of a shape has (nearly) no object in its mask: nothing to give the model."""


def make_example(views: PosedViews, size: int, settings: EncoderSettings, rng: np.random.Generator) -> Example:
    """A random view of views that shows the object (MIN_INPUT_PIXELS or more in its mask) as the
    model's input, and rays of settings.other_views others (any: an empty mask is free space)."""
    showing = np.flatnonzero(views.masks.reshape(len(views), -1).sum(axis=1) >= MIN_INPUT_PIXELS)
    if len(showing) == 0:
        raise NoViewShowsTheObject("no view shows the object")
    seen_view = int(rng.choice(showing))
    rgba = np.concatenate([views.colours[seen_view], views.masks[seen_view][..., None].astype(np.float32)], axis=-1)
    seen = viewer_view(rgba, views.world_mats[seen_view], views.camera_mats[seen_view], size)
    image = over_background(jitter_colours(seen.premultiplied, colour_gains(rng)), random_background(size, rng))
    others = [v for v in range(len(views)) if v != seen_view]
    judges = rng.choice(others, size=min(settings.other_views, len(others)), replace=False)
    parts = [rays_in_viewer_frame(views, int(v), seen.similarity, settings.rays_per_view, settings.inside_fraction, rng)
             for v in judges]
    rays = Rays(*(torch.cat([getattr(p, name) for p in parts]) if getattr(parts[0], name) is not None else None
                  for name in ("origins", "directions", "masks", "colours", "depths")))
    return Example(torch.from_numpy(image), seen.crop.focal, torch.from_numpy(seen.premultiplied[..., 3] >= 0.5), rays,
                   torch.from_numpy(seen.up.astype(np.float32)))


def example_losses(model, examples: list[Example], settings: EncoderSettings, n_steps: int,
                   generator: torch.Generator, device) -> dict[str, torch.Tensor]:
    """The image losses of a batch of examples, each example's averaged over its rays, then over
    the examples, and "up", the up direction's error; the encoder sees the whole batch at once."""
    images = torch.stack([e.image for e in examples]).to(device)
    focal = torch.tensor([e.focal for e in examples], dtype=torch.float32, device=device)
    code = model.encode(images, focal, torch.stack([e.mask for e in examples]))
    totals: dict[str, torch.Tensor] = {"up": up_loss(code["up"], torch.stack([e.up for e in examples]).to(device))}
    for index, example in enumerate(examples):
        own = {key: value[index:index + 1] for key, value in code.items()}
        rays = Rays(*(None if value is None else value.to(device) for value in
                      (example.rays.origins, example.rays.directions, example.rays.masks, None, example.rays.depths)))

        def occupancy(p, own=own):
            return model.decode(p.reshape(1, -1, 3), own).reshape(p.shape[:-1])

        losses = ray_losses(occupancy, rays, settings.losses, n_steps, settings.secant_steps, generator,
                            half_extent=camera.VIEW_HALF_EXTENT)
        for name, value in losses.items():
            totals[name] = totals.get(name, 0.0) + value / len(examples)
    return totals


def freeze_batch_norm(model: torch.nn.Module) -> None:
    """Batch-norm layers use their running statistics in training too: a handful of pictures per
    step is too few for batch statistics, and statistics learnt from them would not be those the
    model later sees one picture at a time. Their scales and shifts still train."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def train(model, shape_dirs: list[Path], settings: EncoderSettings, device="cpu", log=None,
          clock=time.monotonic, checkpoint=None, checkpoint_seconds: float = CHECKPOINT_SECONDS) -> list[dict]:
    """Train a viewer-centred image model from other views of its pictures' objects until
    settings.steps or settings.seconds; log(row) after every step; checkpoint(rows) every
    checkpoint_seconds (by clock). Shapes that no view shows are left out, each said once. -> the
    rows."""
    if model.frame != "viewer":
        raise ValueError("single-view DVR trains a viewer-centred image model (input frame 'viewer')")
    if settings.losses["depth"] and shape_dirs and load_prepared_views(shape_dirs[0]).depths is None:
        raise ValueError("loss 'depth' is on but the prepared views have no depth maps")
    size = model.config["input"]["image_size"]
    rng = np.random.default_rng(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    model.to(device).train()
    freeze_batch_norm(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    rows, start = [], clock()
    last_checkpoint = start
    usable = list(shape_dirs)
    for step in budgeted_steps(settings, optimizer, clock, start):
        examples, unusable = [], []
        for index in rng.permutation(len(usable)):   # distinct shapes, as many as a step takes
            try:
                examples.append(make_example(load_prepared_views(usable[index]), size, settings, rng))
            except NoViewShowsTheObject:
                unusable.append(usable[index])
                print(f"left out {usable[index].name}: no view shows the object", flush=True)
            if len(examples) == settings.shapes_per_step:
                break
        usable = [shape_dir for shape_dir in usable if shape_dir not in unusable]
        if not examples:
            raise ValueError("no shape has a view that shows its object")
        n_steps = ray_steps_at(step, settings.ray_steps)
        losses = example_losses(model, examples, settings, n_steps, generator, device)
        total = optimisation_step(optimizer, losses, {**settings.losses, "up": settings.up_loss_weight})
        row = {"step": step, "seconds": round(clock() - start, 3), "ray_steps": n_steps, "loss": total.item(),
               **{name: value.item() for name, value in losses.items()}}
        rows.append(row)
        if log is not None:
            log(row)
        if checkpoint is not None and clock() - last_checkpoint >= checkpoint_seconds:
            checkpoint(rows)
            last_checkpoint = clock()
    model.eval()
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train an image model from other views of its pictures' "
                                                 "objects (single-view DVR: masks, or masks and depth).")
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, help="output folder (default: the config's out_dir)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seconds", type=float, help="time budget")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config, out = run_config(args, "runs/dvr_encoder")
    settings = EncoderSettings.from_config(config)
    data_dir, split = Path(config["data_dir"]), config.get("split", "train")
    split_file = data_dir / "split" / f"{split}.txt"
    if not split_file.is_file():
        print(f"error: {split_file} does not exist: is {data_dir} a prepared data folder?", file=sys.stderr)
        return 1
    excluded = set(config.get("exclude_shapes", []))
    # No 3D labels are read: a shape needs its rendered views and cameras only.
    shape_dirs = [data_dir / i for i in split_file.read_text().split() if i not in excluded
                  and (data_dir / i / "cameras.npz").is_file()]
    if not shape_dirs:
        print(f"error: no shapes with rendered views in {data_dir}'s {split} split", file=sys.stderr)
        return 1
    torch.manual_seed(settings.seed)
    model = build_model(config["model"])
    if config.get("init_weights"):
        source, source_config, _ = load_checkpoint(config["init_weights"])
        if source_config != config["model"]:
            print(f"error: init_weights {config['init_weights']}: another model configuration", file=sys.stderr)
            return 1
        model.load_state_dict(source.state_dict())
    elif config.get("init_encoder"):
        model.encoder.load_imagenet(imagenet_state(config["init_encoder"]))

    def write_checkpoint(rows: list[dict]) -> None:
        save_checkpoint(out / "model_last.safetensors", model, config["model"],
                        {"dvr_encoder": {"data_dir": str(data_dir), "shapes": len(shape_dirs),
                                         "settings": settings.__dict__, "steps": len(rows),
                                         "seconds": rows[-1]["seconds"] if rows else 0.0}})

    with open(out / "log.csv", "w", newline="") as log_file:
        rows = train(model, shape_dirs, settings, args.device, csv_logger(log_file, print_every=20),
                     checkpoint=write_checkpoint)
    write_checkpoint(rows)
    print(json.dumps({"steps": len(rows), "out": str(out / "model_last.safetensors")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
