"""Checkpoint format: one safetensors file.

Tensors are the model's state dict. The safetensors header metadata (string -> string) carries:
  "format": "occnet-checkpoint/1"
  "config": the model configuration (JSON), the single source of truth for building the network
  "metadata": free JSON (training provenance, normalisation conventions, metrics)
Loading never unpickles anything. A checkpoint is checked before anything big is allocated: its
configuration must be a JSON object with sizes in CONFIG_LIMITS, the network it describes is built
on torch's meta device (no memory) and every tensor shape in the file must match it; only then are
the weights read, and they must be finite.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_write
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
# (smallest, largest) accepted value of each size in a configuration's input, encoder and decoder
# sections. Far beyond the models this project trains (widths <= 512, 5 blocks, 4 U-Net levels),
# far below what would take minutes to build (block counts) or gigabytes at inference (image and
# plane resolutions, which no tensor shape in the file vouches for).
CONFIG_LIMITS = {
    "n_blocks": (0, 64), "unet_depth": (0, 8),
    "c_dim": (1, 16384), "hidden": (1, 16384), "width": (1, 16384), "unet_base": (1, 16384),
    "image_size": (8, 1024), "plane_resolution": (2, 1024),
    "num_points": (1, 10_000_000), "max_points": (1, 10_000_000),
}
MODEL_SECTIONS = ("input", "encoder", "decoder")


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


def with_new_header(path, config: dict, metadata: dict) -> None:
    """Rewrite a checkpoint's configuration and metadata in place (atomically), its tensors copied
    as stored, bit for bit. The new configuration must still build the network its tensors fit."""
    path = Path(path)
    read_header(path)
    check_config_sizes(config, path)
    expected = expected_shapes(config, path)
    with open_safetensors(path) as f:
        state = {name: f.get_tensor(name) for name in f.keys()}
    problem = describe_mismatch(expected, {name: tuple(t.shape) for name, t in state.items()})
    if problem:
        raise CheckpointError(f"{path}: the new configuration does not fit its tensors: {problem}")
    header = {"format": FORMAT, "config": json.dumps(config, sort_keys=True),
              "metadata": json.dumps({"normalisation": NORMALISATION, **metadata}, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=header))


def open_safetensors(path: Path):
    """safe_open(path), or CheckpointError. safetensors checks the header and that the tensors'
    byte ranges lie within the file, without reading them."""
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a safetensors checkpoint ({exc})") from exc


def json_object(header: dict, key: str, path: Path) -> dict:
    try:
        value = json.loads(header[key])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path} has an unreadable {key} ({type(exc).__name__}: {exc})") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: its {key} must be a JSON object, found {type(value).__name__}")
    return value


def check_config_sizes(config: dict, path: Path) -> None:
    """Refuse sizes outside CONFIG_LIMITS (or not whole numbers) before a network is built."""
    for section in MODEL_SECTIONS:
        values = config.get(section)
        if not isinstance(values, dict):
            raise CheckpointError(f"{path}: its configuration lacks the {section!r} section")
        for key, value in values.items():
            if key not in CONFIG_LIMITS:
                continue
            low, high = CONFIG_LIMITS[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise CheckpointError(f"{path}: configuration {section}.{key} = {value!r} is not a whole "
                                      f"number from {low} to {high}")


def read_header(path) -> tuple[dict, dict]:
    """(config, metadata) of a checkpoint without loading its tensors; the configuration's type
    and sizes are checked."""
    path = Path(path)
    with open_safetensors(path) as f:
        header = f.metadata() or {}
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an occnet checkpoint (format {header.get('format')!r}, "
                              f"expected {FORMAT!r})")
    config = json_object(header, "config", path)
    metadata = json_object(header, "metadata", path) if "metadata" in header else {}
    check_config_sizes(config, path)
    return config, metadata


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


def build_checked(config: dict, path: Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    try:
        with torch.device(device):
            return build_model(config)
    except (ValueError, KeyError, TypeError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def expected_shapes(config: dict, path: Path) -> dict:
    """{tensor name: shape} of the network a configuration builds, built on the meta device:
    shapes without storage, whatever sizes the configuration asks for."""
    model = build_checked(config, path, "meta")
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def read_weights(f, path: Path, reference: dict) -> dict:
    """The file's tensors in the dtypes of the model's state dict; refuses non-finite weights
    (a diverged training run), which would otherwise surface as an empty mesh."""
    state = {}
    for name, target in reference.items():
        tensor = f.get_tensor(name).to(target.dtype)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{path}: tensor {name} has {bad} NaN or infinite values "
                                  f"(did its training diverge?)")
        state[name] = tensor
    return state


def load_checkpoint(path, device: str | torch.device = "cpu"):
    """-> (model in eval mode on device, config, metadata). Raises CheckpointError naming the
    problem: missing file, not a checkpoint, bad configuration, weights that do not match it."""
    path = Path(path)
    config, metadata = read_header(path)
    expected = expected_shapes(config, path)
    with open_safetensors(path) as f:
        found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        mismatch = describe_mismatch(expected, found)
        if mismatch:
            raise CheckpointError(f"{path}: weights do not match the configuration: {mismatch}")
        # The file now vouches for every size: building for real costs about the file's size. A
        # fresh build (rather than meta's to_empty) also computes the non-persistent buffers,
        # e.g. the image encoder's normalisation constants, which the file does not carry.
        model = build_checked(config, path)
        try:
            model.load_state_dict(read_weights(f, path, model.state_dict()))
        except (SafetensorError, RuntimeError) as exc:
            raise CheckpointError(f"{path} is corrupt ({exc})") from exc
    return model.to(device).eval(), config, metadata
