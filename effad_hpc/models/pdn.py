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
            # As the authors' get_pdn_medium: conv5 already has the output width (768 for the
            # student), no 384-wide bottleneck before conv6.
            self.conv5 = nn.Conv2d(512, out_channels, 4)
            self.conv6 = nn.Conv2d(out_channels, out_channels, 1)
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


LAYER_WIDTH = 1024
"""Width each backbone layer's patch features are pooled to before the layers are averaged down
to the targets (the authors' pretraining.py: ``Preprocessing(feature_dimensions, 1024)``)."""


def pooling_matrix(inputs: int, outputs: int) -> torch.Tensor:
    """``F.adaptive_avg_pool1d`` from ``inputs`` to ``outputs`` values as an (outputs, inputs) matrix
    (the same bins: ``[floor(o * inputs / outputs), ceil((o + 1) * inputs / outputs))``)."""
    rows = torch.arange(outputs)
    starts, ends = rows * inputs // outputs, -((-(rows + 1) * inputs) // outputs)
    columns = torch.arange(inputs)
    inside = (columns >= starts[:, None]) & (columns < ends[:, None])
    return inside.float() / (ends - starts)[:, None].float()


class DistillationTargets(nn.Module):
    """What the teacher PDN is distilled onto, as the authors' pretraining builds it from the
    backbone's layers (WideResNet-101 ``layer2``, ``layer3``): at every position of the first
    layer's grid, each layer's 3x3 patch (zero padded, flattened channel-major) is average-pooled
    to ``layer_width`` values, the finer grid reached by bilinear interpolation, and the layers'
    ``len(layers) * layer_width`` values are average-pooled to ``channels``; so every layer gets an
    equal share of the targets, whatever its channel count.

    Every step of that is linear, so each layer's part is one fixed 3x3 convolution (the two
    poolings composed), computed on the layer's own grid and interpolated after: the same
    numbers without materializing the 9 x C values per position. ``forward(maps)`` takes the
    layers' (B, C_l, H_l, W_l) maps in ``layer_channels`` order and returns float32 targets on
    ``grid`` x ``grid`` (bilinear, when the first layer's grid differs from the PDN's).
    """

    def __init__(self, layer_channels: list[int], grid: int, channels: int = FEATURE_CHANNELS,
                 layer_width: int = LAYER_WIDTH):
        super().__init__()
        self.grid = grid
        to_targets = pooling_matrix(len(layer_channels) * layer_width, channels)
        for index, depth in enumerate(layer_channels):
            share = to_targets[:, index * layer_width:(index + 1) * layer_width]
            kernel = (share @ pooling_matrix(depth * 9, layer_width)).reshape(channels, depth, 3, 3)
            self.register_buffer(f"kernel{index}", kernel, persistent=False)
        self.layers = len(layer_channels)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        if len(maps) != self.layers:
            raise ValueError(f"expected {self.layers} feature maps, got {len(maps)}")
        size = maps[0].shape[-2:]
        targets = None
        for index, layer in enumerate(maps):
            part = F.conv2d(layer.float(), getattr(self, f"kernel{index}"), padding=1)
            if part.shape[-2:] != size:
                part = F.interpolate(part, size=size, mode="bilinear", align_corners=False)
            targets = part if targets is None else targets + part
        if size != (self.grid, self.grid):
            targets = F.interpolate(targets, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        return targets
