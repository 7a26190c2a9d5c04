"""The one place that turns a model configuration (a JSON-able dict) into a network.

A configuration names its input kind, its encoder and its decoder with their keyword arguments:

    {"input": {"kind": "points", "num_points": 3000, "noise": 0.005},
     "encoder": {"name": "local_pointnet", "c_dim": 32, ...},
     "decoder": {"name": "local", "c_dim": 32, ...},
     "padding": 0.1}

The same dict builds the model at training time and at inference (it travels in the checkpoint).
An optional "surface_probability" (default 0.5) says at which of the network's own probabilities its
surface lies best, as chosen on validation after training: the pipeline puts the user's threshold
0.5 there (OccupancyNetwork.surface_level). Training never reads it.
"""

import copy
import math

import numpy as np

import torch
from torch import nn

from .. import camera

from .decoders import DecoderCBatchNorm, LocalDecoder
from .encoders import LocalPoolPointNet, ResNet18Encoder, ResnetPointNet
from .pixel_aligned import EfficientNetPixelEncoder, PixelAlignedDecoder, silhouette_half_thickness
from .textured import NoEncoder, TexturedField

ENCODERS = {
    "resnet18": ResNet18Encoder,
    "resnet_pointnet": ResnetPointNet,
    "local_pointnet": LocalPoolPointNet,
    "efficientnet_pixel": EfficientNetPixelEncoder,
    "none": NoEncoder,
}
DECODERS = {
    "cbatchnorm": DecoderCBatchNorm,
    "local": LocalDecoder,
    "pixel_aligned": PixelAlignedDecoder,
    "textured_field": TexturedField,
}
# Which encoder feeds which decoder: a global code, feature planes or an image feature map.
# A model of input kind "none" is one object's field fitted to its views (training.dvr).
ENCODER_OUTPUT = {"resnet18": "global", "resnet_pointnet": "global", "local_pointnet": "planes",
                  "efficientnet_pixel": "pixel", "none": "none"}
