"""The synthetic-anomaly validation set: deterministic, made from validation images only, and a
metric that tells a map that finds the anomalies from one that does not."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from effad_hpc.data.validation_anomalies import ensure_validation_anomalies
from effad_hpc.evaluation.synthetic_validation import SyntheticMaps, score_maps
from tests.conftest import tiny_config


@pytest.fixture
def category(tmp_path, synthetic_ad):
    shutil.copytree(synthetic_ad / "fabric", tmp_path / "data" / "fabric")
    return tmp_path / "data"


def _bytes(anomaly_set) -> list[bytes]:
    return [path.read_bytes() for a in anomaly_set.anomalies for path in (a.image, a.mask)]


def test_the_set_is_the_same_in_every_run_folder_and_a_rerun_skips(tmp_path, category):
    first = ensure_validation_anomalies(tiny_config(category, tmp_path / "a"), "fabric")
    second = ensure_validation_anomalies(tiny_config(category, tmp_path / "b"), "fabric")
    assert first.folder != second.folder and _bytes(first) == _bytes(second)
    times = [a.image.stat().st_mtime_ns for a in first.anomalies]
    again = ensure_validation_anomalies(tiny_config(category, tmp_path / "a"), "fabric")
    assert [a.image.stat().st_mtime_ns for a in again.anomalies] == times
    other = ensure_validation_anomalies(tiny_config(category, tmp_path / "c", {"validation_anomalies.seed": 1}),
                                        "fabric")
    assert _bytes(other) != _bytes(first)
    assert {a.kind for a in first.anomalies} == {"cut_paste", "noise_blend"}


def test_a_copy_of_the_data_with_new_file_times_draws_the_same_set(tmp_path, category):
    # A new checkout or `cp` without -p changes every file time: the cache key changes with them,
    # the anomalies must not, or each copy would validate (and choose) on another set.
    copy = tmp_path / "copy"
    shutil.copytree(category, copy, copy_function=shutil.copyfile)  # contents only: new times
    for path in (copy / "fabric").rglob("*"):
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    first = ensure_validation_anomalies(tiny_config(category, tmp_path / "a"), "fabric")
    copied = ensure_validation_anomalies(tiny_config(copy, tmp_path / "b"), "fabric")
    assert first.key != copied.key and _bytes(first) == _bytes(copied)


def test_anomalies_change_only_their_masked_pixels_of_a_validation_image(tmp_path, category):
    anomaly_set = ensure_validation_anomalies(tiny_config(category, tmp_path / "run"), "fabric")
    assert {a.source.split for a in anomaly_set.anomalies} == {"validation"}
    for anomaly in anomaly_set.anomalies:
        image = np.asarray(Image.open(anomaly.image).convert("RGB")).astype(int)
        source = np.asarray(Image.open(anomaly.source.path).convert("RGB")).astype(int)
        mask = np.asarray(Image.open(anomaly.mask))
        assert mask.shape == image.shape[:2] and set(np.unique(mask)) == {0, 255}
        inside = mask > 0
        assert 0.002 < inside.mean() < 0.15
        assert np.array_equal(image[~inside], source[~inside])
        assert np.abs(image - source)[inside].mean() > 10  # visible, not an invisible blend


def test_made_without_the_test_split_and_a_damaged_file_is_made_again(tmp_path, category):
    shutil.rmtree(category / "fabric" / "test")
    shutil.rmtree(category / "fabric" / "ground_truth")
    config = tiny_config(category, tmp_path / "run")
    anomaly_set = ensure_validation_anomalies(config, "fabric")
    expected = _bytes(anomaly_set)
    damaged = anomaly_set.anomalies[0].image
    damaged.write_bytes(damaged.read_bytes()[:100])
    assert _bytes(ensure_validation_anomalies(config, "fabric")) == expected


def test_the_score_tells_a_map_that_finds_the_anomalies_from_one_that_does_not():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 32, 32), dtype=bool)
    for index, mask in enumerate(masks):
        mask[4 * index:4 * index + 6, 10:18] = True
    clean_maps = rng.random((3, 32, 32)) * 0.5
    perfect = np.where(masks, 1.0, 0.0) + rng.random(masks.shape) * 0.1
    found = score_maps(clean_maps.max((1, 2)), perfect.max((1, 2)), clean_maps, perfect, masks, 0.3)
    assert found["val_synthetic_image_auroc"] == 1.0
    assert found["val_synthetic_pixel_auroc"] > 0.99 and found["val_synthetic_au_pro"] > 0.95
    constant = np.zeros_like(perfect)
    blind = score_maps(np.zeros(3), np.zeros(4), np.zeros_like(clean_maps), constant, masks, 0.3)
    assert blind["val_synthetic_image_auroc"] == 0.5 and blind["val_synthetic_pixel_auroc"] == pytest.approx(0.5)


def test_scores_from_features_made_once_equal_the_detectors_own_maps(tmp_path, category):
    """A sweep runs the backbone over the set once per category and scores every validation pass
    from those features: the metrics, of the combined map and of each of its parts, are those of
    the detector's full forward pass."""
    torch = pytest.importorskip("torch")
    from effad_hpc.evaluation.synthetic_validation import (
        part_metrics, scoring_inputs, synthetic_maps_of_parts, synthetic_validation_metrics)
    from effad_hpc.models import image_scores
    from effad_hpc.training import recipe
    from effad_hpc.training.detector import as_detector, model_input

    config = tiny_config(category, tmp_path / "run", {"run.precision": "fp32"})
    anomaly_set = ensure_validation_anomalies(config, "fabric")
    built = model_input(config, "efficientad_ast")
    torch.manual_seed(0)
    model = recipe("efficientad_ast").build(config, built.channels, built.map_size, None)
    detector = as_detector(config, "efficientad_ast", model, built.extractor)
    device = torch.device("cpu")
    inputs = scoring_inputs(detector, anomaly_set, config, device)
    assert inputs.clean.shape[1] == built.channels  # features, not images
    cached = synthetic_validation_metrics(detector, inputs, config, device)
    parts = part_metrics(synthetic_maps_of_parts(detector, inputs, config, device), config.evaluation.pro_fpr_limit)

    clean, anomalous, masks = anomaly_set.tensors(detector.image_size)
    outputs = [detector(images) for images in (clean, anomalous)]
    for part, found in (("combined", cached), ("st", parts), ("ae", parts), ("teacher", parts)):
        maps = [out["maps"][part].numpy() for out in outputs]
        scores = [image_scores(out["maps"][part], detector.score).numpy() for out in outputs]
        direct = score_maps(scores[0], scores[1], maps[0], maps[1], masks.numpy(), config.evaluation.pro_fpr_limit)
        suffix = "" if part == "combined" else f"_{part}"
        for name, value in direct.items():
            assert found[name + suffix] == pytest.approx(value, abs=1e-6), name + suffix
    assert len(parts) == 3 * len(cached)  # st, ae and the teacher's NLL; nothing else


