"""A field fitted to one object from its posed views (DVR's multi-view setting): no encoder, a
decoder that maps a point to occupancy and, with its texture head, to colour.

    {"input": {"kind": "none"}, "encoder": {"name": "none"},
     "decoder": {"name": "textured_field", "hidden": 128, "n_blocks": 5, "texture": true}}

The occupancy and colour share one trunk (as in DVR): the colour of a surface point then moves with
the shape that the images shape, and a texture costs one extra output row, not a second network.
"""

import math

import torch
from torch import nn

from .layers import ResnetBlockFC


class NoEncoder(nn.Module):
    """The encoder of a model without an observation: its condition is None."""

    def forward(self, inputs=None):
        return None


def fourier_features(p: torch.Tensor, frequencies: int) -> torch.Tensor:
    """p (..., 3) -> (..., 3 + 6 * frequencies): p, then sin and cos of 2^k pi p for k < frequencies,
    which lets a small network fit details finer than its width allows (NeRF's encoding)."""
    if frequencies == 0:
        return p
    scales = (2.0 ** torch.arange(frequencies, dtype=p.dtype, device=p.device)) * math.pi
    angles = (p[..., None, :] * scales[:, None]).flatten(-2)
    return torch.cat([p, torch.sin(angles), torch.cos(angles)], dim=-1)


class TexturedField(nn.Module):
    """p (B, M, 3) -> occupancy logits (B, M); with_colour: also RGB (B, M, 3) in [0, 1].

    hidden, n_blocks: width and depth of the residual trunk; texture: add the colour head (off:
    an occupancy-only field, which asking for colour is an error); frequencies: Fourier features
    of the input (0: the raw coordinates, as in DVR)."""

    def __init__(self, hidden: int = 128, n_blocks: int = 5, texture: bool = False, frequencies: int = 0):
        super().__init__()
        self.texture = texture
        self.frequencies = frequencies
        self.fc_p = nn.Linear(3 + 6 * frequencies, hidden)
        self.blocks = nn.ModuleList([ResnetBlockFC(hidden) for _ in range(n_blocks)])
        self.fc_out = nn.Linear(hidden, 4 if texture else 1)

    def forward(self, p: torch.Tensor, c=None, with_colour: bool = False):
        net = self.fc_p(fourier_features(p, self.frequencies))
        for block in self.blocks:
            net = block(net)
        out = self.fc_out(torch.relu(net))
        logits = out[..., 0]
        if not with_colour:
            return logits
        if not self.texture:
            raise ValueError("this field has no texture head (decoder option texture: false)")
        return logits, torch.sigmoid(out[..., 1:])
