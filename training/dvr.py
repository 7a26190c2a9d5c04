"""Differentiable Volumetric Rendering (Niemeyer et al. 2020): one object's shape, and its colour,
fitted to posed views of it, without 3D supervision.

    python -m training.dvr CONFIG [--out DIR] [--steps N] [--seconds S] [--device cuda] [--threads 1]

Each step samples pixel rays of the training views, finds where they meet the current surface
(backend.raymarch: no gradients kept for the march, the depth's gradient by implicit
differentiation) and applies the paper's losses, each summed over its rays and divided by the
number of rays (every ray weighs the same, whichever loss it feeds):
  mask       free space: a random point of the ray inside the cube is empty, for rays outside the
             mask; occupancy: for rays inside the mask that found no surface, a point of the ray is
             occupied (the true surface point where the depth is known, else the marched sample
             where the field was largest, `missed_rays` "likeliest"; DVR's random point of the
             ray, "random", let a colour term erode a second object: docs/DVR.md)
  depth      L1 between the found and the true distance along the ray, where both exist
  rgb        L1 between the texture head's colour at the found surface point and the pixel's
  normal     smoothness: the unit normals at a surface point and at a point near it agree
  points     3D supervision (not DVR: the baseline it is compared with): binary cross-entropy
             at points with known occupancy (training.prepare's points.npz)
The number of samples per ray grows during training (`ray_steps`): coarse marching is cheap and
good enough while the shape is a blob; thin parts need the finer steps later.

Config (JSON, see training/configs/dvr_*.json): "data" {"prepared": shape folder} or {"folder":
folder with cameras.json} (training.posed_images); "held_out_views": view numbers kept out of
training; "model": a configuration of input kind "none" (backend.models.textured); "losses":
weights of the terms above (a term it does not name is off; without "losses": masks only); "rays", "inside_fraction", "ray_steps",
"secant_steps", "lr", "steps", "seconds" (time budget, null for none), "seed", "missed_rays".
Writes OUT/model_last.safetensors (backend.checkpoint format), OUT/log.csv and OUT/mesh.ply (the
surface at 128^3, with vertex colours from the texture head when the model has one).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from backend.camera import pixel_rays
from backend.checkpoint import save_checkpoint
from backend.mesh_io import save_mesh
from backend.models import build_model
from backend.raymarch import (QUERY_HALF_EXTENT, Field, field_gradient, find_surface, ray_box_interval,
                              surface_depth)

from .metrics import occupancy_iou
from .posed_images import PosedViews, camera_z_per_distance, image_pixels, load_folder_views, load_prepared_views

LOSS_NAMES = ("mask", "depth", "rgb", "normal", "points")
# Neighbours for the normal smoothness term: a uniform offset of this size (1% of the cube's edge).
NORMAL_NEIGHBOUR_SPREAD = 0.01
# Without a "losses" entry a config fits silhouettes; a loss it does not name is off.
DEFAULT_LOSSES = {"mask": 1.0}


# ---------------------------------------------------------------------------------------------
# Rays


@dataclass
class Rays:
    """R camera rays with what the views say about them. depths: distance along the ray to the
    true surface, inf where unknown; colours and depths None when the views lack them."""
    origins: torch.Tensor            # (R, 3)
    directions: torch.Tensor         # (R, 3) unit
    masks: torch.Tensor              # (R,) bool
    colours: torch.Tensor | None     # (R, 3)
    depths: torch.Tensor | None      # (R,)

    def __getitem__(self, index) -> "Rays":
        return Rays(self.origins[index], self.directions[index], self.masks[index],
                    None if self.colours is None else self.colours[index],
                    None if self.depths is None else self.depths[index])


def view_rays(views: PosedViews, device: torch.device | str = "cpu") -> Rays:
    """Every pixel's ray of every view (V * H * W rays, view by view, row by row)."""
    height, width = views.masks.shape[1:]
    origins, directions, depths = [], [], []
    for view, (world_mat, camera_mat) in enumerate(zip(views.world_mats, views.camera_mats)):
        origin, direction = pixel_rays(world_mat, camera_mat, image_pixels(height, width))
        origins.append(np.broadcast_to(origin, direction.shape))
        directions.append(direction)
        if views.depths is not None:   # camera z -> distance along the ray
            depths.append(views.depths[view].ravel() / camera_z_per_distance(world_mat, direction))

    def tensor(array):
        return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32, device=device)

    return Rays(tensor(np.concatenate(origins)), tensor(np.concatenate(directions)),
                torch.as_tensor(views.masks.reshape(-1), device=device),
                None if views.colours is None else tensor(views.colours.reshape(-1, 3)),
                None if views.depths is None else tensor(np.concatenate(depths)))


