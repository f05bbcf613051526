"""EfficientAD's Patch Description Networks (Batzner et al., WACV 2024; SPEC section 1).

A PDN maps an image to 384-channel descriptors of 33x33 patches (PDN-M is deeper and wider).
Without padding (training and inference), a 256 px image gives a 56x56 grid. With padding (used
only while distilling the teacher from a pretrained backbone), a 256 px image gives a 64x64 grid,
the grid of WideResNet's layer2 at 512 px.

Layer names follow the widely shared convention (``conv1``..``conv4`` for S, ``conv1``..``conv6``
for M), so a teacher state dict from elsewhere (e.g. anomalib's pretrained teachers) loads.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

PDNSize = Literal["small", "medium"]
FEATURE_CHANNELS = 384


class PDN(nn.Module):
    """``forward(normalized images) -> (B, out_channels, h, w)``."""

    def __init__(self, size: PDNSize = "small", out_channels: int = FEATURE_CHANNELS, padded: bool = False):
        super().__init__()
        self.size, self.padded = size, padded
        pad = 1 if padded else 0
        if size == "small":
            self.conv1 = nn.Conv2d(3, 128, 4, padding=3 * pad)
            self.conv2 = nn.Conv2d(128, 256, 4, padding=3 * pad)
            self.conv3 = nn.Conv2d(256, 256, 3, padding=pad)
            self.conv4 = nn.Conv2d(256, out_channels, 4)
        elif size == "medium":
            self.conv1 = nn.Conv2d(3, 256, 4, padding=3 * pad)
            self.conv2 = nn.Conv2d(256, 512, 4, padding=3 * pad)
            self.conv3 = nn.Conv2d(512, 512, 1)
            self.conv4 = nn.Conv2d(512, 512, 3, padding=pad)
            self.conv5 = nn.Conv2d(512, FEATURE_CHANNELS, 4)
            self.conv6 = nn.Conv2d(FEATURE_CHANNELS, out_channels, 1)
        else:
            raise ValueError(f"PDN size {size!r}: expected 'small' or 'medium'")

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2, stride=2, padding=1 if self.padded else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._pool(F.relu(self.conv1(x)))
        x = self._pool(F.relu(self.conv2(x)))
        x = F.relu(self.conv3(x))
        if self.size == "small":
            return self.conv4(x)
        x = F.relu(self.conv4(x))
        return self.conv6(F.relu(self.conv5(x)))


def pdn_output_size(size: PDNSize, image_size: int, padded: bool = False) -> int:
    """Side of the PDN's output grid for a square input (computed by a forward pass of a probe)."""
    with torch.no_grad():
        probe = PDN(size, out_channels=1, padded=padded)
        return probe(torch.zeros(1, 3, image_size, image_size)).shape[-1]


def distillation_targets(patch_features: torch.Tensor, grid: int, channels: int = FEATURE_CHANNELS) -> torch.Tensor:
    """What the teacher PDN is distilled onto: a backbone's patch features (3x3-aggregated layers
    on one grid, :func:`effad_hpc.models.feature_maps.patch_features`) averaged down (or repeated
    up) to ``channels`` per position by adaptive pooling, on the PDN's ``grid`` x ``grid`` output."""
    batch, depth, height, width = patch_features.shape
    per_position = patch_features.permute(0, 2, 3, 1).reshape(-1, 1, depth)
    pooled = F.adaptive_avg_pool1d(per_position, channels).reshape(batch, height, width, channels).permute(0, 3, 1, 2)
    if (height, width) != (grid, grid):
        pooled = F.interpolate(pooled, size=(grid, grid), mode="bilinear", align_corners=False)
    return pooled.contiguous()
