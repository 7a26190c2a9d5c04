"""Building blocks shared by the encoders and decoders."""

import torch
from torch import nn


class ResnetBlockFC(nn.Module):
    """Fully connected residual block: x (..., size_in) -> (..., size_out)."""

    def __init__(self, size_in: int, size_out: int | None = None, size_h: int | None = None):
        super().__init__()
        size_out = size_in if size_out is None else size_out
        size_h = min(size_in, size_out) if size_h is None else size_h
        self.fc_0 = nn.Linear(size_in, size_h)
        self.fc_1 = nn.Linear(size_h, size_out)
        self.shortcut = None if size_in == size_out else nn.Linear(size_in, size_out, bias=False)
        # Start each block as the identity, so deep stacks train from the first step.
        nn.init.zeros_(self.fc_1.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dx = self.fc_1(torch.relu(self.fc_0(torch.relu(x))))
        x_s = x if self.shortcut is None else self.shortcut(x)
        return x_s + dx


class CBatchNorm1d(nn.Module):
    """Conditional batch norm: normalise x (B, F, M) without affine terms, then scale and shift with
    gamma(c), beta(c) predicted from the condition c (B, C)."""

    def __init__(self, c_dim: int, f_dim: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(f_dim, affine=False)
        self.conv_gamma = nn.Linear(c_dim, f_dim)
        self.conv_beta = nn.Linear(c_dim, f_dim)
        # gamma starts at 1 and beta at 0: plain batch norm at initialisation.
        nn.init.zeros_(self.conv_gamma.weight)
        nn.init.ones_(self.conv_gamma.bias)
        nn.init.zeros_(self.conv_beta.weight)
        nn.init.zeros_(self.conv_beta.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        gamma = self.conv_gamma(c).unsqueeze(-1)
        beta = self.conv_beta(c).unsqueeze(-1)
        return gamma * self.bn(x) + beta


class CResnetBlockConv1d(nn.Module):
    """Residual block of point-wise (1x1) convolutions with conditional batch norm:
    x (B, F, M), c (B, C) -> (B, F, M)."""

    def __init__(self, c_dim: int, size: int):
        super().__init__()
        self.bn_0 = CBatchNorm1d(c_dim, size)
        self.bn_1 = CBatchNorm1d(c_dim, size)
        self.fc_0 = nn.Conv1d(size, size, 1)
        self.fc_1 = nn.Conv1d(size, size, 1)
        nn.init.zeros_(self.fc_1.weight)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        net = self.fc_0(torch.relu(self.bn_0(x, c)))
        dx = self.fc_1(torch.relu(self.bn_1(net, c)))
        return x + dx
