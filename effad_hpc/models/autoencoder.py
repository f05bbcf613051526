"""EfficientAD-AST's autoencoder on feature maps (SPEC section 3).

The encoder keeps the grid (k3, s1, p1) and narrows the channels; the decoder upsamples by
nearest x2 steps and pools back to the feature grid, so it can reconstruct the teacher's output
at every position from a 64-channel code.
"""

from __future__ import annotations

from torch import nn

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
