"""Greedy coreset: exactly the greedy k-center sequence, k distinct points, better coverage than chance."""

from __future__ import annotations

import pytest
import torch

from effad_hpc.models.coreset import greedy_coreset, project
from effad_hpc.models.feature_maps import patch_features


def _clustered(n: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(40, dim, generator=generator)
    return centers[torch.randint(40, (n,), generator=generator)] + torch.randn(n, dim, generator=generator)


def _covering_radius(points: torch.Tensor, chosen: torch.Tensor) -> float:
    return float(torch.cdist(points, points[chosen]).min(dim=1).values.max())


@pytest.mark.parametrize("seed", [0, 1])
def test_coreset_is_the_naive_greedy_sequence(seed):
    features = _clustered(4000, 96, seed).half()
    chosen = greedy_coreset(features, 300, projection_dim=48, seed=seed)
    # The naive algorithm on the same projection, from the same first point.
    points = project(features, 48, torch.Generator().manual_seed(seed))
    distance = torch.full((len(points),), float("inf"))
    expected, index = [], int(chosen[0])
    for _ in range(300):
        expected.append(index)
        distance = torch.minimum(distance, (points - points[index]).norm(dim=1))
        index = int(distance.argmax())
    assert chosen.tolist() == expected


def test_coreset_returns_k_of_n_and_covers_better_than_a_random_subset():
    features = _clustered(5000, 8, 2)
    chosen = greedy_coreset(features, 250, projection_dim=None)
    assert len(chosen) == 250 and len(set(chosen.tolist())) == 250
    assert int(chosen.min()) >= 0 and int(chosen.max()) < 5000
    random_radii = [_covering_radius(features, torch.randperm(5000, generator=torch.Generator().manual_seed(s))[:250])
                    for s in range(5)]
    assert _covering_radius(features, chosen) < min(random_radii)
    with pytest.raises(ValueError, match="coreset size 0"):
        greedy_coreset(features, 0)


def test_patch_features_aggregate_neighbourhoods_onto_the_finest_grid():
    fine, coarse = torch.rand(2, 4, 8, 8), torch.rand(2, 6, 4, 4)
    patches = patch_features({"a": fine, "b": coarse}, ["a", "b"])
    assert patches.shape == (2, 10, 8, 8)
    torch.testing.assert_close(patches[0, 0, 3, 3], fine[0, 0, 2:5, 2:5].mean())
