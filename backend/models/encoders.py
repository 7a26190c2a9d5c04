"""Encoders: an observation x -> a condition c for the occupancy decoder.

Global encoders return c of shape (B, c_dim); the local encoder returns a dict of feature planes.
"""

import torch
from torch import nn

from .layers import ResnetBlockFC
from .unet import UNet2d

# Images are standardised with these statistics (common RGB statistics of natural images); we train
# from scratch, so they only need to be fixed, not to match any pretrained weights.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


class BasicBlock(nn.Module):
    """The two-convolution residual block of ResNet-18: (B, C_in, H, W) -> (B, C_out, H/s, W/s)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        nn.init.zeros_(self.bn2.weight)  # residual branch starts silent: stable training from scratch
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


class ResNet18Encoder(nn.Module):
    """ResNet-18 image encoder as used by Occupancy Networks: images (B, 3, S, S) in [0, 1]
    -> c (B, c_dim). Written out here because torchvision is not a dependency."""

    def __init__(self, c_dim: int = 256, width: int = 64):
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(3, w, 7, 2, 3, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        )
        layers, c_in = [], w
        for i, c_out in enumerate((w, 2 * w, 4 * w, 8 * w)):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(8 * w, c_dim)
        self.register_buffer("mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ResnetPointNet(nn.Module):
    """PointNet with residual blocks and max-pooling between them (Occupancy Networks' point-cloud
    encoder): points (B, N, 3) -> c (B, c_dim)."""

    def __init__(self, c_dim: int = 512, hidden: int = 512, n_blocks: int = 5):
        super().__init__()
        self.fc_pos = nn.Linear(3, 2 * hidden)
        self.blocks = nn.ModuleList([ResnetBlockFC(2 * hidden, hidden) for _ in range(n_blocks)])
        self.fc_c = nn.Linear(hidden, c_dim)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        net = self.fc_pos(points)
        for i, block in enumerate(self.blocks):
            if i > 0:
                pooled = net.max(dim=1, keepdim=True).values.expand_as(net)
                net = torch.cat([net, pooled], dim=2)
            net = block(net)
        return self.fc_c(torch.relu(net.max(dim=1).values))


PLANES = ("xz", "xy", "yz")
PLANE_AXES = {"xz": (0, 2), "xy": (0, 1), "yz": (1, 2)}


def normalize_plane_coords(points: torch.Tensor, plane: str, padding: float) -> torch.Tensor:
    """Map canonical points (B, N, 3) in the padded box to plane coordinates (B, N, 2) in [0, 1)."""
    axes = PLANE_AXES[plane]
    xy = points[..., axes] / (1.0 + padding + 1e-3) + 0.5
    return xy.clamp(0.0, 1.0 - 1e-5)


def plane_cell_index(xy: torch.Tensor, resolution: int) -> torch.Tensor:
    """Flat cell index (B, N) of plane coordinates (B, N, 2) in [0, 1) on a resolution^2 grid.
    Row-major with the first coordinate as the column, matching grid_sample's (x, y) order."""
    ij = (xy * resolution).long()
    return ij[..., 0] + resolution * ij[..., 1]


class LocalPoolPointNet(nn.Module):
    """Point features pooled onto three axis-aligned planes (Convolutional Occupancy Networks).

    points (B, N, 3) -> {"xz" | "xy" | "yz": (B, c_dim, R, R)} feature planes, each refined by a
    small U-Net. Blocks exchange information by max-pooling features within each plane cell."""

    def __init__(self, c_dim: int = 32, hidden: int = 32, n_blocks: int = 5, plane_resolution: int = 64,
                 padding: float = 0.1, unet_depth: int = 4, unet_base: int = 32):
        super().__init__()
        self.fc_pos = nn.Linear(3, 2 * hidden)
        self.blocks = nn.ModuleList([ResnetBlockFC(2 * hidden, hidden) for _ in range(n_blocks)])
        self.fc_c = nn.Linear(hidden, c_dim)
        self.unet = UNet2d(c_dim, c_dim, depth=unet_depth, base_channels=unet_base) if unet_depth > 0 else None
        self.resolution = plane_resolution
        self.padding = padding
        self.c_dim = c_dim

    def _pool_local(self, net: torch.Tensor, indices: dict) -> torch.Tensor:
        """Max of net (B, N, F) over the points sharing a cell, summed over planes -> (B, N, F)."""
        B, N, F = net.shape
        cells = self.resolution ** 2
        out = torch.zeros_like(net)
        for idx in indices.values():
            pooled = net.new_full((B, cells, F), -1e4)
            expanded = idx.unsqueeze(-1).expand(-1, -1, F)
            pooled = pooled.scatter_reduce(1, expanded, net, reduce="amax", include_self=True)
            out = out + pooled.gather(1, expanded)
        return out

    def _scatter_mean_plane(self, features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Average per-point features (B, N, C) into their cells -> plane (B, C, R, R)."""
        B, N, C = features.shape
        R = self.resolution
        expanded = idx.unsqueeze(-1).expand(-1, -1, C)
        summed = features.new_zeros((B, R * R, C)).scatter_add(1, expanded, features)
        counts = features.new_zeros((B, R * R, 1)).scatter_add(1, idx.unsqueeze(-1), torch.ones_like(features[..., :1]))
        mean = summed / counts.clamp(min=1.0)
        return mean.permute(0, 2, 1).reshape(B, C, R, R)

    def forward(self, points: torch.Tensor) -> dict:
        indices = {
            plane: plane_cell_index(normalize_plane_coords(points, plane, self.padding), self.resolution)
            for plane in PLANES
        }
        net = self.fc_pos(points)
        for i, block in enumerate(self.blocks):
            if i > 0:
                net = torch.cat([net, self._pool_local(net, indices)], dim=2)
            net = block(net)
        features = self.fc_c(net)
        planes = {}
        for plane, idx in indices.items():
            fea = self._scatter_mean_plane(features, idx)
            planes[plane] = self.unet(fea) if self.unet is not None else fea
        return planes