class RaySampler:
    """Random batches of rays, a fixed share of them inside the masks: a small object covers a
    few percent of its pictures, and uniform pixels would spend most rays on empty background."""

    def __init__(self, rays: Rays, inside_fraction: float, seed: int):
        self.rays = rays
        self.inside = torch.nonzero(rays.masks).squeeze(1)
        self.outside = torch.nonzero(~rays.masks).squeeze(1)
        self.inside_fraction = inside_fraction if len(self.outside) else 1.0
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, count: int) -> Rays:
        inside = min(round(count * self.inside_fraction), count) if len(self.inside) else 0

        def pick(pool, k):
            return pool[torch.randint(len(pool), (k,), generator=self.generator).to(pool.device)]

        return self.rays[torch.cat([pick(self.inside, inside), pick(self.outside, count - inside)])]


def ray_steps_at(step: int, schedule: list) -> int:
    """Samples per ray at a training step: schedule [[from_step, samples], ...] ascending."""
    current = schedule[0][1]
    for start, samples in schedule:
        if step >= start:
            current = samples
    return current


def random_points_in_cube(rays: Rays, generator: torch.Generator, half_extent: float = QUERY_HALF_EXTENT) -> torch.Tensor:
    """One point (R, 3) uniformly at random on each ray's stretch inside the padded cube (or the
    cube of that half extent; the ray's origin for the rare ray that misses the cube)."""
    near, far, crosses = ray_box_interval(rays.origins, rays.directions, half_extent)
    fraction = torch.rand(len(near), generator=generator).to(near)
    depth = torch.where(crosses, near + fraction * (far - near), torch.zeros_like(near))
    return rays.origins + depth[:, None] * rays.directions


# ---------------------------------------------------------------------------------------------
# Losses


def occupancy_field(model) -> Field:
    """The model's logits as a field of points (..., 3) -> (...) (input kind "none": no code)."""
    return lambda p: model.decode(p.reshape(1, -1, 3), None).reshape(p.shape[:-1])


def colour_at(model, points: torch.Tensor) -> torch.Tensor:
    """Texture head's RGB (N, 3) at points (N, 3)."""
    return model.decoder(points[None], None, with_colour=True)[1][0]


def unit_normals(field: Field, points: torch.Tensor) -> torch.Tensor:
    """Outward unit normals (N, 3) at points (N, 3), differentiable in the field's parameters."""
    _, gradient = field_gradient(field, points, create_graph=True)
    return -gradient / gradient.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def bce_sum(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target), reduction="sum")


def ray_losses(field: Field, rays: Rays, weights: dict, n_steps: int, secant_steps: int,
               generator: torch.Generator, colour=None,
               half_extent: float = QUERY_HALF_EXTENT, missed_rays: str = "likeliest") -> dict[str, torch.Tensor]:
    """The image losses of one batch of rays (module docstring) on an occupancy field (logits)
    that lives in the cube of half_extent, each a sum over its rays divided by the batch's ray
    count, unweighted; only the terms with a non-zero weight. colour: points (N, 3) -> RGB
    (N, 3), the texture head (needed for "rgb"). missed_rays: where a ray inside the mask that
    found no surface (and has no known depth) is told to be inside: "likeliest", the marched
    sample where the field was largest, or "random", a random point of it in the cube (DVR's)."""
    count = len(rays.masks)
    surface = surface_depth(field, rays.origins, rays.directions, n_steps, secant_steps, half_extent)
    hit_rays = rays[surface.hit]
    losses = {}
    if weights["mask"]:
        outside = rays[~rays.masks]
        missed_rows = rays.masks & ~surface.hit
        missed = rays[missed_rows]
        targets = random_points_in_cube(missed, generator, half_extent)
        if missed_rays == "likeliest":
            closest = surface.likeliest[missed_rows]
            near = torch.isfinite(closest)
            targets[near] = missed.origins[near] + closest[near, None] * missed.directions[near]
        if missed.depths is not None:
            known = torch.isfinite(missed.depths)
            targets[known] = missed.origins[known] + missed.depths[known, None] * missed.directions[known]
        losses["mask"] = (bce_sum(field(random_points_in_cube(outside, generator, half_extent)), 0.0)
                          + bce_sum(field(targets), 1.0)) / count
    on_object = hit_rays.masks
    if weights["depth"]:
        known = on_object & torch.isfinite(hit_rays.depths)
        losses["depth"] = (surface.depth[known] - hit_rays.depths[known]).abs().sum() / count
    if weights["rgb"]:
        predicted = colour(surface.points[on_object])
        losses["rgb"] = (predicted - hit_rays.colours[on_object]).abs().sum() / count
    if weights["normal"]:
        points = surface.points[on_object].detach()
        neighbours = points + (torch.rand(points.shape, generator=generator).to(points) - 0.5) * NORMAL_NEIGHBOUR_SPREAD
        losses["normal"] = (unit_normals(field, points) - unit_normals(field, neighbours)).norm(dim=-1).sum() / count
    return losses


