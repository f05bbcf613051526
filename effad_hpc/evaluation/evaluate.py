"""Evaluation stage: a trained model on a category's test split -> metrics.json, maps, masks, plots.

The order of the work is the protocol. (1) Thresholds come from the validation split (good
images) alone. (2) Inference on the test images writes every anomaly map, without reading a test
label. (3) Only then are the maps scored against the ground truth, one image at a time
(streaming: memory does not grow with images x resolution). Test-selected thresholds appear only
in the ``oracle_*`` metrics.

Outputs under ``<run.out_dir>/<model>/``:

- ``maps/<category>/test/<defect>/<id>.tiff``: float32 anomaly map at the original image size
  (the layout the official MVTec AD / LOCO evaluators read);
- ``masks/...png`` (binary, at the validation pixel threshold) and ``overlays/...png`` (heat map
  on the image, one colour scale per category);
- ``results/<category>/``: ``metrics.json`` (written last; see :data:`SCHEMA_VERSION`),
  ``roc_image.png``, ``pr_image.png``, ``roc_pixel.png``, ``pr_pixel.png``, ``losses.png``.

``metrics.json`` (schema version 1): ``schema_version``, ``key`` (hash of the trained model and the
evaluation settings), ``model``, ``category``, ``dataset`` (``data.name``), ``layout``, ``data_root``,
``variant`` (``paper``, or the switches that change the model's method), ``config_hash``, ``trial``
(``<sweep>/<trial id>`` of a sweep trial, else empty), ``code_version``, ``created_at``,
``device``; ``compute`` (``device_name``, ``compute_capability``, ``precision``, ``torch``, ``cuda``,
``cudnn``: what the timings and maps were computed on); ``counts`` (test, good, defective,
per defect type, validation); ``thresholds`` (``image``, ``pixel``, ``pixel_rule`` and how they were chosen);
``metrics``: a flat mapping name -> number or null (null: not defined for this data), with
``image_auroc``, ``pixel_auroc``, ``au_pro`` (MVTec AD), ``image_{f1,precision,recall}``,
``pixel_{f1,precision,recall}`` at the validation thresholds, ``oracle_image_*`` /
``oracle_pixel_*`` (best F1 on the test set, with its threshold), ``auroc_<defect>`` (each defect
type against the good test images; for LOCO ``auroc_logical_anomalies``,
``auroc_structural_anomalies`` and ``auroc_loco_mean``), ``au_spro_<limit>_{logical,structural,mean}``
(LOCO), ``teacher_auc_mean`` / ``teacher_auc_max`` (AST teachers), ``val_synthetic_image_auroc``,
``val_synthetic_pixel_auroc``, ``val_synthetic_au_pro`` (the synthetic-anomaly validation set:
no test label, what sweeps rank on) and the same of each part of a combined map
(``val_synthetic_au_pro_st``, ``..._ae``, ``..._teacher``), ``latency_ms``,
``throughput_ips``, ``train_seconds_<stage>``, ``best_epoch_<stage>``, ``final_epoch_<stage>``,
``train_seconds_total``; ``training``: the stage records; ``budget``: per trained stage the
epochs or steps it was trained for against its paper's; ``warnings``; ``artifacts``: the size of
every map, which a rerun checks before it skips.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.utils.data import DataLoader

from effad_hpc.config import ExperimentConfig, config_hash, stable_hash
from effad_hpc.data import GOOD, ImageDataset, category_fingerprints, dataset_name, load_category
from effad_hpc.data.images import image_size, read_rgb
from effad_hpc.data.mvtec import CategoryData, Sample, check_ground_truth
from effad_hpc.errors import TrainingError
from effad_hpc.data.validation_anomalies import ensure_validation_anomalies
from effad_hpc.evaluation import outputs
from effad_hpc.evaluation.metrics import (
    QUANTILE_SAMPLE_PER_BIN,
    PixelCurves,
    ThresholdScores,
    auroc,
    best_f1,
    image_oracle,
    image_threshold_scores,
    pro_regions,
    sample_pixels,
    spro_regions,
)
from effad_hpc.evaluation.synthetic_validation import part_metrics, scoring_inputs, synthetic_maps_of_parts
from effad_hpc.models import AnomalyDetector, image_scores
from effad_hpc.training import STAGES, load_detector, read_log, read_record, recipe, stage_folder, stage_key
from effad_hpc.training.artifacts import BEST_MODEL
from effad_hpc.utils.atomic import atomic_write_json, exclusive_lock, remove_stale_temps
from effad_hpc.utils.device import autocast, device_record, resolve_device
from effad_hpc.utils.memory import reused_memory
from effad_hpc.utils.provenance import code_version

SCHEMA_VERSION = 1
METRICS = "metrics.json"
VALIDATION_PIXELS_PER_IMAGE = 65_536
"""Validation pixels kept per image (a seeded random subset) for the pixel threshold quantile."""
LOCO_TYPES = ("logical_anomalies", "structural_anomalies")


def model_dir(config: ExperimentConfig, model: str) -> Path:
    return config.run.out_dir / model


def results_dir(config: ExperimentConfig, model: str, category: str) -> Path:
    return model_dir(config, model) / "results" / category


def sample_output(config: ExperimentConfig, model: str, kind: str, category: str, sample: Sample, suffix: str) -> Path:
    """``<run>/<model>/<kind>/<category>/<split>/<defect>/<id><suffix>``."""
    return model_dir(config, model) / kind / category / f"{sample.sample_id}{suffix}"


def evaluation_key(config: ExperimentConfig, model: str, category: str) -> str:
    """Hash of the trained model, the evaluation settings and the files evaluation reads: the
    validation split (thresholds) and the test split with its ground truth."""
    final = recipe(model).stages[-1]
    fingerprints = category_fingerprints(config, category)
    # The model file's checksum too: a model trained again under the same key (a replaced or
    # damaged model.pt; GPU training is not bit-exact) is evaluated again.
    record = read_record(stage_folder(config, category, final))
    model_file = record.artifacts.get(BEST_MODEL, {}).get("sha256") if record else None
    return stable_hash({"model": model, "trained": stage_key(config, final, category), "model_sha256": model_file,
                        "data": {part: fingerprints[part] for part in ("validation", "test", "ground_truth")},
                        "inference": config.inference.model_dump(mode="json"),
                        "evaluation": config.evaluation.model_dump(mode="json"),
                        "validation_anomalies": config.validation_anomalies.model_dump(mode="json")})


@dataclass(frozen=True)
class Thresholds:
    image: float
    pixel: float
    validation_images: int


@dataclass
class TestPredictions:
    """What inference produced for the test split, before any label was read."""

    scores: np.ndarray
    teacher_mean: np.ndarray | None
    teacher_max: np.ndarray | None
    low: float
    high: float
    pixel_sample: np.ndarray
    """A seeded random subset of the test pixels (at most QUANTILE_SAMPLE_PER_BIN per bin): the bin edges."""


def _check_finite(anomaly_map: np.ndarray, score: float, model: str, category: str, sample: Sample) -> None:
    """A NaN or infinite map (e.g. EfficientAD with q_a == q_b) would pass silently into every metric."""
    bad = int(np.count_nonzero(~np.isfinite(anomaly_map)))
    if bad or not np.isfinite(score):
        raise TrainingError(f"model {model}, category {category}, image {sample.path}: anomaly map has NaN/inf values "
                            f"({bad} of {anomaly_map.size} pixels, image score {score}); the trained model is broken "
                            "(a diverged training, or equal map-normalization quantiles): train it again")


def _full_size_maps(detector: AnomalyDetector, samples: Sequence[Sample], config: ExperimentConfig, model: str,
                    category: str, device: torch.device, progress: Progress, description: str
                    ) -> Iterator[tuple[int, np.ndarray, float, np.ndarray | None]]:
    """Per sample: (index, combined map at the original image size, image score, teacher grid map);
    a map with a NaN or infinite value is a TrainingError naming the model, category and image."""
    loader = DataLoader(ImageDataset(samples, detector.image_size), batch_size=config.inference.batch_size,
                        num_workers=config.features.num_workers, pin_memory=device.type == "cuda")
    task = progress.add_task(description, total=len(samples))
    for batch in loader:
        with autocast(device, config.run.precision):
            grid, model_scores = detector.grid_output(batch["image"].to(device, non_blocking=True))
        for row, index in enumerate(batch["index"].tolist()):
            width, height = image_size(samples[index].path)
            combined = detector.to_size({"combined": grid["combined"][row:row + 1]}, (height, width))["combined"]
            teacher = grid["teacher"][row].float().cpu().numpy() if "teacher" in grid else None
            score = float(model_scores[row] if model_scores is not None else image_scores(combined, detector.score)[0])
            anomaly_map = combined[0].cpu().numpy()
            _check_finite(anomaly_map, score, model, category, samples[index])
            yield index, anomaly_map, score, teacher
            progress.advance(task)


def fit_thresholds(detector: AnomalyDetector, validation: Sequence[Sample], config: ExperimentConfig, model: str,
                   category: str, device: torch.device, progress: Progress) -> Thresholds:
    """Image and pixel thresholds from quantiles of the validation split's scores (good images only)."""
    rng = np.random.default_rng(config.seed)
    scores, pixels = [], []
    maps = _full_size_maps(detector, validation, config, model, category, device, progress, "validation")
    with reused_memory():
        for _, anomaly_map, score, _ in maps:
            scores.append(score)
            pixels.append(sample_pixels(anomaly_map, VALIDATION_PIXELS_PER_IMAGE, rng))
    return Thresholds(float(np.quantile(scores, config.evaluation.image_threshold_quantile)),
                      float(np.quantile(np.concatenate(pixels), config.evaluation.pixel_threshold_quantile)),
                      len(scores))


