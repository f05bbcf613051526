"""The AST student: a plain convolutional network with residual blocks (no flow, hence asymmetric)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.LeakyReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.LeakyReLU(),
        )

    def forward(self, x):
        return x + self.body(x)


class ResidualStudent(nn.Sequential):
    """conv3x3 in -> hidden, LeakyReLU; ``residual_blocks`` x ResidualBlock; conv3x3 hidden -> out."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 1024, residual_blocks: int = 4):
        super().__init__(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1), nn.LeakyReLU(),
            *[ResidualBlock(hidden_channels) for _ in range(residual_blocks)],
            nn.Conv2d(hidden_channels, out_channels, 3, padding=1),
        )


@contextmanager
def unrecorded_batch_statistics(module: nn.Module) -> Iterator[None]:
    """Batch norm inside ``module`` normalizes each batch with its own statistics, as in training,
    but records none: the penalty's ImageNet-like batch must not move the running statistics
    that inference normalizes the category's features with."""
    recording = [norm for norm in module.modules()
                 if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.track_running_stats]
    for norm in recording:  # untracked, a training-mode batch norm neither reads nor updates its buffers
        norm.track_running_stats = False
    try:
        yield
    finally:
        for norm in recording:
            norm.track_running_stats = True
