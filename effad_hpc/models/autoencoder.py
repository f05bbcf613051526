"""The autoencoders of the EfficientAD family: EfficientAD's on images (SPEC section 1) and
EfficientAD-AST's on feature maps (SPEC section 3).

EfficientAD-AST's encoder keeps the grid (k3, s1, p1) and narrows the channels; the decoder upsamples by
nearest x2 steps and pools back to the feature grid, so it can reconstruct the teacher's output
at every position from a 64-channel code.

Two of its steps are linear maps that cost more as written than they need to, so they are computed
in an equal form (tests compare both): a 3x3 convolution of a nearest-upsampled map is a transposed
convolution of the map itself (4 instead of 9 multiply-adds per output pixel and channel pair), and
the final 3x3 convolution followed by average pooling by f is one convolution of stride f
((f + 2)^2 instead of 9 f^2 per pooled pixel and channel pair: 36 against 144 for f = 4).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

ENCODER_CHANNELS = (32, 32, 64, 64, 64, 64)


def _spread(kernel: torch.Tensor, factor: int) -> torch.Tensor:
    """(O, I, 3, 3) -> (O, I, 3 + factor - 1, ...): the sum of the kernel shifted to every offset
    of a factor x factor window (its full convolution with a box of ones)."""
    out_channels, in_channels = kernel.shape[:2]
    box = kernel.new_ones(1, 1, factor, factor)
    spread = F.conv2d(kernel.reshape(out_channels * in_channels, 1, 3, 3), box, padding=factor - 1)
    return spread.reshape(out_channels, in_channels, factor + 2, factor + 2)


class UpsampledConv2d(nn.Conv2d):
    """``Conv2d(k=3, padding=1)`` applied to the input upsampled by nearest x2, computed without
    the upsampled map: as a transposed convolution of stride 2 whose 4 x 4 kernel holds, for each
    of the 2 x 2 output phases, the sums of the 3 x 3 weights that read the same input pixel."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The transposed convolution adds input pixel i into outputs 2i - 1 .. 2i + 2, in the
        # reverse order of the spread kernel's taps, and wants (in, out, ...) weights.
        kernel = _spread(self.weight, 2).flip(2, 3).transpose(0, 1)
        return F.conv_transpose2d(x, kernel, self.bias, stride=2, padding=1)


class PooledConv2d(nn.Conv2d):
    """``Conv2d(k=3, padding=1)`` followed by ``factor`` x ``factor`` average pooling, computed as one
    convolution of stride ``factor`` whose kernel is the 3 x 3 kernel averaged over the pooling window."""

    def __init__(self, in_channels: int, out_channels: int, factor: int):
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = _spread(self.weight, self.factor) / self.factor ** 2
        return F.conv2d(x, kernel, self.bias, stride=self.factor, padding=1)


class FeatureAutoencoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, channels: int = 64, upsampling_stages: int = 2,
                 dropout: float = 0.2):
        super().__init__()
        widths = (*ENCODER_CHANNELS[:-1], channels)
        layers: list[nn.Module] = []
        for width in widths:
            layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU()]
            in_channels = width
        self.encoder = nn.Sequential(*layers)
        # The thesis's layer list, where None marks the upsampling and the pooling (computed inside
        # the next and the previous convolution): the layers keep its positions as their names, so
        # the weights keep their keys in model.pt.
        decoder: list[nn.Module | None] = [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                           nn.Dropout(dropout)]
        for _ in range(upsampling_stages):
            decoder += [None, UpsampledConv2d(channels, channels), nn.ReLU(), nn.Dropout(dropout)]
        decoder += [PooledConv2d(channels, out_channels, 2 ** upsampling_stages), None]
        self.decoder = nn.Sequential(OrderedDict((str(position), layer) for position, layer in enumerate(decoder)
                                                 if layer is not None))

    def forward(self, x):
        return self.decoder(self.encoder(x))


# EfficientAD's decoder upsamples to these sides for a 256 px input (SPEC section 1).
IMAGE_DECODER_SIZES_AT_256 = (3, 8, 15, 32, 63, 127)


class ImageAutoencoder(nn.Module):
    """EfficientAD's autoencoder: image -> 1x1 code -> the teacher's (out_channels, output_size^2) grid.

    At 256 px this is the paper's network exactly. Other sizes (multiples of 32, for quick tests)
    scale the bottleneck kernel and the decoder's intermediate sides by ``image_size / 256``.
    """

    def __init__(self, image_size: int = 256, output_size: int = 56, out_channels: int = 384,
                 dropout: float = 0.2):
        super().__init__()
        if image_size % 32 or image_size < 64:
            raise ValueError(f"image size {image_size}: the image autoencoder needs a multiple of 32, at least 64")
        widths = (32, 32, 64, 64, 64)
        layers: list[nn.Module] = []
        in_channels = 3
        for width in widths:
            layers += [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.ReLU()]
            in_channels = width
        layers.append(nn.Conv2d(64, 64, image_size // 32))
        self.encoder = nn.Sequential(*layers)
        self.sizes = [max(1, round(side * image_size / 256)) for side in IMAGE_DECODER_SIZES_AT_256]
        self.output_size = output_size
        self.stages = nn.ModuleList(nn.Conv2d(64, 64, 4, stride=1, padding=2) for _ in self.sizes)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, out_channels, 3, padding=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.encoder(images)
        for side, conv in zip(self.sizes, self.stages):
            x = self.dropout(F.relu(conv(F.interpolate(x, size=side, mode="bilinear"))))
        return self.head(F.interpolate(x, size=self.output_size, mode="bilinear"))
