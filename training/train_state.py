"""Training state for --resume in one safetensors file, no pickles.

Tensors: model weights ("model.<name>"), optimizer state ("optim.<param index>.<key>"), torch RNG
states ("rng.torch", "rng.cuda.<i>"). Everything else (epoch, step, best metric, the optimizer's
param groups, numpy / python RNG states, grad-scaler scale) is JSON in the header metadata.
The file is written with backend.atomic.atomic_write: a kill never leaves half a state.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from backend.atomic import atomic_write
from backend.checkpoint import open_safetensors
from backend.errors import CheckpointError

from .errors import TrainingError

STATE_FORMAT = "occnet-train-state/1"


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """-> (tensors {"optim.<i>.<key>": tensor}, json {"param_groups": [...], "scalars": {...}})."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict, info: dict) -> dict:
    """Inverse of optimizer_to_flat: a state dict for optimizer.load_state_dict."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in info["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": info["param_groups"]}


def capture_rng() -> tuple[dict, dict]:
    """Current RNG states -> (tensors, json)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    info = {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [py_version, list(py_state), py_gauss],
    }
    return tensors, info


def restore_rng(tensors: dict, info: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    kind, keys, pos, has_gauss, gauss = info["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    py_version, py_state, py_gauss = info["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))


def save_train_state(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: dict,
                     scaler_state: dict | None = None) -> None:
    """Write model + optimizer + RNG + progress (JSON-able dict: epoch, step, best, ...) atomically."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optim_tensors, optim_info = optimizer_to_flat(optimizer)
    rng_tensors, rng_info = capture_rng()
    tensors.update(optim_tensors)
    tensors.update(rng_tensors)
    header = {
        "format": STATE_FORMAT,
        "progress": json.dumps(progress, sort_keys=True),
        "optimizer": json.dumps(optim_info),
        "rng": json.dumps(rng_info),
        "scaler": json.dumps(scaler_state or {}),
    }
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=header))


def read_header_metadata(path) -> dict:
    """The header metadata (string -> string) of a safetensors file; safetensors checks the header
    and that every tensor lies within the file, without reading the tensors."""
    with open_safetensors(Path(path)) as f:
        return f.metadata() or {}


def load_train_state(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     restore_rng_states: bool = True) -> tuple[dict, dict]:
    """Restore model + optimizer (+ RNG) in place from a state file; -> (progress, scaler_state).
    Raises TrainingError when the file is not a whole state of this model."""
    try:
        meta = read_header_metadata(path)
    except CheckpointError as exc:
        raise TrainingError(f"cannot resume from {path}: {exc}") from exc
    if meta.get("format") != STATE_FORMAT:
        raise TrainingError(f"cannot resume from {path}: not a training state file (format {meta.get('format')!r})")
    try:
        tensors = load_file(str(path), device="cpu")
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(model_state)
    except (SafetensorError, RuntimeError) as exc:
        raise TrainingError(f"cannot resume from {path}: it holds another model's state or a damaged one "
                            f"({str(exc).splitlines()[0]})") from exc
    optimizer.load_state_dict(optimizer_from_flat(tensors, json.loads(meta["optimizer"])))
    if restore_rng_states:
        restore_rng(tensors, json.loads(meta["rng"]))
    return json.loads(meta["progress"]), json.loads(meta.get("scaler") or "{}")
