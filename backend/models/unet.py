"""A small 2D U-Net for feature planes."""

import torch
from torch import nn


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(min(8, c_out), c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(min(8, c_out), c_out), nn.ReLU(inplace=True),
    )


class UNet2d(nn.Module):
    """(B, C_in, R, R) -> (B, C_out, R, R); R must be divisible by 2^(depth-1).
    Group norm, not batch norm: batches hold few shapes and inference runs one at a time."""

    def __init__(self, in_channels: int, out_channels: int, depth: int = 4, base_channels: int = 32):
        super().__init__()
        widths = [base_channels * 2 ** i for i in range(depth)]
        self.down = nn.ModuleList()
        c = in_channels
        for w in widths:
            self.down.append(_conv_block(c, w))
            c = w
        self.up_convs = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up_convs.append(nn.ConvTranspose2d(c, w, 2, stride=2))
            self.up_blocks.append(_conv_block(2 * w, w))
            c = w
        self.out = nn.Conv2d(c, out_channels, 1)
        self.min_divisor = 2 ** (depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = nn.functional.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for up, block, skip in zip(self.up_convs, self.up_blocks, reversed(skips[:-1])):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.out(x)