DECODER_INPUT = {"cbatchnorm": "global", "local": "planes", "pixel_aligned": "pixel", "textured_field": "none"}
IMAGE_ENCODERS = ("resnet18", "efficientnet_pixel")
INPUT_KINDS = ("points", "image", "none")
# Where an image model predicts occupancy: the object's canonical box (orientation guessed), or
# the viewer frame of backend.camera (what the picture shows, as it shows it).
FRAMES = ("canonical", "viewer")

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
    "pixel_image": {
        "input": {"kind": "image", "image_size": 128, "frame": "viewer"},
        "encoder": {"name": "efficientnet_pixel", "c_dim": 64, "g_dim": 128},
        "decoder": {"name": "pixel_aligned", "c_dim": 64, "g_dim": 128, "hidden": 96, "n_blocks": 3},
        "padding": 0.1,
    },
    "tiny_pixel_image": {
        "input": {"kind": "image", "image_size": 64, "frame": "viewer"},
        "encoder": {"name": "efficientnet_pixel", "c_dim": 8, "g_dim": 8},
        "decoder": {"name": "pixel_aligned", "c_dim": 8, "g_dim": 8, "hidden": 8, "n_blocks": 1},
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

    @property
    def frame(self) -> str:
        """"viewer" for models that predict in the camera's frame (backend.camera), else "canonical"."""
        return self.config["input"].get("frame", "canonical")

    @property
    def needs_mask(self) -> bool:
        """The decoder starts from a shape read off the object's mask: encode needs the mask."""
        return bool(getattr(self.decoder, "needs_mask", False))

    def encode(self, inputs: torch.Tensor, focal: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """points (B, N, 3) or images (B, 3, S, S) -> c: (B, c_dim), {plane: (B, C, R, R)} or, for
        viewer-centred models, {"features", "global", "up", "focal"} (and "thickness" for models
        that need the mask); focal (B,): each crop's focal length as a fraction of its width
        (backend.camera), the canonical guess when None; mask (B, R, R) bool: the crop's mask, at
        any resolution R."""
        c = self.encoder(inputs)
        if self.frame == "viewer":
            c["focal"] = focal.to(inputs) if focal is not None else \
                torch.full((inputs.shape[0],), camera.FOCAL, dtype=inputs.dtype, device=inputs.device)
        if self.needs_mask:
            if mask is None:
                raise ValueError("this model reads the object's shape off its mask: encode needs the mask")
            thickness = np.stack([silhouette_half_thickness(m) for m in mask.cpu().numpy()])
            c["thickness"] = torch.from_numpy(thickness)[:, None].to(inputs)
        return c

    def decode(self, p: torch.Tensor, c) -> torch.Tensor:
        """p (B, M, 3) -> occupancy logits (B, M)."""
        return self.decoder(p, c)

    def surface_level(self, threshold: float) -> float:
        """The logit of decode's output at which the surface lies for a user's threshold in (0, 1):
        the threshold taken relative to the configuration's surface_probability, so that 0.5 means
        the network's validated surface and higher thresholds still mean less inside."""
        return probability_to_logit(threshold) + probability_to_logit(self.config.get("surface_probability", 0.5))

    @property
    def has_texture(self) -> bool:
        """The decoder has a texture head: `decode_colour` gives the colour of points."""
        return bool(getattr(self.decoder, "texture", False))

    def decode_colour(self, p: torch.Tensor, c) -> torch.Tensor:
        """p (B, M, 3) -> RGB (B, M, 3) in [0, 1] from the texture head (decoders that have one
        take with_colour=True and return (logits, rgb))."""
        return self.decoder(p, c, with_colour=True)[1]

    def forward(self, p: torch.Tensor, inputs: torch.Tensor, focal: torch.Tensor | None = None,
                with_code: bool = False, mask: torch.Tensor | None = None):
        """Logits (B, M); with_code: (logits, c), for losses on the encoder's other outputs."""
        c = self.encode(inputs, focal, mask)
        logits = self.decode(p, c)
        return (logits, c) if with_code else logits


def probability_to_logit(p: float) -> float:
    """log(p / (1 - p)) for p in (0, 1)."""
    return math.log(p / (1.0 - p))


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
    if (kind == "image") != (enc in IMAGE_ENCODERS):
        raise ValueError(f"encoder {enc!r} cannot take {kind} input")
    surface = config.get("surface_probability", 0.5)
    if not isinstance(surface, (int, float)) or isinstance(surface, bool) or not 0.0 < surface < 1.0:
        raise ValueError(f"surface_probability must be a number strictly between 0 and 1, got {surface!r}")
    frame = config["input"].get("frame", "canonical")
    if frame not in FRAMES:
        raise ValueError(f"input frame {frame!r} is not one of {FRAMES}")
    if (frame == "viewer") != (ENCODER_OUTPUT[enc] == "pixel"):
        raise ValueError(f"frame {frame!r} does not fit encoder {enc!r}: only pixel-aligned models are viewer-centred")
    wants_layers = config["decoder"].get("prior") == "layers" and config["decoder"].get("prior_temperature") is not None
    if wants_layers and not config["encoder"].get("layers", False):
        raise ValueError("the decoder's layers prior needs an encoder with layers: true (it predicts them)")


def build_model(config: dict) -> OccupancyNetwork:
    """Build an untrained network from a configuration (see the module docstring)."""
    validate_config(config)
    enc_args = {k: v for k, v in config["encoder"].items() if k != "name"}
    dec_args = {k: v for k, v in config["decoder"].items() if k != "name"}
    if ENCODER_OUTPUT[config["encoder"]["name"]] == "planes":
        # Encoder and decoder must agree on how the padded box maps onto the planes.
        enc_args.setdefault("padding", config.get("padding", 0.1))
        dec_args.setdefault("padding", config.get("padding", 0.1))
    if ENCODER_OUTPUT[config["encoder"]["name"]] == "pixel":
        dec_args.setdefault("image_size", config["input"].get("image_size", 128))
    try:
        encoder = ENCODERS[config["encoder"]["name"]](**enc_args)
        decoder = DECODERS[config["decoder"]["name"]](**dec_args)
    except TypeError as exc:
        raise ValueError(f"bad model configuration: {exc}") from exc
    return OccupancyNetwork(config, encoder, decoder)
