"""Which torch device to run on."""

import torch

from .errors import OccnetError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str | None) -> torch.device:
    """'auto' (or None) picks CUDA, then Apple's MPS, then the CPU. An explicit device that this
    machine lacks is an error, not a silent fallback."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind not in DEVICE_CHOICES:
        raise OccnetError("bad_device", f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise OccnetError("device_unavailable", "CUDA was requested but this PyTorch build or machine has no CUDA GPU")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise OccnetError("device_unavailable", "MPS was requested but is not available on this machine")
    return torch.device(name)
