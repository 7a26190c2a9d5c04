"""The shipped default models, one per kind of input."""

from pathlib import Path

from .errors import OccnetError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_CHECKPOINTS = {
    "points": WEIGHTS_DIR / "pointcloud_local.safetensors",
    "image": WEIGHTS_DIR / "image_resnet18.safetensors",
}
KIND_NAMES = {"points": "point-cloud", "image": "single-image"}


def default_checkpoint(kind: str) -> Path:
    """Path of the shipped default model for an input kind; a clear error if none is installed."""
    path = DEFAULT_CHECKPOINTS[kind]
    if not path.is_file():
        raise OccnetError(
            "no_default_model",
            f"no default {KIND_NAMES[kind]} model is installed (expected {path}); "
            f"pass a checkpoint explicitly or train one with python -m training.train",
        )
    return path


def installed_defaults() -> dict:
    return {kind: str(p) if p.is_file() else None for kind, p in DEFAULT_CHECKPOINTS.items()}
