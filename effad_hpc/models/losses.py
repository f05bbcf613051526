"""Losses shared by the student-teacher models."""

from __future__ import annotations

import torch

QUANTILE_SAMPLE = 2**24
"""Elements a loss quantile is estimated from at most (a random sample of a larger tensor)."""


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile's linear interpolation of a flattened tensor, through kthvalue, which has no
    size limit (torch.quantile refuses more than 2^24 elements)."""
    flat = values.flatten()
    position = q * (flat.numel() - 1)
    below = flat.kthvalue(int(position) + 1).values
    above = flat.kthvalue(min(int(position) + 2, flat.numel())).values
    return below + (position - int(position)) * (above - below)


def hard_mse(target: torch.Tensor, prediction: torch.Tensor, percentile: float = 1.0,
             max_elements: int = QUANTILE_SAMPLE) -> torch.Tensor:
    """Mean squared error over the elements whose error is at least its ``percentile`` quantile.

    1.0 averages every element (the thesis's choice); 0.999 is EfficientAD's hard feature loss.
    Above ``max_elements`` the quantile is estimated on a random sample of that many elements
    (global RNG), which bounds its time and memory.
    """
    squared = (target - prediction).pow(2)
    if percentile >= 1.0:
        return squared.mean()
    flat = squared.flatten()
    sample = flat.detach()
    if sample.numel() > max_elements:
        sample = sample[torch.randint(sample.numel(), (max_elements,), device=sample.device)]
    return flat[flat >= quantile(sample, percentile)].mean()
