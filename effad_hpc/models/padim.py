"""PaDiM (Defard et al., ICPR 2021): a Gaussian of normal features at every position.

The input is the mid-level layers upsampled to the finest grid and concatenated
(:func:`effad_hpc.models.feature_maps.upsample_concat`). A seeded random subset of ``dims``
channels is kept; at every position the mean and the covariance of the training features are
estimated, the covariance regularized with ``regularization * I`` (so it is invertible even
with fewer images than channels), and the anomaly map is the Mahalanobis distance.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from effad_hpc.models.base import AnomalyModel
from effad_hpc.models.registry import register_model


POSITION_CHUNK = 64
"""Positions whose (dims x dims) blocks are updated or inverted at once."""


class PaDiM(AnomalyModel):
    def __init__(self, in_channels: int, map_size: tuple[int, int], dims: int = 100, seed: int = 0,
                 smoothing_sigma: float = 4.0):
        super().__init__()
        self.smoothing_sigma = smoothing_sigma  # of the map upsampled to the image, in its pixels
        dims = min(dims, in_channels)
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("channel_index", torch.randperm(in_channels, generator=generator)[:dims].sort().values)
        positions = map_size[0] * map_size[1]
        self.register_buffer("mean", torch.zeros(positions, dims))
        self.register_buffer("precision", torch.eye(dims).repeat(positions, 1, 1))

    def _positions(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h * w, dims): the kept channels at every position."""
        return features.float()[:, self.channel_index].flatten(2).transpose(1, 2)

    @classmethod
    def fit(cls, batches: Iterable[torch.Tensor], dims: int = 100, regularization: float = 0.01,
            seed: int = 0, position_chunk: int = POSITION_CHUNK) -> PaDiM:
        """One streaming pass; the sums are taken around the first batch's mean (a shift that keeps
        float32 accurate). The outer products are summed into the model's own precision buffer
        and inverted there, ``position_chunk`` positions at a time, so the fit needs the model's
        size plus a chunk (at paper sizes, 4096 positions x 550^2: 5 GB, where a covariance, its
        inverse and a batch's outer products side by side needed 15-20 GB)."""
        model, shift, total, count = None, None, None, 0
        for batch in batches:
            if model is None:
                model = cls(batch.shape[1], tuple(batch.shape[-2:]), dims, seed).to(batch.device)
                model.precision.zero_()  # the sum of outer products until the fit ends
            x = model._positions(batch)
            if shift is None:
                shift = x.mean(0)
                total = torch.zeros_like(shift)
            centred = (x - shift).transpose(0, 1)  # (positions, B, dims)
            total += centred.sum(1)
            for lo in range(0, centred.shape[0], position_chunk):
                part = centred[lo:lo + position_chunk]
                model.precision[lo:lo + position_chunk].baddbmm_(part.transpose(1, 2), part)
            count += len(x)
        if model is None:
            raise ValueError("PaDiM.fit: no training features")
        mean_shift = total / count
        identity = torch.eye(model.precision.shape[-1], device=model.precision.device)
        for lo in range(0, model.precision.shape[0], position_chunk):
            outer, shifted = model.precision[lo:lo + position_chunk], mean_shift[lo:lo + position_chunk]
            covariance = (outer - count * shifted[:, :, None] * shifted[:, None, :]) / max(count - 1, 1)
            covariance += regularization * identity
            outer.copy_(torch.cholesky_inverse(torch.linalg.cholesky(covariance)))
        model.mean.copy_(shift + mean_shift)
        return model

    def maps(self, features: torch.Tensor, teacher_outputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        delta = self._positions(features) - self.mean
        with torch.autocast(features.device.type, enabled=False):  # a quadratic form: float32 throughout
            squared = torch.einsum("bpi,pij,bpj->bp", delta, self.precision, delta).clamp_min(0)
        return {"combined": squared.sqrt().reshape(len(features), *features.shape[-2:])}


@register_model("padim")
def padim(in_channels: int, map_size: tuple[int, int], dims: int = 100, seed: int = 0,
          smoothing_sigma: float = 4.0) -> PaDiM:
    return PaDiM(in_channels, map_size, dims, seed, smoothing_sigma)
