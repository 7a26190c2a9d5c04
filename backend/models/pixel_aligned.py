"""A viewer-centred, pixel-aligned image model (in the spirit of PIFu, DISN and pixelNeRF).

The encoder turns the cropped picture into one feature map (multi-scale EfficientNet-Lite0
features fused at a quarter of the input resolution), a global code and the world's up direction
in the viewer frame. The decoder projects each query point through the canonical camera
(backend.camera), samples the feature map bilinearly at its pixel and predicts occupancy from that
feature, the point's viewer coordinates (depth above all) and the global code. What the picture
shows is read at the point's pixel; only what it cannot show comes from the global code.

With a prior (decoder option prior_temperature), the decoder learns a correction to a shape read
off the picture before any query: with prior "silhouette", the mask's outline inflated as if every
part of it were round (a disc becomes a ball); with prior "layers", the depths where each pixel's
ray enters and last leaves the object, predicted by the encoder (option layers) and trained on the
renders' depth maps, a dense target that teaches shape far faster than occupancy queries do.
Either guess beats an undertrained network, so the network starts from it and spends its training
on what the guess cannot say.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt
from torch import nn

from .. import camera
from .layers import ResnetBlockFC

# EfficientNet-Lite0 block indices after which a scale ends (strides 4, 8, 16, 32) and their widths.
LITE0_TAPS = (2, 4, 10, 15)
LITE0_TAP_CHANNELS = (24, 40, 112, 320)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Width of the texture head's one hidden layer.
TEXTURE_HIDDEN = 64
# Where the layer head starts: the surface a little in front of the centre, 0.3 units deep.
INITIAL_FRONT, INITIAL_THICKNESS = -0.15, 0.3


class EfficientNetPixelEncoder(nn.Module):
    """(B, 3, S, S) RGB in [0, 1] -> {"features": (B, c_dim, S/4, S/4), "global": (B, g_dim),
    "up": (B, 3) unit vectors}; with layers also "layers": (B, 2, S/4, S/4), the viewer z where
    each pixel's ray enters the object and where it last leaves it (back >= front). With
    layer_context the layer head also sees the whole picture (its pooled deepest features, added to
    every pixel's), because where the object sits in depth is a property of the whole object."""

    def __init__(self, c_dim: int = 64, g_dim: int = 128, layers: bool = False, layer_context: bool = False):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0")
        # The classifier head (1280 channels, fully connected) is not used: drop its weights.
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = net._blocks
        self.lateral = nn.ModuleList(nn.Conv2d(ch, c_dim, 1) for ch in LITE0_TAP_CHANNELS)
        self.fuse = nn.Sequential(nn.ReLU(), nn.Conv2d(c_dim, c_dim, 3, padding=1))
        self.global_code = nn.Linear(LITE0_TAP_CHANNELS[-1], g_dim)
        self.up_head = nn.Sequential(nn.Linear(LITE0_TAP_CHANNELS[-1], 64), nn.ReLU(), nn.Linear(64, 3))
        if layers:
            self.layer_head = nn.Sequential(nn.ReLU(), nn.Conv2d(c_dim, c_dim, 3, padding=1), nn.ReLU(),
                                            nn.Conv2d(c_dim, 2, 1))
            nn.init.zeros_(self.layer_head[-1].weight)
            with torch.no_grad():
                self.layer_head[-1].bias.copy_(torch.tensor([INITIAL_FRONT, math.log(math.expm1(INITIAL_THICKNESS))]))
        if layer_context and not layers:
            raise ValueError("layer_context needs layers: true (it feeds the layer head)")
        self.layer_context = nn.Linear(LITE0_TAP_CHANNELS[-1], c_dim) if layer_context else None
        if layer_context:   # zero at the start, so a model trained without it starts out unchanged
            nn.init.zeros_(self.layer_context.weight)
            nn.init.zeros_(self.layer_context.bias)
        self.layers = layers
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def load_imagenet(self, state_dict: dict) -> None:
        """Start the backbone from an EfficientNet-Lite0 ImageNet state dict (the library's keys)."""
        mine = {"stem.0.weight": state_dict["_conv_stem.weight"]}
        mine.update({f"stem.1.{k[len('_bn0.'):]}": v for k, v in state_dict.items() if k.startswith("_bn0.")})
        mine.update({k[1:]: v for k, v in state_dict.items() if k.startswith("_blocks.")})
        missing, unexpected = self.load_state_dict(mine, strict=False)
        backbone_missing = [k for k in missing if k.startswith(("stem", "blocks"))]
        if backbone_missing or unexpected:
            raise ValueError(f"ImageNet weights do not fit: missing {backbone_missing[:3]}, unexpected {unexpected[:3]}")

    def forward(self, images: torch.Tensor) -> dict:
        x = self.stem((images - self.mean) / self.std)
        taps = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in LITE0_TAPS:
                taps.append(x)
        size = taps[0].shape[-2:]
        fused = sum(F.interpolate(lateral(tap), size=size, mode="bilinear", align_corners=False)
                    if tap.shape[-2:] != size else lateral(tap) for lateral, tap in zip(self.lateral, taps))
        pooled = taps[-1].mean(dim=(2, 3))
        features = self.fuse(fused)
        out = {"features": features, "global": self.global_code(pooled), "up": F.normalize(self.up_head(pooled), dim=1),
               "picture": images}
        if self.layers:
            seen = features if self.layer_context is None else features + self.layer_context(pooled)[:, :, None, None]
            raw = self.layer_head(seen)
            out["layers"] = torch.cat([raw[:, :1], raw[:, :1] + F.softplus(raw[:, 1:])], dim=1)
        return out


def fourier_features(p: torch.Tensor, frequencies: int) -> torch.Tensor:
    """(..., 3) -> (..., 3 + 6 * frequencies): p, then sin and cos of 2^k * pi * p."""
    scales = (2.0 ** torch.arange(frequencies, device=p.device, dtype=p.dtype)) * math.pi
    angles = (p[..., None, :] * scales[:, None]).flatten(-2)
    return torch.cat([p, torch.sin(angles), torch.cos(angles)], dim=-1)


def viewer_to_grid(p: torch.Tensor, image_size: int, focal: torch.Tensor) -> torch.Tensor:
    """Viewer points (B, M, 3) -> grid_sample coordinates (B, M, 2) in [-1, 1] (align_corners=False)
    through each image's crop camera, focal (B,) a fraction of the crop width (backend.camera)."""
    focal = focal[:, None]
    depth = (p[..., 2] + camera.object_depth(focal)).clamp(min=1e-3)
    uv = (focal * image_size)[..., None] * p[..., :2] / depth[..., None] + (image_size - 1) / 2.0
    return (2.0 * uv + 1.0) / image_size - 1.0


def silhouette_half_thickness(mask: np.ndarray) -> np.ndarray:
    """Crop mask (R, R) bool -> (R, R) float32: the half thickness, in viewer units, of the outline
    inflated as if round: sqrt(d (2 D - d)) at distance d from the outline, D the largest such
    distance (a disc of radius D becomes a ball). Zero outside the mask."""
    d = distance_transform_edt(mask) * camera.crop_pixel_width(mask.shape[0])
    return np.sqrt(np.maximum(d * (2.0 * d.max() - d), 0.0)).astype(np.float32)


PRIORS = ("silhouette", "layers")


class PixelAlignedDecoder(nn.Module):
    """Occupancy logits (B, M) of viewer points p (B, M, 3) given the encoder's output and each
    image's crop focal length c["focal"] (B,); with the silhouette prior also c["thickness"]
    (B, 1, R, R), the half-thickness map of silhouette_half_thickness; with the layers prior
    the encoder's c["layers"].

    texture: a texture head besides, for the colour of surface the picture does not show: a small
    network on the trunk's last features and the picture's colour at the point's pixel (what is in
    front of it), so that the hidden side starts from the visible one and learns how it differs."""

    def __init__(self, c_dim: int = 64, g_dim: int = 128, hidden: int = 128, n_blocks: int = 3,
                 frequencies: int = 4, image_size: int = 128, prior_temperature: float | None = None,
                 prior: str = "silhouette", texture: bool = False):
        super().__init__()
        if prior not in PRIORS:
            raise ValueError(f"prior {prior!r} is not one of {PRIORS}")
        self.frequencies, self.image_size = frequencies, image_size
        self.prior_temperature, self.prior = prior_temperature, prior
        self.fc_feature = nn.Linear(c_dim, hidden)
        self.fc_point = nn.Linear(3 + 6 * frequencies, hidden)
        self.fc_global = nn.Linear(g_dim, hidden)
        if prior_temperature is not None:
            # zero at the start: a network trained without the prior keeps its features
            self.fc_prior = nn.Linear(2, hidden)
            nn.init.zeros_(self.fc_prior.weight)
            nn.init.zeros_(self.fc_prior.bias)
        self.blocks = nn.ModuleList(ResnetBlockFC(hidden) for _ in range(n_blocks))
        self.fc_out = nn.Linear(hidden, 1)
        self.texture = texture
        if texture:
            self.colour_head = nn.Sequential(nn.Linear(hidden + 3, TEXTURE_HIDDEN), nn.ReLU(),
                                             nn.Linear(TEXTURE_HIDDEN, 3))

    @property
    def needs_mask(self) -> bool:
        return self.prior_temperature is not None and self.prior == "silhouette"

    def prior_inputs(self, p: torch.Tensor, grid: torch.Tensor, c: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The prior's guess at points p (B, M, 3) projecting to grid (B, M, 1, 2): (extent, inside),
        each (B, M): how deep the guessed object is along the point's ray (silhouette: half of it),
        and how far the point lies inside the guess (negative outside)."""
        if self.prior == "silhouette":
            thickness = F.grid_sample(c["thickness"], grid, mode="bilinear", padding_mode="zeros",
                                      align_corners=False)[:, 0, :, 0]
            return thickness, thickness - p[..., 2].abs()
        front, back = F.grid_sample(c["layers"], grid, mode="bilinear", padding_mode="border",
                                    align_corners=False)[..., 0].unbind(1)
        return back - front, torch.minimum(p[..., 2] - front, back - p[..., 2])

    def forward(self, p: torch.Tensor, c: dict, with_colour: bool = False):
        """Logits (B, M); with_colour: (logits, RGB (B, M, 3) in [0, 1]) from the texture head."""
        grid = viewer_to_grid(p, self.image_size, c["focal"])[:, :, None]            # (B, M, 1, 2)
        sampled = F.grid_sample(c["features"], grid, mode="bilinear", padding_mode="border",
                                align_corners=False)[..., 0].transpose(1, 2)         # (B, M, C)
        net = self.fc_feature(sampled) + self.fc_point(fourier_features(p, self.frequencies)) \
            + self.fc_global(c["global"])[:, None]
        if self.prior_temperature is not None:
            extent, inside_prior = self.prior_inputs(p, grid, c)
            net = net + self.fc_prior(torch.stack([extent, inside_prior], dim=-1))
        for block in self.blocks:
            net = block(net)
        hidden = torch.relu(net)
        logits = self.fc_out(hidden)[..., 0]
        if self.prior_temperature is not None:
            logits = logits + inside_prior / self.prior_temperature
        if not with_colour:
            return logits
        if not self.texture:
            raise ValueError("this decoder has no texture head (decoder option texture: false)")
        shown = F.grid_sample(c["picture"].to(hidden), grid, mode="bilinear", padding_mode="border",
                              align_corners=False)[..., 0].transpose(1, 2)           # (B, M, 3)
        return logits, torch.sigmoid(self.colour_head(torch.cat([hidden, shown], dim=-1)))
