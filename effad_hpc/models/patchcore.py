"""PatchCore (Roth et al., CVPR 2022): a memory bank of normal patch features.

The input is :func:`effad_hpc.models.feature_maps.patch_features` (3x3-aggregated mid-level
layers on the finest grid). :meth:`PatchCore.fit` keeps a greedy coreset of the training
patches; a patch's anomaly score is its distance to the nearest bank vector, and the image
score is the largest patch score reweighted by how isolated its nearest bank vector is among
that vector's own neighbours (the paper's equation 7).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.nn import functional as F

from effad_hpc.models.coreset import greedy_coreset
from effad_hpc.models.knn import nearest_neighbours
from effad_hpc.models.base import AnomalyModel
from effad_hpc.models.registry import register_model


def _flat(features: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B * h * w, C)."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


class PatchCore(AnomalyModel):
    def __init__(self, channels: int, bank_size: int, num_neighbors: int = 9, smoothing_sigma: float = 4.0):
        super().__init__()
        self.num_neighbors = min(num_neighbors, bank_size)  # a tiny bank has fewer neighbours to offer
        self.smoothing_sigma = smoothing_sigma  # of the map upsampled to the image, in its pixels
        self.register_buffer("bank", torch.zeros(bank_size, channels))

    @classmethod
    def fit(cls, batches: Iterable[torch.Tensor], coreset_ratio: float = 0.1, projection_dim: int | None = 128,
            num_neighbors: int = 9, seed: int = 0) -> PatchCore:
        """Bank = greedy coreset (``coreset_ratio`` of the patches, at least one) of every training patch."""
        patches = torch.cat([_flat(batch.float()).cpu() for batch in batches])
        k = max(1, round(coreset_ratio * len(patches)))
        keep = greedy_coreset(patches, k, projection_dim=projection_dim, seed=seed)
        model = cls(patches.shape[1], k, num_neighbors)
        model.bank.copy_(patches[keep])
        return model

    def maps(self, features: torch.Tensor, teacher_outputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        batch, _, height, width = features.shape
        distances, _ = nearest_neighbours(_flat(features.float()), self.bank)
        return {"combined": distances[:, 0].reshape(batch, height, width)}

    def image_scores(self, features: torch.Tensor, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        """s = (1 - softmax(distances of the worst patch to N_b(m*)) at m*) * s*, where m* is the
        worst patch's nearest bank vector and N_b(m*) its ``num_neighbors`` nearest bank vectors (m* first)."""
        worst_score, worst = maps["combined"].flatten(1).max(dim=1)
        if self.num_neighbors == 1:  # one neighbour: softmax 1, weight 0; the paper's s* is all there is
            return worst_score
        queries = features.float().flatten(2)[torch.arange(len(features), device=worst.device), :, worst]  # (B, C)
        _, nearest = nearest_neighbours(queries, self.bank, 1)
        _, support = nearest_neighbours(self.bank[nearest[:, 0]], self.bank, self.num_neighbors)
        distances = (queries[:, None] - self.bank[support]).norm(dim=-1)  # (B, num_neighbors)
        weights = 1 - F.softmax(distances, dim=1)[:, 0]
        return weights * worst_score


@register_model("patchcore")
def patchcore(channels: int, bank_size: int, num_neighbors: int = 9, smoothing_sigma: float = 4.0) -> PatchCore:
    return PatchCore(channels, bank_size, num_neighbors, smoothing_sigma)
