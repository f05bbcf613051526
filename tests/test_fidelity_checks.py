"""Checks that keep a run faithful to the papers' protocol: bad masks found before training, broken
maps named, binned pixel metrics exact on heavy tails, the published rows found, merges that rank
only on comparable validation values."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.progress import Progress
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from effad_hpc.config import load_config
from effad_hpc.data import load_category
from effad_hpc.data.mvtec import check_ground_truth, read_category
from effad_hpc.errors import DataError, TrainingError
from effad_hpc.evaluation import evaluate_category
from effad_hpc.evaluation.evaluate import fit_thresholds, predict_test
from effad_hpc.evaluation.metrics import QUANTILE_SAMPLE_PER_BIN, PixelCurves, Region, sample_pixels
from effad_hpc.leaderboard import build_leaderboard, published_values
from effad_hpc.models import AnomalyDetector, build_model
from effad_hpc.training import load_detector, stage_dir, train

from tests.conftest import REPO, tiny_config
from tests.test_evaluation import exact_au_pro, exact_au_spro

# --- a. LOCO pixel values outside defects_config.json: found before any training --------------


@pytest.fixture
def loco_without_value_255(synthetic_loco, tmp_path) -> Path:
    """A copy of a LOCO category whose defects_config.json no longer lists pixel value 255."""
    root = tmp_path / "loco"
    shutil.copytree(synthetic_loco / "parts_tray", root / "parts_tray")
    config_path = root / "parts_tray" / "defects_config.json"
    entries = json.loads(config_path.read_text())
    config_path.write_text(json.dumps([e for e in entries if e["pixel_value"] != 255]))
    return root


def test_unlisted_loco_pixel_value_stops_train_and_evaluation_before_their_work(loco_without_value_255, tmp_path):
    data = read_category(loco_without_value_255 / "parts_tray", "mvtec_loco")  # indexing reads no pixel
    with pytest.raises(DataError, match=r"\.png: pixel value 255 is not listed in .*defects_config.json"):
        check_ground_truth(data)
    config = tiny_config(loco_without_value_255, tmp_path / "run", {"data.layout": "mvtec_loco"})
    with pytest.raises(DataError, match="pixel value 255 is not listed"):
        train(config, "patchcore", "parts_tray", show_progress=False)
    assert not stage_dir(config, "parts_tray", "patchcore").exists()  # nothing was trained
    # evaluation checks before it loads a model (here there is none: that would be a CheckpointError)
    with pytest.raises(DataError, match="pixel value 255 is not listed"):
        evaluate_category(config, "patchcore", "parts_tray", show_progress=False)


def test_check_ground_truth_returns_loco_images_without_annotated_pixels(synthetic_loco, tmp_path):
    root = tmp_path / "parts_tray"
    shutil.copytree(synthetic_loco / "parts_tray", root)
    data = read_category(root, "mvtec_loco")
    assert check_ground_truth(data) == []
    blank = next(s for s in data.samples("test") if s.label)
    for mask in blank.mask_paths:
        Image.fromarray(np.zeros(np.asarray(Image.open(mask)).shape, dtype=np.uint8)).save(mask)
    assert check_ground_truth(data) == [blank]


# --- b. NaN / infinite anomaly maps are a named error ---------------------------------------------


def test_nan_maps_of_a_trained_padim_name_model_category_and_image(synthetic_ad, tmp_path):
    config = tiny_config(synthetic_ad, tmp_path / "run", {"padim.dims": 20, "padim.feature_source": "on_the_fly",
                                                         "padim.layers": ["blocks.1", "blocks.3"]})
    train(config, "padim", "fabric", show_progress=False)
    detector = load_detector(config, "padim", "fabric", torch.device("cpu"))
    detector.model.mean[0, 0] = float("nan")  # one Gaussian broken: a NaN patch in every map
    data = load_category(config, "fabric")
    first = data.samples("validation")[0]
    with Progress(disable=True) as progress, \
            pytest.raises(TrainingError, match=rf"^model padim, category fabric, image {re.escape(str(first.path))}: "
                                               r"anomaly map has NaN/inf values \(\d+ of \d+ pixels"):
        fit_thresholds(detector, data.samples("validation"), config, "padim", "fabric", torch.device("cpu"), progress)
    with Progress(disable=True) as progress, pytest.raises(TrainingError, match="model padim, category fabric"):
        predict_test(detector, data.samples("test"), config, "padim", "fabric", torch.device("cpu"), progress)


def test_efficientad_with_equal_map_quantiles_is_a_named_error(synthetic_ad, tmp_path):
    config = tiny_config(synthetic_ad, tmp_path / "run")
    model = build_model("efficientad_s", image_size=256)
    model.map_quantiles[:] = torch.tensor([[0.5, 0.5], [0.5, 0.5]])  # q_a == q_b: 0.1 * (m - q_a) / 0
    detector = AnomalyDetector(model, image_size=256)
    validation = load_category(config, "fabric").samples("validation")
    with Progress(disable=True) as progress, \
            pytest.raises(TrainingError, match="model efficientad_s, category fabric, image .*: anomaly map has NaN"):
        fit_thresholds(detector, validation, config, "efficientad_s", "fabric", torch.device("cpu"), progress)


# --- c. binned pixel metrics on heavy-tailed maps -------------------------------------------------


def _heavy_tailed_case(seed: int, images: int = 16, size: int = 256) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Log-normal maps, doubled inside the defects, with three pixels of 1e6 per map: on an even
    grid from the lowest to the highest score every normal pixel falls into the first bin."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for index in range(images):
        mask = np.zeros((size, size), dtype=bool)
        if index % 2:
            for _ in range(rng.integers(1, 4)):
                y, x = rng.integers(0, size - 40, 2)
                height, width = rng.integers(3, 40, 2)
                mask[y:y + height, x:x + width] = True
        anomaly_map = rng.lognormal(0.0, 1.0, (size, size)) * np.where(mask, 2.0, 1.0)
        anomaly_map[tuple(rng.integers(0, size, (2, 3)))] = 1e6
        maps.append(anomaly_map.astype(np.float32))
        masks.append(mask)
    return maps, masks


@pytest.mark.parametrize("seed", [0, 1])
def test_binned_pixel_metrics_stay_exact_on_heavy_tailed_maps(seed):
    maps, masks = _heavy_tailed_case(seed)
    bins = 10_000  # evaluation.bins' default
    rng = np.random.default_rng(0)  # the pixel sample as predict_test draws it
    per_map = -(-QUANTILE_SAMPLE_PER_BIN * bins // len(maps))
    sample = np.concatenate([sample_pixels(m, per_map, rng) for m in maps])
    curves = PixelCurves(min(float(m.min()) for m in maps), max(float(m.max()) for m in maps), bins, sample)
    exact_regions = []
    for anomaly_map, mask in zip(maps, masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions = [labels == k for k in range(1, count + 1)]
        exact_regions.append([(region, float(region.sum())) for region in regions])
        curves.add(anomaly_map, [Region(region, "structural_anomalies", float(region.sum())) for region in regions],
                   good=not mask.any())
    truth = np.concatenate([m.ravel() for m in masks])
    assert curves.auroc() == pytest.approx(roc_auc_score(truth, np.concatenate([m.ravel() for m in maps])), abs=1e-3)
    for limit in (0.05, 0.3):
        assert curves.au_pro(limit) == pytest.approx(exact_au_pro(maps, masks, limit), abs=1e-3)
    good = [not m.any() for m in masks]
    assert curves.au_spro(0.05) == pytest.approx(exact_au_spro(maps, exact_regions, good, 0.05), abs=1e-3)


# --- d. the shipped configs name the published data sets -----------------------------------------


@pytest.mark.parametrize("name, dataset", [("mvtec_ad.yaml", "mvtec_ad"), ("mvtec_loco.yaml", "mvtec_loco")])
def test_shipped_configs_name_a_published_dataset(name, dataset):
    config = load_config(REPO / "configs" / name)
    assert config.data.name == dataset
    assert dataset in {value.dataset for value in published_values()}


# --- f. --merge best ranks only on validation losses of one stage kind ---------------------------


def _metrics(run: Path, model: str, created: str, training: dict, image_auroc: float) -> None:
    path = run / model / "results" / "bottle" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "schema_version": 1, "key": "k", "model": model, "category": "bottle", "dataset": "mvtec_ad",
        "layout": "mvtec_ad", "run_name": run.name, "created_at": created, "metrics": {"image_auroc": image_auroc},
        "training": {stage: {"stage": stage, "best_validation": value} for stage, value in training.items()},
    }))


def _kept(board, model: str) -> dict:
    return next(row for row in board.rows if row["model"] == model)


def test_merge_best_ranks_losses_and_falls_back_to_latest_for_baseline_scores(tmp_path):
    older, newer = tmp_path / "older", tmp_path / "newer"
    # PaDiM's stage value is a mean validation score: the older run's lower one means nothing
    _metrics(older, "padim", "2026-01-01T00:00:00+00:00", {"padim": 1.0}, 0.8)
    _metrics(newer, "padim", "2026-02-01T00:00:00+00:00", {"padim": 50.0}, 0.9)
    # EfficientAD-S's final stage reports a validation loss: the lower one is kept
    _metrics(older, "efficientad_s", "2026-01-01T00:00:00+00:00", {"distill_s": 0.0, "efficientad_s": 0.2}, 0.7)
    _metrics(newer, "efficientad_s", "2026-02-01T00:00:00+00:00", {"distill_s": 0.0, "efficientad_s": 0.4}, 0.9)
    # a NaN loss (no validation) cannot rank either
    _metrics(older, "efficientad_m", "2026-01-01T00:00:00+00:00", {"efficientad_m": float("nan")}, 0.7)
    _metrics(newer, "efficientad_m", "2026-02-01T00:00:00+00:00", {"efficientad_m": 0.4}, 0.9)
    board = build_leaderboard([older, newer], "best")
    assert _kept(board, "padim")["run_id"] == "newer"
    assert _kept(board, "efficientad_s")["run_id"] == "older"
    assert _kept(board, "efficientad_m")["run_id"] == "newer"
    notes = {note.split(":")[0]: note for note in board.merged}
    assert notes["mvtec_ad/padim/paper/bottle"].endswith(
        "(rule: best; fell back to latest: the final stage padim reports no validation loss)")
    assert notes["mvtec_ad/efficientad_s/paper/bottle"].endswith("(rule: best)")
    assert "fell back to latest: a validation loss of efficientad_m is missing or not finite" in \
        notes["mvtec_ad/efficientad_m/paper/bottle"]


def test_merge_best_does_not_compare_different_final_stages(tmp_path):
    older, newer = tmp_path / "older", tmp_path / "newer"
    _metrics(older, "efficientad_ast", "2026-01-01T00:00:00+00:00", {"teacher": 0.1, "student": 0.1}, 0.7)
    _metrics(newer, "efficientad_ast", "2026-02-01T00:00:00+00:00", {"teacher": 0.1, "student_ae": 0.3}, 0.9)
    board = build_leaderboard([older, newer], "best")
    assert _kept(board, "efficientad_ast")["run_id"] == "newer"
    assert "fell back to latest: their final stages differ (student, student_ae)" in board.merged[0]
