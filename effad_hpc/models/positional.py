"""2-D sine/cosine positional encoding (as in CFLOW-AD), used by AST to make features position-aware."""

from __future__ import annotations

import math

import torch


def positional_encoding_2d(channels: int, height: int, width: int) -> torch.Tensor:
    """A (channels, height, width) encoding: the first half of the channels encodes the column,
    the second half the row, each as interleaved sines and cosines of geometric frequencies."""
    if channels % 4:
        raise ValueError(f"positional encoding needs a multiple of 4 channels, got {channels}")
    if channels == 0:  # no encoding: a position-free model appends nothing
        return torch.zeros(0, height, width)
    half = channels // 2
    frequencies = torch.exp(torch.arange(0, half, 2, dtype=torch.float32) * (-math.log(10000.0) / half))
    columns = torch.arange(width, dtype=torch.float32)[:, None] * frequencies  # (W, half/2)
    rows = torch.arange(height, dtype=torch.float32)[:, None] * frequencies  # (H, half/2)
    encoding = torch.zeros(channels, height, width)
    encoding[0:half:2] = torch.sin(columns).T[:, None, :].expand(-1, height, -1)
    encoding[1:half:2] = torch.cos(columns).T[:, None, :].expand(-1, height, -1)
    encoding[half::2] = torch.sin(rows).T[:, :, None].expand(-1, -1, width)
    encoding[half + 1::2] = torch.cos(rows).T[:, :, None].expand(-1, -1, width)
    return encoding