@dataclass
class OccupancySamples:
    """Points with known occupancy for 3D supervision: uniform in the cube and near the surface."""
    uniform_points: np.ndarray       # (P, 3)
    uniform_occupancies: np.ndarray  # (P,) bool
    near_points: np.ndarray          # (Q, 3)
    near_occupancies: np.ndarray     # (Q,) bool

    def sample(self, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """count points (count, 3), half uniform, half near the surface, and their labels (count,)."""
        u = rng.integers(len(self.uniform_points), size=count // 2)
        n = rng.integers(len(self.near_points), size=count - count // 2)
        points = np.concatenate([self.uniform_points[u], self.near_points[n]]).astype(np.float32)
        return points, np.concatenate([self.uniform_occupancies[u], self.near_occupancies[n]]).astype(np.float32)


def load_occupancy_samples(shape_dir) -> OccupancySamples:
    from .dataset import load_shape

    shape = load_shape(Path(shape_dir), surface=False, normals=False, images=False)
    return OccupancySamples(shape.uniform_points, shape.uniform_occupancies, shape.near_points, shape.near_occupancies)


# ---------------------------------------------------------------------------------------------
# Fitting


def settings_from_config(cls, config: dict, allowed_losses: tuple, refusal: str):
    """A settings dataclass from a configuration's keys (others ignored), its "losses" checked
    against allowed_losses (a ValueError starting with refusal names the first other one) and
    filled in with a weight, 0 when not given, for every name of LOSS_NAMES."""
    names = {f.name for f in fields(cls)}
    settings = cls(**{k: v for k, v in config.items() if k in names})
    unknown = set(settings.losses) - set(allowed_losses)
    if unknown:
        raise ValueError(f"{refusal}: {sorted(unknown)[0]!r}; known: {', '.join(allowed_losses)}")
    settings.losses = {name: float(settings.losses.get(name, 0.0)) for name in LOSS_NAMES}
    return settings


MISSED_RAY_TARGETS = ("likeliest", "random")


@dataclass
class FitSettings:
    """How a fit runs (module docstring): the fitting keys of a configuration."""
    losses: dict = field(default_factory=lambda: dict(DEFAULT_LOSSES))
    rays: int = 1024
    inside_fraction: float = 0.5
    ray_steps: list = field(default_factory=lambda: [[0, 16], [1000, 32], [2000, 64]])
    secant_steps: int = 8
    lr: float = 5e-4
    steps: int = 3000
    seconds: float | None = None
    seed: int = 0
    query_points: int = 2048
    missed_rays: str = "likeliest"   # ray_losses' target for in-mask rays without a surface

    @classmethod
    def from_config(cls, config: dict) -> "FitSettings":
        """Settings from a configuration's keys (others ignored); every loss weight filled in."""
        settings = settings_from_config(cls, config, LOSS_NAMES, "unknown loss")
        if settings.missed_rays not in MISSED_RAY_TARGETS:
            raise ValueError(f"unknown missed_rays {settings.missed_rays!r}; known: {', '.join(MISSED_RAY_TARGETS)}")
        return settings


def learning_rate(base: float, progress: float) -> float:
    """Cosine decay from base to 5% of it over the run (progress in [0, 1]): the mask losses leave
    the inside of the visual hull free, and a large final step would leave it rippling."""
    return base * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def budgeted_steps(settings, optimizer, clock: Callable[[], float], start: float) -> Iterator[int]:
    """The step numbers of a run while settings.steps and settings.seconds (by clock, since start)
    last, the optimizer's learning rate set for each first: learning_rate of the run's progress,
    the larger of its share of the steps and of the time. settings: FitSettings or EncoderSettings."""
    for step in range(settings.steps):
        elapsed = clock() - start
        if settings.seconds is not None and elapsed > settings.seconds:
            return
        progress = max(step / settings.steps, elapsed / settings.seconds if settings.seconds else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings.lr, progress)
        yield step


def optimisation_step(optimizer, losses: dict, weights: dict) -> torch.Tensor:
    """One step on the weighted sum of losses (name -> scalar tensor) -> that sum."""
    total = sum(weights[name] * value for name, value in losses.items())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return total


def check_supervision(settings: FitSettings, views: PosedViews | None, samples: OccupancySamples | None) -> None:
    """ValueError when no loss is on, or one is on whose data is missing."""
    available = {"mask": views is not None, "normal": views is not None,
                 "depth": views is not None and views.depths is not None,
                 "rgb": views is not None and views.colours is not None,
                 "points": samples is not None}
    if not any(settings.losses.values()):
        raise ValueError("every loss weight is 0: nothing to fit")
    missing = [name for name, present in available.items() if settings.losses[name] and not present]
    if missing:
        raise ValueError(f"loss {missing[0]!r} is on but the data lacks what it needs")


def fit(model, views: PosedViews | None, settings: FitSettings, samples: OccupancySamples | None = None,
        device: torch.device | str = "cpu", log=None, clock=time.monotonic) -> list[dict]:
    """Fit a model of input kind "none" to the views (and/or 3D samples) until settings.steps or
    settings.seconds by clock (wall time; time.process_time for budgets that must not depend on
    what else the machine runs); log(row) after every step. -> the rows (step, seconds,
    ray_steps, losses)."""
    check_supervision(settings, views, samples)
    torch.manual_seed(settings.seed)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    image_losses = any(settings.losses[name] for name in ("mask", "depth", "rgb", "normal"))
    sampler = RaySampler(view_rays(views, device), settings.inside_fraction, settings.seed) if image_losses else None
    generator = torch.Generator().manual_seed(settings.seed + 1)
    rng = np.random.default_rng(settings.seed)
    rows, start = [], clock()
    for step in budgeted_steps(settings, optimizer, clock, start):
        n_steps = ray_steps_at(step, settings.ray_steps)
        losses = {}
        if sampler is not None:
            losses = ray_losses(occupancy_field(model), sampler.sample(settings.rays), settings.losses, n_steps,
                                settings.secant_steps, generator, colour=lambda p: colour_at(model, p),
                                missed_rays=settings.missed_rays)
        if settings.losses["points"]:
            points, labels = samples.sample(settings.query_points, rng)
            logits = model.decode(torch.from_numpy(points).to(device)[None], None)[0]
            losses["points"] = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(labels).to(logits))
        total = optimisation_step(optimizer, losses, settings.losses)
        row = {"step": step, "seconds": round(clock() - start, 3), "ray_steps": n_steps,
               "loss": total.item(), **{name: value.item() for name, value in losses.items()}}
        rows.append(row)
        if log is not None:
            log(row)
    model.eval()
    return rows


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def predicted_occupancy(model, points: np.ndarray, device="cpu", batch: int = 65536) -> np.ndarray:
    """Occupancy (N,) bool of the fitted field at points (N, 3)."""
    field = occupancy_field(model)
    values = [field(torch.as_tensor(points[i:i + batch], dtype=torch.float32, device=device)).cpu()
              for i in range(0, len(points), batch)]
    return torch.cat(values).numpy() >= 0.0


@torch.no_grad()
def render(model, views: PosedViews, n_steps: int = 64, device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """What the fitted field looks like through the views' cameras: masks (V, H, W) bool and
    colours (V, H, W, 3) (black where no surface; the texture head's colour where one is hit)."""
    height, width = views.masks.shape[1:]
    rays = view_rays(views, device)
    hits = find_surface(occupancy_field(model), rays.origins, rays.directions, n_steps=n_steps)
    colours = torch.zeros(len(hits.hit), 3, device=rays.origins.device)
    if model.decoder.texture and hits.hit.any():
        points = rays.origins[hits.hit] + hits.depth[hits.hit, None] * rays.directions[hits.hit]
        colours[hits.hit] = colour_at(model, points)
    shape = (len(views), height, width)
    return hits.hit.reshape(shape).cpu().numpy(), colours.reshape(*shape, 3).cpu().numpy()


@torch.no_grad()
def fitted_mesh(model, resolution0: int = 32, upsampling_steps: int = 2, device="cpu"):
    """The fitted surface as a mesh: MISE from resolution0^3 up to resolution0 * 2^upsampling_steps,
    marching cubes at the level 0 -> vertices (V, 3), faces (F, 3), and vertex colours (V, 3) from
    the texture head (None without one)."""
    from backend.extraction.marching import grid_to_mesh
    from backend.extraction.mise import mise

    grid = mise(occupancy_field(model), resolution0=resolution0, upsampling_steps=upsampling_steps, device=device)
    mesh = grid_to_mesh(grid.values, 0.0, grid.box_min, grid.spacing)
    colours = None
    if model.decoder.texture and len(mesh.vertices):
        points = torch.as_tensor(mesh.vertices, device=device)
        colours = torch.cat([colour_at(model, chunk) for chunk in points.split(65536)]).cpu().numpy()
    return mesh.vertices, mesh.faces, colours


def psnr(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] (any equal shapes)."""
    mse = float(np.mean((predicted.astype(np.float64) - truth) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


# ---------------------------------------------------------------------------------------------
# Command line


def load_views(data: dict) -> PosedViews:
    if "prepared" in data:
        return load_prepared_views(data["prepared"])
    if "folder" in data:
        return load_folder_views(data["folder"])
    raise ValueError('config "data" needs "prepared" (a training.prepare shape folder) or "folder" (cameras.json)')


def split_views(views: PosedViews, held_out: list[int]) -> tuple[PosedViews, PosedViews | None]:
    """(training views, held-out views or None)."""
    keep = [i for i in range(len(views)) if i not in set(held_out)]
    if not keep:
        raise ValueError("every view is held out")
    return views.subset(keep), views.subset(held_out) if held_out else None


def csv_logger(log_file, print_every: int):
    """log(row) for a training loop: every row into log_file as CSV (the first row's keys are the
    columns), every print_every-th step also printed as a JSON line."""
    writer = None

    def log(row: dict) -> None:
        nonlocal writer
        if writer is None:
            writer = csv.DictWriter(log_file, fieldnames=list(row), extrasaction="ignore")
            writer.writeheader()
        writer.writerow(row)
        if row["step"] % print_every == 0:
            print(json.dumps(row), flush=True)

    return log


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Fit one object's shape (and colour) to posed views (DVR).")
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, help="output folder (default: the config's out_dir)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seconds", type=float, help="time budget")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is "
                        "often fastest for these small networks on a busy machine)")
    return parser.parse_args(argv)


def run_config(args, default_out: str) -> tuple[dict, Path]:
    """The configuration JSON at args.config with the command line's steps and seconds over it, and
    the output folder (args.out, else the config's out_dir, else default_out), created."""
    config = json.loads(args.config.read_text())
    for key in ("steps", "seconds"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    out = args.out or Path(config.get("out_dir", default_out))
    out.mkdir(parents=True, exist_ok=True)
    return config, out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config, out = run_config(args, "runs/dvr")
    settings = FitSettings.from_config(config)
    views, held_out = split_views(load_views(config["data"]), config.get("held_out_views", []))
    prepared = config["data"].get("prepared")
    samples = load_occupancy_samples(prepared) if prepared and settings.losses["points"] else None
    torch.manual_seed(settings.seed)               # the initial field too: a run repeats
    model = build_model(config["model"])
    if model.input_kind != "none":
        raise ValueError('DVR fits a model of input kind "none" (decoder "textured_field")')
    with open(out / "log.csv", "w", newline="") as log_file:
        rows = fit(model, views, settings, samples, args.device, csv_logger(log_file, print_every=100))
    summary = {"steps": len(rows), "seconds": rows[-1]["seconds"] if rows else 0.0}
    if prepared and (Path(prepared) / "points.npz").is_file():
        truth = load_occupancy_samples(prepared)
        summary["iou"] = occupancy_iou(predicted_occupancy(model.cpu(), truth.uniform_points.astype(np.float32)),
                                       truth.uniform_occupancies)
    if held_out is not None:
        masks, colours = render(model.cpu(), held_out)
        summary["held_out_mask_iou"] = occupancy_iou(masks, held_out.masks)
        if model.decoder.texture:
            summary["held_out_psnr"] = psnr(colours, held_out.colours)
    save_checkpoint(out / "model_last.safetensors", model, config["model"],
                    {"dvr": {"data": config["data"], "settings": settings.__dict__, **summary}})
    vertices, faces, colours = fitted_mesh(model.cpu())
    save_mesh(out / "mesh.ply", vertices, faces, colors=colours)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
