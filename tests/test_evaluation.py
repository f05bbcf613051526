"""Evaluation metrics against small, exact, independent implementations, and the evaluation stage
end to end: metrics.json, maps in the official layout, masks, overlays, plots, no label leaks."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from rich.progress import Progress
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from effad_hpc.data import load_category
from effad_hpc.data.mvtec import Sample
from effad_hpc.evaluation import evaluate_category, model_dir, read_metrics, results_dir
from effad_hpc.evaluation.evaluate import fit_thresholds, predict_test
from effad_hpc.evaluation.metrics import PixelCurves, Region
from effad_hpc.training import load_detector, train

from tests.conftest import tiny_config
from tests.test_training import SMALL_NETS

# --- independent exact references (sorting every pixel; no bins) ----------------------------------


def _trapezoid_to(x, y, limit):
    x, y = list(x), list(y)
    area = 0.0
    for i in range(1, len(x)):
        if x[i - 1] >= limit:
            break
        x1, y1 = x[i], y[i]
        if x1 > limit:  # cut the segment at the limit
            y1 = y[i - 1] + (y[i] - y[i - 1]) * (limit - x[i - 1]) / (x[i] - x[i - 1])
            x1 = limit
        area += (x1 - x[i - 1]) * (y1 + y[i - 1]) / 2
    return area / limit


def exact_au_pro(maps, masks, limit=0.3):
    """The MVTec AD evaluator's procedure: 8-connected regions, every distinct score a threshold."""
    scores, ok, pro_weight, regions, ok_total = [], [], [], 0, 0
    for anomaly_map, mask in zip(maps, masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        weight = np.zeros(mask.shape)
        for k in range(1, count + 1):
            weight[labels == k] = 1.0 / np.sum(labels == k)
        regions += count
        ok_total += np.sum(labels == 0)
        scores.append(anomaly_map.ravel())
        ok.append((labels == 0).ravel())
        pro_weight.append(weight.ravel())
    scores, ok, pro_weight = map(np.concatenate, (scores, ok, pro_weight))
    order = np.argsort(-scores, kind="stable")
    scores, fpr, pro = scores[order], np.cumsum(ok[order]) / ok_total, np.cumsum(pro_weight[order]) / regions
    last_of_tie = np.append(np.diff(scores) != 0, True)
    fpr = np.concatenate([[0], np.minimum(fpr[last_of_tie], 1), [1]])
    pro = np.concatenate([[0], np.minimum(pro[last_of_tie], 1), [1]])
    return _trapezoid_to(fpr, pro, limit)


def exact_au_spro(maps, regions_per_image, good, limit):
    """Every distinct score as a threshold; FPR over the good images' pixels; each region's
    overlap min(covered / saturation, 1) from a cumulative count over the sorted pixels."""
    scores = np.concatenate([m.ravel() for m in maps])
    order = np.argsort(-scores, kind="stable")
    is_good = np.concatenate([np.full(m.size, g) for m, g in zip(maps, good)])
    fpr = np.cumsum(is_good[order]) / is_good.sum()
    spro, count, offset = np.zeros(len(scores)), 0, 0
    for anomaly_map, regions in zip(maps, regions_per_image):
        for mask, saturation in regions:
            member = np.zeros(len(scores), dtype=bool)
            member[offset:offset + anomaly_map.size] = mask.ravel()
            spro += np.minimum(np.cumsum(member[order]) / saturation, 1.0)
            count += 1
        offset += anomaly_map.size
    last_of_tie = np.append(np.diff(scores[order]) != 0, True)
    fpr = np.concatenate([[0], fpr[last_of_tie], [1]])
    spro = np.concatenate([[0], spro[last_of_tie] / count, [1]])
    return _trapezoid_to(fpr, spro, limit)


def _random_case(seed, n=6, size=24):
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for i in range(n):
        mask = np.zeros((size, size), dtype=bool)
        if i % 3:  # some good images
            for _ in range(rng.integers(1, 4)):
                y, x, h, w = rng.integers(0, size - 6, 2).tolist() + rng.integers(1, 6, 2).tolist()
                mask[y:y + h, x:x + w] = True
        anomaly_map = rng.normal(size=(size, size)) + 1.5 * mask + 0.5 * ndimage.uniform_filter(mask.astype(float), 5)
        maps.append(anomaly_map.astype(np.float32))
        masks.append(mask)
    return maps, masks


def _curves(maps, regions, good, bins=100_000):
    curves = PixelCurves(min(m.min() for m in maps), max(m.max() for m in maps), bins)
    for anomaly_map, rs, g in zip(maps, regions, good):
        curves.add(anomaly_map, rs, g)
    return curves


# --- metric correctness ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binned_au_pro_and_pixel_auroc_match_exact_computations(seed):
    maps, masks = _random_case(seed)
    regions = []
    for mask in masks:
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions.append([Region(labels == k, "defect") for k in range(1, count + 1)])
    curves = _curves(maps, regions, [not m.any() for m in masks])
    for limit in (0.05, 0.3, 1.0):
        assert curves.au_pro(limit) == pytest.approx(exact_au_pro(maps, masks, limit), abs=1e-3)
    pixels = np.concatenate([m.ravel() for m in maps])
    truth = np.concatenate([m.ravel() for m in masks])
    assert curves.auroc() == pytest.approx(roc_auc_score(truth, pixels), abs=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_binned_au_spro_matches_an_exact_computation(seed):
    maps, masks = _random_case(seed, n=6, size=16)
    rng = np.random.default_rng(seed + 10)
    regions, exact_regions = [], []
    for mask in masks:
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        mine, theirs = [], []
        for k in range(1, count + 1):
            region = labels == k
            saturation = float(rng.choice([0.5 * region.sum(), 3.0, region.sum()]))
            mine.append(Region(region, "logical_anomalies", saturation))
            theirs.append((region, saturation))
        regions.append(mine)
        exact_regions.append(theirs)
    good = [not m.any() for m in masks]
    curves = _curves(maps, regions, good)
    for limit in (0.01, 0.05, 0.1, 0.3, 1.0):
        assert curves.au_spro(limit) == pytest.approx(exact_au_spro(maps, exact_regions, good, limit), abs=1e-3)


def test_hand_computed_overlap_cases():
    rng = np.random.default_rng(0)
    background = rng.uniform(0.0, 0.5, size=(20, 20)).astype(np.float32)
    region = np.zeros((20, 20), dtype=bool)
    region[5:15, 5:15] = True  # 100 pixels

    covered = background.copy()
    covered[region] = 1.0  # fully covered at every threshold that lets any false positive in
    curves = _curves([covered, background], [[Region(region, "d")], []], [False, True], bins=10_000)
    assert curves.au_pro(0.3) == pytest.approx(1.0)

    half = background.copy()
    half[region] = -1.0  # below every background pixel: found only when the FPR is already 1
    half[5:10, 5:15] = 1.0  # 50 of the 100 region pixels score highest
    cases = {  # (saturation area in pixels, expected AU-sPRO at FPR 0.3)
        "absolute 50: half the region saturates it": (50.0, 1.0),
        "relative 0.25 (25 px)": (0.25 * 100, 1.0),
        "relative 1.0: the whole region": (100.0, 0.5),
        "absolute 200 capped at the area": (min(200, 100), 0.5),
    }
    for name, (saturation, expected) in cases.items():
        curves = _curves([half, background], [[Region(region, "logical_anomalies", saturation)], []],
                         [False, True], bins=10_000)
        assert curves.au_spro(0.3) == pytest.approx(expected, abs=1e-6), name


def test_pixel_metrics_stream_in_bounded_memory():
    """50 maps of 1024 x 1024 (200 MB as a stack) go through with a small, constant footprint."""
    curves = PixelCurves(0.0, 1.0, 10_000)
    rng = np.random.default_rng(0)
    mask = np.zeros((1024, 1024), dtype=bool)
    mask[100:300, 200:400] = True
    tracemalloc.start()
    for i in range(50):
        anomaly_map = rng.random((1024, 1024), dtype=np.float32)
        curves.add(anomaly_map, [Region(mask, "d")] if i % 2 else [], good=i % 2 == 0)
        del anomaly_map
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 * 2**20
    assert curves.pro_regions == 25 and curves.auroc() == pytest.approx(0.5, abs=0.01)


# --- the evaluation stage --------------------------------------------------------------------

EVAL = SMALL_NETS | {"evaluation.latency_repeats": 2, "evaluation.bins": 100_000}


@pytest.fixture(scope="module")
def evaluated_ad(tmp_path_factory, synthetic_ad):
    """One trained and evaluated category shared by the stage tests below (they only read it)."""
    config = tiny_config(synthetic_ad, tmp_path_factory.mktemp("evaluated") / "run", EVAL)
    train(config, "efficientad_ast", "fabric", show_progress=False)
    return config, evaluate_category(config, "efficientad_ast", "fabric", show_progress=False)


def test_evaluate_writes_metrics_maps_masks_overlays_and_plots(evaluated_ad):
    config, result = evaluated_ad
    assert result == read_metrics(results_dir(config, "efficientad_ast", "fabric"))
    assert result["schema_version"] == 1 and result["model"] == "efficientad_ast" and result["layout"] == "mvtec_ad"
    assert result["dataset"] == "mvtec_ad"  # the root folder (no synthetic section in this config)
    metrics = result["metrics"]
    for name in ("image_auroc", "pixel_auroc", "au_pro", "image_f1", "pixel_f1", "oracle_image_f1",
                 "oracle_pixel_f1", "teacher_auc_mean", "teacher_auc_max", "latency_ms", "throughput_ips",
                 "train_seconds_teacher", "train_seconds_student_ae", "best_epoch_student_ae"):
        assert isinstance(metrics[name], (int, float)) and np.isfinite(metrics[name]), name
    assert "au_spro_0.3_mean" not in metrics  # LOCO only
    data = load_category(config, "fabric")
    test = data.samples("test")
    assert result["counts"]["test"] == len(test)
    root = model_dir(config, "efficientad_ast")
    for sample in test:
        defect, stem = sample.sample_id.split("/")[1:]
        anomaly_map = tifffile.imread(root / "maps" / "fabric" / "test" / defect / f"{stem}.tiff")
        width, height = Image.open(sample.path).size
        assert anomaly_map.shape == (height, width) and anomaly_map.dtype == np.float32
        mask = np.asarray(Image.open(root / "masks" / "fabric" / "test" / defect / f"{stem}.png"))
        np.testing.assert_array_equal(mask > 0, anomaly_map >= result["thresholds"]["pixel"])
        assert Image.open(root / "overlays" / "fabric" / "test" / defect / f"{stem}.png").size == (width, height)
    for plot in ("roc_image", "pr_image", "roc_pixel", "pr_pixel", "losses"):
        assert (results_dir(config, "efficientad_ast", "fabric") / f"{plot}.png").stat().st_size > 1000


def test_metrics_json_and_maps_agree_with_the_official_computation(evaluated_ad):
    """Read back the TIFFs and the data set's own mask PNGs, as the MVTec AD evaluator would."""
    config, result = evaluated_ad
    maps_root = model_dir(config, "efficientad_ast") / "maps" / "fabric" / "test"
    maps, masks, labels = [], [], []
    for tiff in sorted(maps_root.glob("*/*.tiff")):
        defect = tiff.parent.name
        maps.append(tifffile.imread(tiff))
        gt = config.data.root / "fabric" / "ground_truth" / defect / f"{tiff.stem}_mask.png"
        masks.append(np.asarray(Image.open(gt)) > 0 if defect != "good" else np.zeros(maps[-1].shape, dtype=bool))
        labels.append(int(defect != "good"))
    metrics = result["metrics"]
    assert metrics["au_pro"] == pytest.approx(exact_au_pro(maps, masks, 0.3), abs=1e-3)
    # What the timings were measured on, so that CPU and GPU rows are never compared unknowingly.
    assert result["compute"] | {"device_name": "?"} == {
        "device_name": "?", "compute_capability": None, "precision": "float32", "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    assert result["compute"]["device_name"]
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score(labels, [m.max() for m in maps]), abs=1e-9)
    pixels = np.concatenate([m.ravel() for m in maps])
    assert metrics["pixel_auroc"] == pytest.approx(roc_auc_score(np.concatenate([m.ravel() for m in masks]), pixels),
                                                   abs=1e-4)


def test_thresholds_and_scores_do_not_depend_on_test_labels(evaluated_ad, tmp_path):
    config, result = evaluated_ad
    data = load_category(config, "fabric")
    test = data.samples("test")
    # The same images with every label and mask withheld.
    anonymous = [Sample(f"test/unlabelled/{i}", s.path, "test", "unlabelled") for i, s in enumerate(test)]
    blind = config.model_copy(update={"run": config.run.model_copy(update={"out_dir": tmp_path})})
    detector = load_detector(config, "efficientad_ast", "fabric", torch.device("cpu"))
    with Progress(disable=True) as progress:
        thresholds = fit_thresholds(detector, data.samples("validation"), config, "efficientad_ast", "fabric",
                                    torch.device("cpu"), progress)
        predictions = predict_test(detector, anonymous, blind, "efficientad_ast", "fabric", torch.device("cpu"),
                                   progress)
    assert (thresholds.image, thresholds.pixel) == (result["thresholds"]["image"], result["thresholds"]["pixel"])
    labels = [s.label for s in test]
    assert roc_auc_score(labels, predictions.scores) == result["metrics"]["image_auroc"]


def test_rerun_skips_a_current_evaluation(evaluated_ad):
    config, result = evaluated_ad
    assert evaluate_category(config, "efficientad_ast", "fabric", show_progress=False) == result


def test_loco_evaluation_reports_logical_and_structural_metrics(make_config, synthetic_loco):
    _, config = make_config(EVAL, data_root=synthetic_loco, layout="mvtec_loco")
    train(config, "efficientad_ast", "parts_tray", show_progress=False)
    result = evaluate_category(config, "efficientad_ast", "parts_tray", show_progress=False)
    metrics = result["metrics"]
    assert metrics["au_pro"] is None
    for kind in ("logical", "structural", "mean"):
        for limit in ("0.01", "0.05", "0.1", "0.3", "1"):
            assert 0.0 <= metrics[f"au_spro_{limit}_{kind}"] <= 1.0
    assert metrics["auroc_loco_mean"] == pytest.approx(
        (metrics["auroc_logical_anomalies"] + metrics["auroc_structural_anomalies"]) / 2)

    # Independent sPRO from the TIFFs and the raw ground-truth PNGs + defects_config.json.
    root = config.data.root / "parts_tray"
    specs = {d["pixel_value"]: d for d in json.loads((root / "defects_config.json").read_text())}
    maps_root = model_dir(config, "efficientad_ast") / "maps" / "parts_tray" / "test"
    for kind in ("logical_anomalies", "structural_anomalies"):
        maps, regions, good = [], [], []
        for tiff in sorted(maps_root.glob("*/*.tiff")):
            if tiff.parent.name not in ("good", kind):
                continue
            maps.append(tifffile.imread(tiff))
            good.append(tiff.parent.name == "good")
            found = []
            for png in sorted((root / "ground_truth" / kind / tiff.stem).glob("*.png")) if not good[-1] else []:
                values = np.asarray(Image.open(png))
                for value in np.unique(values[values > 0]):
                    region, spec = values == value, specs[int(value)]
                    area = region.sum()
                    saturation = (spec["saturation_threshold"] * area if spec["relative_saturation"]
                                  else min(spec["saturation_threshold"], area))
                    found.append((region, saturation))
            regions.append(found)
        expected = exact_au_spro(maps, regions, good, 0.3)
        assert metrics[f"au_spro_0.3_{kind.split('_')[0]}"] == pytest.approx(expected, abs=2e-3), kind
