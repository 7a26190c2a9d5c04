"""Decoders: query points p and a condition c -> occupancy logits."""

import torch
from torch import nn

from .encoders import normalize_plane_coords
from .layers import CResnetBlockConv1d, CBatchNorm1d, ResnetBlockFC


class DecoderCBatchNorm(nn.Module):
    """Occupancy Networks' decoder: residual blocks of point-wise layers whose batch norms are
    conditioned on the global code. p (B, M, 3), c (B, c_dim) -> logits (B, M)."""

    def __init__(self, c_dim: int = 256, hidden: int = 256, n_blocks: int = 5):
        super().__init__()
        self.fc_p = nn.Conv1d(3, hidden, 1)
        self.blocks = nn.ModuleList([CResnetBlockConv1d(c_dim, hidden) for _ in range(n_blocks)])
        self.bn = CBatchNorm1d(c_dim, hidden)
        self.fc_out = nn.Conv1d(hidden, 1, 1)

    def forward(self, p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        net = self.fc_p(p.transpose(1, 2))
        for block in self.blocks:
            net = block(net, c)
        return self.fc_out(torch.relu(self.bn(net, c))).squeeze(1)


def sample_plane_features(p: torch.Tensor, planes: dict, padding: float) -> torch.Tensor:
    """Bilinearly sample each feature plane (B, C, R, R) at the projections of p (B, M, 3) and sum
    over planes -> (B, M, C)."""
    total = None
    for name, plane in planes.items():
        xy = normalize_plane_coords(p, name, padding) * 2.0 - 1.0  # grid_sample wants [-1, 1]
        sampled = nn.functional.grid_sample(plane, xy.unsqueeze(1), mode="bilinear",
                                            padding_mode="border", align_corners=True)
        sampled = sampled.squeeze(2)  # (B, C, M)
        total = sampled if total is None else total + sampled
    return total.transpose(1, 2)


class LocalDecoder(nn.Module):
    """Light decoder over local features: each block adds the sampled plane feature to the running
    point feature. p (B, M, 3), planes {name: (B, c_dim, R, R)} -> logits (B, M)."""

    def __init__(self, c_dim: int = 32, hidden: int = 32, n_blocks: int = 5, padding: float = 0.1):
        super().__init__()
        self.fc_p = nn.Linear(3, hidden)
        self.fc_c = nn.ModuleList([nn.Linear(c_dim, hidden) for _ in range(n_blocks)])
        self.blocks = nn.ModuleList([ResnetBlockFC(hidden) for _ in range(n_blocks)])
        self.fc_out = nn.Linear(hidden, 1)
        self.padding = padding

    def forward(self, p: torch.Tensor, planes: dict) -> torch.Tensor:
        c = sample_plane_features(p, planes, self.padding)
        net = self.fc_p(p)
        for fc_c, block in zip(self.fc_c, self.blocks):
            net = block(net + fc_c(c))
        return self.fc_out(torch.relu(net)).squeeze(-1)