def predict_test(detector: AnomalyDetector, test: Sequence[Sample], config: ExperimentConfig, model: str,
                 category: str, device: torch.device, progress: Progress) -> TestPredictions:
    """Write every test map as TIFF and collect the image scores and a sample of the pixels; reads no label."""
    scores = np.zeros(len(test))
    teacher_mean, teacher_max = np.zeros(len(test)), np.zeros(len(test))
    has_teacher, low, high = False, np.inf, -np.inf
    rng = np.random.default_rng(config.seed)
    pixels_per_map = -(-QUANTILE_SAMPLE_PER_BIN * config.evaluation.bins // max(len(test), 1))
    pixel_sample = []
    maps = _full_size_maps(detector, test, config, model, category, device, progress, "test")
    with reused_memory():
        for index, anomaly_map, score, teacher in maps:
            outputs.write_map(sample_output(config, model, "maps", category, test[index], ".tiff"), anomaly_map)
            scores[index] = score
            low, high = min(low, float(anomaly_map.min())), max(high, float(anomaly_map.max()))
            pixel_sample.append(sample_pixels(anomaly_map, pixels_per_map, rng))
            if teacher is not None:
                has_teacher = True
                teacher_mean[index], teacher_max[index] = teacher.mean(), teacher.max()
    return TestPredictions(scores, teacher_mean if has_teacher else None, teacher_max if has_teacher else None,
                           low, high, np.concatenate(pixel_sample) if pixel_sample else np.zeros(0, np.float32))


def _regions(data: CategoryData, sample: Sample):
    ground_truth = data.ground_truth(sample)
    if data.layout == "mvtec_loco":
        return spro_regions(ground_truth, sample.defect_type)
    return pro_regions(ground_truth, sample.defect_type)


def score_pixels(data: CategoryData, test: Sequence[Sample], config: ExperimentConfig, model: str,
                 predictions: TestPredictions, thresholds: Thresholds, progress: Progress
                 ) -> tuple[PixelCurves, ThresholdScores]:
    """Stream the written maps against the ground truth; write masks and overlays on the way."""
    curves = PixelCurves(predictions.low, predictions.high, config.evaluation.bins, predictions.pixel_sample)
    tp = fp = fn = 0
    task = progress.add_task("pixel metrics", total=len(test))
    for sample in test:
        anomaly_map = outputs.read_map(sample_output(config, model, "maps", data.name, sample, ".tiff"))
        regions = _regions(data, sample)
        curves.add(anomaly_map, regions, good=sample.defect_type == GOOD)
        truth = np.zeros(anomaly_map.shape, dtype=bool)
        for region in regions:
            truth |= region.mask
        predicted = anomaly_map >= thresholds.pixel
        tp += int(np.sum(predicted & truth))
        fp += int(np.sum(predicted & ~truth))
        fn += int(np.sum(~predicted & truth))
        if config.evaluation.write_masks:
            outputs.write_mask(sample_output(config, model, "masks", data.name, sample, ".png"), anomaly_map,
                               thresholds.pixel)
        if config.evaluation.write_overlays:
            outputs.write_overlay(sample_output(config, model, "overlays", data.name, sample, ".png"),
                                  read_rgb(sample.path), anomaly_map, predictions.low, predictions.high)
        progress.advance(task)
    return curves, ThresholdScores.from_counts(thresholds.pixel, tp, fp, fn)


def time_inference(detector: AnomalyDetector, samples: Sequence[Sample], config: ExperimentConfig,
                   device: torch.device) -> tuple[float, float]:
    """(ms per image at batch 1, images per second at the inference batch size), after warm-up."""
    dataset = ImageDataset(samples, detector.image_size)
    batch_size = config.inference.batch_size
    images = torch.stack([dataset[i % len(dataset)]["image"] for i in range(batch_size)]).to(device)
    repeats = config.evaluation.latency_repeats

    def timed(batch: torch.Tensor) -> float:
        with reused_memory(), autocast(device, config.run.precision):
            for _ in range(3):
                detector(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                detector(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return (time.perf_counter() - start) / repeats  # before the scope hands its memory back

    return 1000 * timed(images[:1]), batch_size / timed(images)


def _image_metrics(test: Sequence[Sample], predictions: TestPredictions, thresholds: Thresholds,
                   layout: str) -> dict[str, float | None]:
    labels = np.array([s.label for s in test])
    defects = np.array([s.defect_type for s in test])
    scores = predictions.scores
    at_threshold = image_threshold_scores(labels, scores, thresholds.image)
    metrics: dict[str, float | None] = {
        "image_auroc": auroc(labels, scores),
        "image_f1": at_threshold.f1, "image_precision": at_threshold.precision, "image_recall": at_threshold.recall,
    }
    oracle = image_oracle(labels, scores) if labels.min() != labels.max() else None
    for name in ("f1", "precision", "recall", "threshold"):
        metrics[f"oracle_image_{name}"] = getattr(oracle, name) if oracle else None
    good = defects == GOOD
    for defect in sorted(set(defects) - {GOOD}):
        subset = good | (defects == defect)
        metrics[f"auroc_{defect}"] = auroc(labels[subset], scores[subset])
    if layout == "mvtec_loco":
        values = [metrics.get(f"auroc_{kind}") for kind in LOCO_TYPES]
        metrics["auroc_loco_mean"] = float(np.mean(values)) if None not in values else None
    for name, teacher in (("mean", predictions.teacher_mean), ("max", predictions.teacher_max)):
        metrics[f"teacher_auc_{name}"] = auroc(labels, teacher) if teacher is not None else None
    return metrics


def _pixel_metrics(curves: PixelCurves, at_threshold: ThresholdScores, config: ExperimentConfig,
                   layout: str) -> dict[str, float | None]:
    metrics: dict[str, float | None] = {
        "pixel_auroc": curves.auroc(),
        "au_pro": curves.au_pro(config.evaluation.pro_fpr_limit) if layout == "mvtec_ad" else None,
        "pixel_f1": at_threshold.f1, "pixel_precision": at_threshold.precision,
        "pixel_recall": at_threshold.recall,
    }
    has_positives = curves.positives.sum() > 0
    oracle = best_f1(*curves.precision_recall()) if has_positives else None
    for name in ("f1", "precision", "recall", "threshold"):
        metrics[f"oracle_pixel_{name}"] = getattr(oracle, name) if oracle else None
    if layout == "mvtec_loco":
        for limit in config.evaluation.spro_fpr_limits:
            logical = curves.au_spro(limit, ["logical_anomalies"])
            structural = curves.au_spro(limit, ["structural_anomalies"])
            metrics[f"au_spro_{limit:g}_logical"] = logical
            metrics[f"au_spro_{limit:g}_structural"] = structural
            metrics[f"au_spro_{limit:g}_mean"] = (
                (logical + structural) / 2 if logical is not None and structural is not None else None)
    return metrics


def _plots(folder: Path, test: Sequence[Sample], predictions: TestPredictions, curves: PixelCurves,
           logs: dict[str, list[dict]], title: str) -> None:
    from sklearn.metrics import precision_recall_curve, roc_curve

    labels = np.array([s.label for s in test])
    if labels.min() != labels.max():
        fpr, tpr, _ = roc_curve(labels, predictions.scores)
        outputs.plot_curve(folder / "roc_image.png", fpr, tpr, f"{title}: image ROC", "false positive rate",
                           "true positive rate", f"AUROC {auroc(labels, predictions.scores):.3f}")
        precision, recall, _ = precision_recall_curve(labels, predictions.scores)
        outputs.plot_curve(folder / "pr_image.png", recall, precision, f"{title}: image PR", "recall", "precision",
                           "test images")
    if curves.positives.sum():
        outputs.plot_curve(folder / "roc_pixel.png", *curves.roc(), f"{title}: pixel ROC", "false positive rate",
                           "true positive rate", f"AUROC {curves.auroc():.3f}")
        precision, recall, _ = curves.precision_recall()
        outputs.plot_curve(folder / "pr_pixel.png", recall, precision, f"{title}: pixel PR", "recall", "precision",
                           "test pixels")
    outputs.plot_losses(folder / "losses.png", logs, title)


def read_metrics(folder: Path) -> dict | None:
    """The metrics.json in ``folder``; None when there is none or it does not parse."""
    path = Path(folder) / METRICS
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return metrics if isinstance(metrics, dict) else None


def training_budget(config: ExperimentConfig, model: str, train_images: int) -> dict[str, dict]:
    """``{stage: {"trained", "paper", "unit"}}``: how long the config trains each of the model's
    stages on a category of ``train_images`` training images against its paper (the leaderboard
    marks results trained for less)."""
    budget = {}
    for stage in recipe(model).stages:
        length = STAGES[stage].budget
        if length is not None and (trained := length.configured(config, train_images)) is not None:
            budget[stage] = {"trained": trained, "paper": length.paper, "unit": length.unit}
    return budget


def completed_metrics(config: ExperimentConfig, model: str, category: str) -> dict | None:
    """The category's metrics.json when it is current (same key and schema) and every map it
    vouches for is there with its size, else None: the check behind every skip of evaluation."""
    metrics = read_metrics(results_dir(config, model, category))
    if not metrics or metrics.get("key") != evaluation_key(config, model, category) \
            or metrics.get("schema_version") != SCHEMA_VERSION or "artifacts" not in metrics:
        return None
    maps = model_dir(config, model) / "maps" / category
    for name, size in metrics["artifacts"]["maps"].items():
        path = maps / str(name)
        if not path.is_file() or path.stat().st_size != size:
            return None
    return metrics


def _outputs_of(config: ExperimentConfig, model: str, category: str) -> list[Path]:
    """The folders evaluation writes for one category."""
    base = model_dir(config, model)
    return [base / kind / category for kind in ("maps", "masks", "overlays")] + [results_dir(config, model, category)]


def _remove_stale_outputs(config: ExperimentConfig, model: str, category: str) -> None:
    """Temporaries of killed evaluations (the caller holds the evaluation's lock)."""
    for top in _outputs_of(config, model, category):
        for folder, _, _ in os.walk(top):
            remove_stale_temps(Path(folder), "*")


def evaluate_category(config: ExperimentConfig, model: str, category: str, show_progress: bool = True) -> dict:
    """Evaluate a trained model on one category (skipped when its metrics.json is current), under
    a lock: a second process evaluating the same model and category waits, then skips."""
    folder = results_dir(config, model, category)
    with exclusive_lock(folder.parent / f".{category}.lock"):
        if (existing := completed_metrics(config, model, category)) is not None:
            return existing
        _remove_stale_outputs(config, model, category)
        return _evaluate(config, model, category, show_progress)


def _evaluate(config: ExperimentConfig, model: str, category: str, show_progress: bool) -> dict:
    key = evaluation_key(config, model, category)
    folder = results_dir(config, model, category)
    data = load_category(config, category)
    validation, test = data.samples("validation"), data.samples("test")
    # LOCO ships some empty region files; an image with only empty ones has no pixel truth
    warnings = [f"{sample.mask_paths[0].parent}: no annotated pixel; its pixel metrics are undefined"
                for sample in check_ground_truth(data)]
    for warning in warnings:
        print(f"effad-hpc: warning: {warning}", file=sys.stderr)
    device = resolve_device(config.run.device, config.run.precision)
    detector = load_detector(config, model, category, device)

    columns = [TextColumn(f"{category} {model} " + "{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn()]
    with Progress(*columns, disable=not show_progress) as progress:
        thresholds = fit_thresholds(detector, validation, config, model, category, device, progress)
        synthetic_inputs = scoring_inputs(detector, ensure_validation_anomalies(config, category), config, device)
        synthetic_sets = synthetic_maps_of_parts(detector, synthetic_inputs, config, device)
        synthetic_set = synthetic_sets["combined"]
        synthetic = synthetic_set.metrics(config.evaluation.pro_fpr_limit)
        synthetic |= part_metrics(synthetic_sets, config.evaluation.pro_fpr_limit)
        if config.evaluation.pixel_threshold == "synthetic_f1":
            thresholds = replace(thresholds, pixel=synthetic_set.best_pixel_f1().threshold)
        predictions = predict_test(detector, test, config, model, category, device, progress)
        # Labels are read from here on, after the thresholds and every map are fixed.
        curves, pixel_at_threshold = score_pixels(data, test, config, model, predictions, thresholds, progress)
    latency_ms, throughput = time_inference(detector, test, config, device)

    stages = recipe(model).stages
    records = {stage: read_record(stage_folder(config, category, stage)) for stage in stages}
    metrics = _image_metrics(test, predictions, thresholds, data.layout)
    metrics |= _pixel_metrics(curves, pixel_at_threshold, config, data.layout)
    metrics |= synthetic | {"latency_ms": latency_ms, "throughput_ips": throughput}
    for stage, record in records.items():
        metrics |= {f"train_seconds_{stage}": record.train_seconds, f"best_epoch_{stage}": record.best_epoch,
                    f"final_epoch_{stage}": record.final_epoch}
    metrics["train_seconds_total"] = sum(record.train_seconds for record in records.values())

    logs = {stage: read_log(stage_folder(config, category, stage)) for stage in stages}
    maps = model_dir(config, model) / "maps" / category
    _plots(folder, test, predictions, curves, logs, f"{category} {model}")
    evaluation = config.evaluation
    result = {
        "schema_version": SCHEMA_VERSION, "key": key, "model": model, "variant": recipe(model).variant(config),
        "category": category,
        "dataset": dataset_name(config), "layout": data.layout, "data_root": str(config.data.root),
        "config_hash": config_hash(config), "run_name": config.name, "trial": config.run.trial or "",
        "code_version": code_version(), "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "compute": device_record(device, config.run.precision),
        "counts": {"test": len(test), "good": sum(s.label == 0 for s in test), "defective": sum(s.label for s in test),
                   "by_defect": dict(sorted(Counter(s.defect_type for s in test).items())),
                   "validation": thresholds.validation_images},
        "thresholds": {"image": thresholds.image, "pixel": thresholds.pixel, "pixel_rule": evaluation.pixel_threshold,
                       "source": f"validation split (good images): quantile {evaluation.image_threshold_quantile} "
                                 "of image scores; pixel: " + (
                                     f"quantile {evaluation.pixel_threshold_quantile} of pixel scores"
                                     if evaluation.pixel_threshold == "quantile" else
                                     "best F1 on the synthetic anomalies made from them")},
        "metrics": metrics,
        "training": {stage: asdict(record) for stage, record in records.items()},
        "budget": training_budget(config, model, len(data.samples("train"))),
        "warnings": warnings,
        "artifacts": {"maps": {map_path.relative_to(maps).as_posix(): map_path.stat().st_size
                               for map_path in (sample_output(config, model, "maps", category, sample, ".tiff")
                                                for sample in test)}},
    }
    atomic_write_json(folder / METRICS, result)
    return result
