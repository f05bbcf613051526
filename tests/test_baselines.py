"""PatchCore, PaDiM and SPADE: the nearest-neighbour search, each model's statistics against an
independent computation, and real fits on a synthetic category that separate defects."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from effad_hpc.errors import ConfigError
from effad_hpc.evaluation import evaluate_category
from effad_hpc.models import PaDiM, PatchCore, SPADE
from effad_hpc.models.knn import nearest_neighbours
from effad_hpc.training import stage_dir, train
from effad_hpc.training.artifacts import BEST_MODEL

from tests.conftest import tiny_config


def test_chunked_nearest_neighbours_equal_the_full_distance_matrix():
    generator = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(50, 6, generator=generator), torch.randn(37, 6, generator=generator)
    distances, indices = nearest_neighbours(queries, bank, k=3, query_chunk=7, bank_chunk=5)
    full = torch.cdist(queries, bank).topk(3, dim=1, largest=False)
    assert torch.equal(indices, full.indices)
    assert torch.allclose(distances, full.values, atol=1e-5)
    with pytest.raises(ValueError, match="4 neighbours"):
        nearest_neighbours(queries, bank[:3], k=4)


def test_patchcore_scores_are_nearest_bank_distances_with_the_papers_reweighting():
    generator = torch.Generator().manual_seed(1)
    train_features = torch.randn(3, 5, 4, 4, generator=generator)
    model = PatchCore.fit([train_features[:2], train_features[2:]], coreset_ratio=0.5, projection_dim=None,
                          num_neighbors=3)
    assert model.bank.shape == (24, 5)  # half of the 3 * 16 patches
    bank_rows = {tuple(row.tolist()) for row in model.bank}
    assert bank_rows <= {tuple(row.tolist()) for row in train_features.permute(0, 2, 3, 1).reshape(-1, 5)}

    test = torch.randn(2, 5, 4, 4, generator=generator)
    maps = model.maps(test)
    patches = test.permute(0, 2, 3, 1).reshape(2, 16, 5)
    expected_map = torch.cdist(patches, model.bank[None]).amin(-1).reshape(2, 4, 4)
    assert torch.allclose(maps["combined"], expected_map, atol=1e-5)

    scores = model.image_scores(test, maps)
    for image in range(2):
        worst = expected_map[image].flatten().argmax()
        query = patches[image, worst]
        nearest = torch.cdist(query[None], model.bank)[0].argmin()
        support = torch.cdist(model.bank[nearest][None], model.bank)[0].topk(3, largest=False).indices
        d = torch.cdist(query[None], model.bank[support])[0]
        weight = 1 - torch.exp(d[0]) / torch.exp(d).sum()
        assert scores[image].item() == pytest.approx((weight * expected_map[image].max()).item(), rel=1e-4)

    # With one neighbour (or a one-vector bank) there is nothing to reweight with: the score is s*.
    single = PatchCore.fit([train_features], coreset_ratio=0.01, projection_dim=None, num_neighbors=9)
    assert single.bank.shape == (1, 5) and single.num_neighbors == 1
    single_maps = single.maps(test)
    assert torch.equal(single.image_scores(test, single_maps), single_maps["combined"].flatten(1).amax(1))


def test_padim_covariance_is_invertible_with_fewer_images_than_channels():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(3, 32, 4, 4, generator=generator)  # 3 images, 20 of 32 channels kept
    model = PaDiM.fit([features[:1], features[1:]], dims=20, regularization=0.01, seed=0)
    assert model.channel_index.shape == (20,) and torch.isfinite(model.precision).all()
    x = features[:, model.channel_index].flatten(2).permute(2, 0, 1).double()  # (positions, images, dims)
    for position in (0, 7, 15):
        covariance = np.cov(x[position].numpy(), rowvar=False) + 0.01 * np.eye(20)
        assert np.allclose(model.precision[position].double().numpy() @ covariance, np.eye(20), atol=1e-3)
        assert torch.allclose(model.mean[position].double(), x[position].mean(0), atol=1e-5)
    probe = torch.zeros(1, 32, 4, 4)
    probe[0, model.channel_index] = model.mean.T.reshape(20, 4, 4)  # the mean at every position
    assert model.maps(probe)["combined"].abs().max() < 1e-3


def test_spade_compares_pixels_with_the_nearest_training_images():
    generator = torch.Generator().manual_seed(3)
    gallery = torch.randn(6, 4, 3, 3, generator=generator)
    model = SPADE.fit([gallery], image_neighbors=2, gallery_dtype=torch.float32)  # the exact algorithm
    assert model.maps(gallery[:2])["combined"].abs().max() < 1e-3  # each is its own nearest image
    test = torch.randn(1, 4, 3, 3, generator=generator)
    global_distances = torch.cdist(test.mean((2, 3)), gallery.mean((2, 3)))[0]
    nearest = global_distances.topk(2, largest=False)
    assert model.image_scores(test, {}).item() == pytest.approx(nearest.values.mean().item(), rel=1e-4)
    pixels = gallery[nearest.indices].permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.cdist(test[0].flatten(1).T, pixels).amin(1).reshape(3, 3)
    assert torch.allclose(model.maps(test)["combined"][0], expected, atol=1e-4)

    # With a global layer (the paper's image-level feature): images are found by its pooled channels.
    image_level = torch.randn(6, 7, 1, 1, generator=generator)
    inputs = torch.cat([gallery, image_level.expand(-1, -1, 3, 3)], dim=1)
    model = SPADE.fit([inputs[:4], inputs[4:]], image_neighbors=2, global_channels=7, gallery_dtype=torch.float32)
    assert model.gallery.shape == (6, 4, 3, 3) and torch.allclose(model.global_features, image_level[:, :, 0, 0])
    test_level = torch.randn(1, 7, 1, 1, generator=generator)
    test_inputs = torch.cat([test, test_level.expand(-1, -1, 3, 3)], dim=1)
    nearest = torch.cdist(test_level[:, :, 0, 0], image_level[:, :, 0, 0])[0].topk(2, largest=False)
    assert model.image_scores(test_inputs, {}).item() == pytest.approx(nearest.values.mean().item(), rel=1e-4)
    pixels = gallery[nearest.indices].permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.cdist(test[0].flatten(1).T, pixels).amin(1).reshape(3, 3)
    assert torch.allclose(model.maps(test_inputs)["combined"][0], expected, atol=1e-4)
    with pytest.raises(ValueError, match=r"expects 11 input channels \(4 pyramid \+ 7 global\), got 4"):
        model.maps(test)


def test_pyramid_with_global_is_the_finest_pyramid_and_the_last_layers_average_pool():
    from effad_hpc.models.feature_maps import pyramid_with_global, upsample_concat

    generator = torch.Generator().manual_seed(5)
    layers = {"fine": torch.randn(2, 3, 8, 8, generator=generator), "mid": torch.randn(2, 5, 4, 4, generator=generator),
              "last": torch.randn(2, 6, 2, 2, generator=generator)}
    out = pyramid_with_global(layers, ["fine", "mid", "last"])
    assert out.shape == (2, 3 + 5 + 6, 8, 8)
    assert torch.equal(out[:, :8], upsample_concat(layers, ["fine", "mid"]))
    pooled = torch.nn.functional.adaptive_avg_pool2d(layers["last"], 1)
    assert torch.allclose(out[:, 8:], pooled.expand(-1, -1, 8, 8))


BASELINES = {
    "patchcore": {"patchcore.coreset_ratio": 0.25},  # stored features (the default source)
    "padim": {"padim.dims": 60, "padim.feature_source": "on_the_fly", "padim.layers": ["blocks.1", "blocks.3"]},
    "spade": {"spade.image_neighbors": 5, "spade.feature_source": "on_the_fly"},
    "spade:global_layer": {"spade.image_neighbors": 5, "spade.feature_source": "on_the_fly",
                           "spade.layers": ["blocks.2", "blocks.3"], "spade.global_layer": "blocks.6"},
}


@pytest.mark.parametrize("case", sorted(BASELINES))
def test_baseline_fits_and_separates_defects(case, synthetic_fabric, tmp_path):
    model = case.split(":")[0]
    config = tiny_config(synthetic_fabric, tmp_path / "run", {
        "data.image_size": 128, "evaluation.latency_repeats": 2, "evaluation.write_overlays": False,
        **BASELINES[case]})
    (record,) = train(config, model, "fabric", show_progress=False)
    assert record.stage == model and record.train_seconds >= 0
    state = torch.load(stage_dir(config, "fabric", model) / BEST_MODEL, weights_only=True)
    if model == "patchcore":  # 24 train images minus validation, 16 x 16 patches each, a quarter kept
        patches = 16 * 16 * 18
        assert state["bank"].shape[0] == round(0.25 * patches)
    if case == "spade:global_layer":  # Lite0 blocks.2 + blocks.3 pyramid, blocks.6 (320 channels) pooled
        assert state["gallery"].shape[1:] == (40 + 80, 16, 16) and state["global_features"].shape[1] == 320
    metrics = evaluate_category(config, model, "fabric", show_progress=False)["metrics"]
    assert metrics["image_auroc"] >= 0.9 and metrics["pixel_auroc"] >= 0.9, metrics


def test_stored_baseline_layers_must_be_in_the_store(synthetic_fabric, tmp_path):
    with pytest.raises(ConfigError, match=r"patchcore reads layers \['blocks.3'\] that are not in backbone.layers"):
        tiny_config(synthetic_fabric, tmp_path, {"patchcore.layers": ["blocks.3"]})
    with pytest.raises(ConfigError, match=r"spade reads layers \['blocks.6'\] that are not in backbone.layers"):
        tiny_config(synthetic_fabric, tmp_path, {"spade.global_layer": "blocks.6"})
    with pytest.raises(ConfigError, match="spade.global_layer 'blocks.4' is also a pyramid layer"):
        tiny_config(synthetic_fabric, tmp_path, {"spade.global_layer": "blocks.4",
                                                 "spade.feature_source": "on_the_fly"})
    with pytest.raises(ConfigError, match="padim.feature_source: on_the_fly"):
        tiny_config(synthetic_fabric, tmp_path, {"padim.image_size": 256})
    tiny_config(synthetic_fabric, tmp_path, {"padim.image_size": 256, "padim.feature_source": "on_the_fly"})


def test_baseline_maps_are_smoothed_at_image_size_with_the_papers_sigma():
    from scipy import ndimage

    from effad_hpc.models import AnomalyDetector, resize_maps

    generator = torch.Generator().manual_seed(4)
    model = PaDiM.fit([torch.randn(4, 8, 8, 8, generator=generator)], dims=8)
    assert model.smoothing_sigma == 4.0  # the paper's
    features = torch.randn(2, 8, 8, 8, generator=generator)
    detector = AnomalyDetector(model, image_size=64)
    grid = model.maps(features)
    plain = resize_maps(grid, (128, 128))["combined"]
    smoothed = detector.to_size(grid, (128, 128))["combined"]  # 128 px output: sigma 4 * 128 / 64 = 8 px
    expected = np.stack([ndimage.gaussian_filter(m.numpy().astype(np.float64), 8.0, mode="mirror", truncate=4.0)
                         for m in plain])
    assert np.allclose(smoothed.numpy(), expected, atol=1e-4)
    model.smoothing_sigma = 0.0
    assert torch.equal(detector.to_size(grid, (128, 128))["combined"], plain)
