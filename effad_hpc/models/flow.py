"""The AST teacher: a conditional normalizing flow over feature maps, built with FrEIA.

Each block is a fixed random channel permutation followed by a GLOW-style affine coupling (both
halves transformed in turn). Coupling subnets are conv(k) -> ReLU -> conv(k); the multiplicative
part is soft-clamped as ``clamp * 0.636 * atan(s / clamp)``; the 2-D positional encoding is the
condition of every coupling (a condition of 0 channels makes the flow position-free).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from FrEIA.framework import SequenceINN
from FrEIA.modules import GLOWCouplingBlock, PermuteRandom
from torch import nn


class SoftClamp:
    """FrEIA scales the activation by ``clamp`` itself: clamp * 0.636 * atan(s / clamp) overall."""

    def __init__(self, clamp: float):
        self.clamp = clamp

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        return 0.636 * torch.atan(s / self.clamp)


class CouplingSubnet(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, kernel_size: int):
        padding = kernel_size // 2
        super().__init__(
            nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=padding),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=padding),
        )
        # Glow's initialisation: every coupling starts as the identity, which keeps the first
        # steps of a deep flow stable.
        nn.init.zeros_(self[-1].weight)
        nn.init.zeros_(self[-1].bias)


class FlowTeacher(nn.Module):
    """``forward(features, condition) -> (z, log|det J|)`` with z shaped like the features and
    one log-determinant per sample (summed over channels and positions)."""

    def __init__(self, channels: int, condition_channels: int, map_size: int, coupling_blocks: int = 4,
                 hidden_channels: int = 1024, kernel_sizes: Sequence[int] = (3, 3, 3, 5), clamp: float = 3.0):
        super().__init__()
        if len(kernel_sizes) != coupling_blocks:
            raise ValueError(f"{coupling_blocks} coupling blocks need as many kernel sizes, got {list(kernel_sizes)}")
        self.channels = channels
        self.flow = SequenceINN(channels, map_size, map_size)
        # PermuteRandom draws from numpy's global generator after seeding it; keep that
        # generator as the caller left it.
        numpy_state = np.random.get_state()
        try:
            for block, kernel_size in enumerate(kernel_sizes):
                self.flow.append(PermuteRandom, seed=block)
                self.flow.append(
                    GLOWCouplingBlock, cond=0, cond_shape=(condition_channels, map_size, map_size), clamp=clamp,
                    clamp_activation=SoftClamp(clamp),
                    subnet_constructor=lambda c_in, c_out, k=kernel_size: CouplingSubnet(c_in, c_out,
                                                                                         hidden_channels, k))
        finally:
            np.random.set_state(numpy_state)

    def forward(self, features: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, log_det = self.flow(features, c=[condition])
        return z, log_det

    def inverse(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        features, _ = self.flow(z, c=[condition], rev=True)
        return features


def negative_log_likelihood(z: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
    """Mean NLL per dimension under a standard normal: (0.5 * sum z^2 - log|det J|) / dims."""
    dims = z[0].numel()
    return (0.5 * z.pow(2).flatten(1).sum(1) - log_det).mean() / dims
