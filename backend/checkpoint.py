"""Checkpoint format: one safetensors file.

Tensors are the model's state dict. The safetensors header metadata (string -> string) carries:
  "format": "occnet-checkpoint/1"
  "config": the model configuration (JSON), the single source of truth for building the network
  "metadata": free JSON (training provenance, normalisation conventions, metrics)
Loading never unpickles anything, and a checkpoint whose tensors do not match what its
configuration builds is refused with the mismatch named.
"""

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .models import build_model

FORMAT = "occnet-checkpoint/1"
# Conventions every checkpoint of this format follows; written into each file so that a reader
# never has to guess them (see docs/CONTRACTS.md).
NORMALISATION = {
    "canonical_box": "x_norm = (x - bbox_center) / bbox_longest_edge",
    "query_box": [-0.55, 0.55],
    "image_axes": "row 0 = top, RGB in [0, 1]",
}


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over path: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path, model: torch.nn.Module, config: dict, metadata: dict | None = None,
                    dtype: torch.dtype | None = None) -> None:
    """Write model weights + configuration atomically. dtype=torch.float16 halves the file size
    (floating tensors only); loading always restores float32."""
    state = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[name] = t.contiguous()
    header = {
        "format": FORMAT,
        "config": json.dumps(config, sort_keys=True),
        "metadata": json.dumps({"normalisation": NORMALISATION, **(metadata or {})}, sort_keys=True),
    }
    atomic_write(Path(path), lambda tmp: save_file(state, tmp, metadata=header))


def read_header(path) -> tuple[dict, dict]:
    """(config, metadata) of a checkpoint without loading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100_000_000:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a safetensors checkpoint ({exc})") from exc
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an occnet checkpoint (format {meta.get('format')!r}, "
                              f"expected {FORMAT!r})")
    try:
        return json.loads(meta["config"]), json.loads(meta.get("metadata", "{}"))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path} has an unreadable configuration ({exc})") from exc


def describe_mismatch(expected: dict, found: dict) -> str | None:
    """Name the first differences between two {name: shape} maps, or None when they agree."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [(k, expected[k], found[k]) for k in sorted(set(expected) & set(found)) if expected[k] != found[k]]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
    if wrong:
        k, e, f = wrong[0]
        parts.append(f"{len(wrong)} tensors of the wrong shape (e.g. {k}: configuration wants {list(e)}, file has {list(f)})")
    return "; ".join(parts) or None


def load_checkpoint(path, device: str | torch.device = "cpu"):
    """-> (model in eval mode on device, config, metadata). Raises CheckpointError naming the
    problem: missing file, not a checkpoint, bad configuration, weights that do not match it."""
    config, metadata = read_header(path)
    try:
        model = build_model(config)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt ({exc})") from exc
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mismatch = describe_mismatch(expected, {k: tuple(v.shape) for k, v in state.items()})
    if mismatch:
        raise CheckpointError(f"{path}: weights do not match the configuration: {mismatch}")
    reference = model.state_dict()
    model.load_state_dict({k: v.to(reference[k].dtype) for k, v in state.items()})
    return model.to(device).eval(), config, metadata