@pytest.mark.parametrize("model_name", ["efficientad_ast", "ast", "efficientad_s"])
def test_a_frozen_teachers_outputs_made_once_score_as_the_teacher_does(tmp_path, category, model_name):
    """A stage that selects by the score maps the set at every validation pass; its model's
    teacher is frozen, so its outputs of the set are computed once per stage: every part's metrics
    are those of the full model, and a scorer handed another model computes them again."""
    torch = pytest.importorskip("torch")
    from effad_hpc.evaluation.synthetic_validation import (
        TrainingScorer, part_metrics, scoring_inputs, synthetic_maps_of_parts, with_teacher_outputs)
    from effad_hpc.training import recipe
    from effad_hpc.training.detector import as_detector, model_input

    config = tiny_config(category, tmp_path / "run", {"run.precision": "fp32", "efficientad.image_size": 64})
    built = model_input(config, model_name)
    device = torch.device("cpu")

    def detector_of(seed: int):
        torch.manual_seed(seed)
        model = recipe(model_name).build(config, built.channels, built.map_size, None)
        for parameter in model.parameters():  # nonzero couplings and heads: teachers that differ by seed
            if parameter.is_floating_point():
                parameter.data.add_(0.05 * torch.randn_like(parameter))
        return as_detector(config, model_name, model, built.extractor)

    def all_metrics(detector, inputs):
        sets = synthetic_maps_of_parts(detector, inputs, config, device)
        return {**sets["combined"].metrics(config.evaluation.pro_fpr_limit),
                **part_metrics(sets, config.evaluation.pro_fpr_limit)}

    first = detector_of(0)
    inputs = scoring_inputs(first, ensure_validation_anomalies(config, "fabric"), config, device)
    made_once = with_teacher_outputs(first, inputs, config, device)
    assert made_once.clean_teacher is not None and len(made_once.anomalous_teacher) == len(inputs.anomalous)
    assert all_metrics(first, made_once) == pytest.approx(all_metrics(first, inputs), abs=1e-9)

    scorer = TrainingScorer(config, model_name, device)
    kept = scorer.inputs("fabric", first)
    assert scorer.inputs("fabric", as_detector(config, model_name, first.model, built.extractor)) is kept
    second = detector_of(1)
    again = scorer.inputs("fabric", second)
    assert again is not kept and torch.equal(again.clean, kept.clean)  # the same features, another teacher
    assert torch.equal(again.clean_teacher, with_teacher_outputs(second, inputs, config, device).clean_teacher)
    assert not torch.allclose(again.clean_teacher, kept.clean_teacher)


def test_the_synthetic_f1_threshold_separates_found_anomalies_from_the_clean_tail():
    """A model whose clean images have a long tail above most defect pixels: the quantile of the
    clean pixels lands above the defects, the synthetic set's best F1 between tail and defects."""
    rng = np.random.default_rng(1)
    masks = np.zeros((4, 32, 32), dtype=bool)
    masks[:, 8:16, 8:16] = True
    clean = rng.random((3, 32, 32)) * 0.5
    clean[:, 0, :4] = 2.0  # a few very high clean pixels (a border effect)
    anomalous = np.where(masks, 1.0, 0.0) + rng.random(masks.shape) * 0.1
    found = SyntheticMaps(clean, clean.max((1, 2)), anomalous, anomalous.max((1, 2)), masks)
    assert np.quantile(clean, 0.999) > 1.1  # above every defect pixel: pixel F1 0 at that threshold
    best = found.best_pixel_f1()
    assert clean[clean < 1].max() < best.threshold <= anomalous[masks].min() and best.f1 > 0.95
