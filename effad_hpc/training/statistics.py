"""Statistics of feature maps over a stage's data, in one streaming pass."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from effad_hpc.errors import DataError


def channel_statistics(maps: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std, each (1, C, 1, 1), of (B, C, h, w) maps over every batch and
    position: one streaming pass with float64 sums, so memory does not grow with the data."""
    total = squares = None
    cells = 0
    for batch in maps:
        batch = batch.double()
        sums, sums_of_squares = batch.sum((0, 2, 3)), batch.pow(2).sum((0, 2, 3))
        total = sums if total is None else total + sums
        squares = sums_of_squares if squares is None else squares + sums_of_squares
        cells += batch.shape[0] * batch.shape[2] * batch.shape[3]
    if total is None:
        raise DataError("no images to compute channel statistics on")
    mean = total / cells
    std = (squares / cells - mean.pow(2)).clamp_min(1e-12).sqrt()
    return mean.float()[None, :, None, None], std.float()[None, :, None, None]
