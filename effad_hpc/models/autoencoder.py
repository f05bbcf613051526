"""The autoencoders of the EfficientAD family: EfficientAD's on images (SPEC section 1) and
EfficientAD-AST's on feature maps (SPEC section 3).

EfficientAD-AST's encoder keeps the grid (k3, s1, p1) and narrows the channels; the decoder upsamples by
nearest x2 steps and pools back to the feature grid, so it can reconstruct the teacher's output
at every position from a 64-channel code.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

ENCODER_CHANNELS = (32, 32, 64, 64, 64, 64)


class FeatureAutoencoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, map_size: int, channels: int = 64,
                 upsampling_stages: int = 2, dropout: float = 0.2):
        super().__init__()
        widths = (*ENCODER_CHANNELS[:-1], channels)
        layers: list[nn.Module] = []
        for width in widths:
            layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU()]
            in_channels = width
        self.encoder = nn.Sequential(*layers)
        decoder: list[nn.Module] = [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Dropout(dropout)]
        for _ in range(upsampling_stages):
            decoder += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, channels, 3, padding=1),
                        nn.ReLU(), nn.Dropout(dropout)]
        decoder += [nn.Conv2d(channels, out_channels, 3, padding=1), nn.AdaptiveAvgPool2d(map_size)]
        self.decoder = nn.Sequential(*decoder)

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
