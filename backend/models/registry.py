"""The one place that turns a model configuration (a JSON-able dict) into a network.

A configuration names its input kind, its encoder and its decoder with their keyword arguments:

    {"input": {"kind": "points", "num_points": 3000, "noise": 0.005},
     "encoder": {"name": "local_pointnet", "c_dim": 32, ...},
     "decoder": {"name": "local", "c_dim": 32, ...},
     "padding": 0.1}

The same dict builds the model at training time and at inference (it travels in the checkpoint).
"""

import copy

import torch
from torch import nn

from .decoders import DecoderCBatchNorm, LocalDecoder
from .encoders import LocalPoolPointNet, ResNet18Encoder, ResnetPointNet

ENCODERS = {
    "resnet18": ResNet18Encoder,
    "resnet_pointnet": ResnetPointNet,
    "local_pointnet": LocalPoolPointNet,
}
DECODERS = {
    "cbatchnorm": DecoderCBatchNorm,
    "local": LocalDecoder,
}
# Which encoder feeds which decoder: a global code or feature planes.
ENCODER_OUTPUT = {"resnet18": "global", "resnet_pointnet": "global", "local_pointnet": "planes"}
DECODER_INPUT = {"cbatchnorm": "global", "local": "planes"}
INPUT_KINDS = ("points", "image")

# Presets: the paper's models, the default local model, and tiny versions for tests.
PRESETS = {
    "onet_image": {
        "input": {"kind": "image", "image_size": 224},
        "encoder": {"name": "resnet18", "c_dim": 256},
        "decoder": {"name": "cbatchnorm", "c_dim": 256, "hidden": 256, "n_blocks": 5},
        "padding": 0.1,
    },
    "onet_points": {
        "input": {"kind": "points", "num_points": 300, "noise": 0.005},
        "encoder": {"name": "resnet_pointnet", "c_dim": 512, "hidden": 512},
        "decoder": {"name": "cbatchnorm", "c_dim": 512, "hidden": 256, "n_blocks": 5},
        "padding": 0.1,
    },
    "local_points": {
        "input": {"kind": "points", "num_points": 3000, "noise": 0.005},
        "encoder": {"name": "local_pointnet", "c_dim": 32, "hidden": 32, "plane_resolution": 64,
                    "unet_depth": 4, "unet_base": 32},
        "decoder": {"name": "local", "c_dim": 32, "hidden": 32, "n_blocks": 5},
        "padding": 0.1,
    },
    "tiny_points": {
        "input": {"kind": "points", "num_points": 256, "noise": 0.0},
        "encoder": {"name": "local_pointnet", "c_dim": 8, "hidden": 8, "n_blocks": 2, "plane_resolution": 16,
                    "unet_depth": 2, "unet_base": 8},
        "decoder": {"name": "local", "c_dim": 8, "hidden": 8, "n_blocks": 2},
        "padding": 0.1,
    },
    "tiny_image": {
        "input": {"kind": "image", "image_size": 64},
        "encoder": {"name": "resnet18", "c_dim": 16, "width": 8},
        "decoder": {"name": "cbatchnorm", "c_dim": 16, "hidden": 16, "n_blocks": 2},
        "padding": 0.1,
    },
}


class OccupancyNetwork(nn.Module):
    """f(p | x): an encoder for the observation x and a decoder for the query points p."""

    def __init__(self, config: dict, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.config = copy.deepcopy(config)
        self.encoder = encoder
        self.decoder = decoder

    @property
    def input_kind(self) -> str:
        return self.config["input"]["kind"]

    def encode(self, inputs: torch.Tensor):
        """points (B, N, 3) or images (B, 3, S, S) -> c: (B, c_dim) or {plane: (B, C, R, R)}."""
        return self.encoder(inputs)

    def decode(self, p: torch.Tensor, c) -> torch.Tensor:
        """p (B, M, 3) -> occupancy logits (B, M)."""
        return self.decoder(p, c)

    def forward(self, p: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return self.decode(p, self.encode(inputs))


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])


def validate_config(config: dict) -> None:
    """Raise ValueError naming what is wrong with a model configuration."""
    for key in ("input", "encoder", "decoder"):
        if not isinstance(config.get(key), dict):
            raise ValueError(f"model configuration lacks the {key!r} section")
    kind = config["input"].get("kind")
    if kind not in INPUT_KINDS:
        raise ValueError(f"input kind {kind!r} is not one of {INPUT_KINDS}")
    enc, dec = config["encoder"].get("name"), config["decoder"].get("name")
    if enc not in ENCODERS:
        raise ValueError(f"unknown encoder {enc!r}; known: {', '.join(ENCODERS)}")
    if dec not in DECODERS:
        raise ValueError(f"unknown decoder {dec!r}; known: {', '.join(DECODERS)}")
    if ENCODER_OUTPUT[enc] != DECODER_INPUT[dec]:
        raise ValueError(f"encoder {enc!r} produces {ENCODER_OUTPUT[enc]} features but decoder {dec!r} "
                         f"expects {DECODER_INPUT[dec]} features")
    if (kind == "image") != (enc == "resnet18"):
        raise ValueError(f"encoder {enc!r} cannot take {kind} input")


def build_model(config: dict) -> OccupancyNetwork:
    """Build an untrained network from a configuration (see the module docstring)."""
    validate_config(config)
    enc_args = {k: v for k, v in config["encoder"].items() if k != "name"}
    dec_args = {k: v for k, v in config["decoder"].items() if k != "name"}
    if ENCODER_OUTPUT[config["encoder"]["name"]] == "planes":
        # Encoder and decoder must agree on how the padded box maps onto the planes.
        enc_args.setdefault("padding", config.get("padding", 0.1))
        dec_args.setdefault("padding", config.get("padding", 0.1))
    try:
        encoder = ENCODERS[config["encoder"]["name"]](**enc_args)
        decoder = DECODERS[config["decoder"]["name"]](**dec_args)
    except TypeError as exc:
        raise ValueError(f"bad model configuration: {exc}") from exc
    return OccupancyNetwork(config, encoder, decoder)
