"""``val_synthetic_*``: a detector's scores on the synthetic-anomaly validation set.

Image AUROC of the anomalous images against the clean validation images, and pixel AUROC and
AU-PRO (to ``evaluation.pro_fpr_limit``) of the maps against the masks, all at the detector's
input size: cheap enough to run at every validation pass of a training stage (a sweep's
objective, a stage's ``select_by``), and the same numbers on every trial and model.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from effad_hpc.config import ExperimentConfig
from effad_hpc.data.mvtec import GroundTruthRegion
from effad_hpc.data.validation_anomalies import AnomalySet, ensure_validation_anomalies
from effad_hpc.errors import TrainingError
from effad_hpc.evaluation.metrics import PixelCurves, ThresholdScores, auroc, best_f1, pro_regions
from effad_hpc.features.backbones import FeatureExtractor
from effad_hpc.models import AnomalyDetector, image_scores
from effad_hpc.training import MODELS
from effad_hpc.training.detector import as_detector, model_input
from effad_hpc.training.hooks import Validated, scoring
from effad_hpc.utils.device import autocast, resolve_device
from effad_hpc.utils.memory import reused_memory

METRICS = ("val_synthetic_image_auroc", "val_synthetic_pixel_auroc", "val_synthetic_au_pro")
"""What :meth:`SyntheticMaps.metrics` computes; ``val_synthetic_mean`` derives from them (:func:`objective_value`)."""
CURVE_BINS = 1000
"""Thresholds of the pixel curves: the set has some 10^6 pixels, not a test split's 10^8."""


@dataclass(frozen=True)
class SyntheticMaps:
    """A detector's maps (at its input size) and image scores on the set's clean and anomalous images:
    (N, S, S) and (M, S, S) maps, with (M, S, S) boolean masks."""

    clean_maps: np.ndarray
    clean_scores: np.ndarray
    anomalous_maps: np.ndarray
    anomalous_scores: np.ndarray
    masks: np.ndarray

    @functools.cached_property
    def curves(self) -> PixelCurves:
        """The pixel curves, built once for both the metrics and the F1 threshold."""
        maps = np.concatenate([self.clean_maps, self.anomalous_maps])
        curves = PixelCurves(float(maps.min()), float(maps.max()), CURVE_BINS, maps.ravel())
        for anomaly_map in self.clean_maps:
            curves.add(anomaly_map, [], good=True)
        for anomaly_map, mask in zip(self.anomalous_maps, self.masks):
            curves.add(anomaly_map, pro_regions([GroundTruthRegion(mask, "synthetic")], "synthetic"), good=False)
        return curves

    def metrics(self, pro_fpr_limit: float) -> dict[str, float | None]:
        """The :data:`METRICS`."""
        labels = np.r_[np.zeros(len(self.clean_scores)), np.ones(len(self.anomalous_scores))]
        return {"val_synthetic_image_auroc": auroc(labels, np.r_[self.clean_scores, self.anomalous_scores]),
                "val_synthetic_pixel_auroc": self.curves.auroc(),
                "val_synthetic_au_pro": self.curves.au_pro(pro_fpr_limit)}

    def best_pixel_f1(self) -> ThresholdScores:
        """The pixel threshold with the best F1 on the synthetic anomalies and the clean images:
        a rule from validation images only that weighs missed defect pixels, where a quantile of
        good pixels alone can land above every defect pixel of a model with a long good tail."""
        return best_f1(*self.curves.precision_recall())


def score_maps(clean_scores: np.ndarray, anomalous_scores: np.ndarray, clean_maps: np.ndarray,
               anomalous_maps: np.ndarray, masks: np.ndarray, pro_fpr_limit: float) -> dict[str, float | None]:
    """The three metrics from image scores, (N, S, S) maps and (M, S, S) boolean masks."""
    return SyntheticMaps(clean_maps, clean_scores, anomalous_maps, anomalous_scores, masks).metrics(pro_fpr_limit)


@dataclass(frozen=True)
class ScoringInputs:
    """The synthetic-anomaly set as a detector's model reads it: its backbone features (or the
    images, for a model that reads images) of the clean and the anomalous images, on the CPU, and
    where a training stage scores a model with a frozen teacher, that teacher's outputs of them."""

    folder: Path
    clean: torch.Tensor
    anomalous: torch.Tensor
    masks: np.ndarray
    clean_teacher: torch.Tensor | None = None
    anomalous_teacher: torch.Tensor | None = None


def scoring_inputs(detector: AnomalyDetector, anomaly_set: AnomalySet, config: ExperimentConfig,
                   device: torch.device) -> ScoringInputs:
    """The set through the detector's frozen extractor, once: a sweep scores every validation
    pass of a trial, and the backbone was most of a pass's time."""
    clean, anomalous, masks = anomaly_set.tensors(detector.image_size)
    return ScoringInputs(anomaly_set.folder, _model_inputs(detector, clean, config, device),
                         _model_inputs(detector, anomalous, config, device), masks.numpy())


def with_teacher_outputs(detector: AnomalyDetector, inputs: ScoringInputs, config: ExperimentConfig,
                         device: torch.device) -> ScoringInputs:
    """``inputs`` with the outputs of the detector's frozen teacher (``inputs`` as they are for a
    model without one). A stage scores every validation pass, and its model's teacher does not
    change while it trains: its flow is half of the hybrid's pass at 16 x 16. Kept on the CPU, in
    the precision the teacher gives (float32 but for a PDN under AMP): 12 MB for EfficientAD-AST at
    16 x 16, 0.5 GB for EfficientAD at 256 px in float32."""
    clean = _teacher_outputs(detector, inputs.clean, config, device)
    if clean is None:
        return inputs
    return replace(inputs, clean_teacher=clean,
                   anomalous_teacher=_teacher_outputs(detector, inputs.anomalous, config, device))


def _model_inputs(detector: AnomalyDetector, images: torch.Tensor, config: ExperimentConfig,
                  device: torch.device) -> torch.Tensor:
    return _batched(detector.model_inputs, detector, images, config, device)


def _teacher_outputs(detector: AnomalyDetector, inputs: torch.Tensor, config: ExperimentConfig,
                     device: torch.device) -> torch.Tensor | None:
    return _batched(detector.model.teacher_outputs, detector, inputs, config, device)


def _batched(compute, detector: AnomalyDetector, tensors: torch.Tensor, config: ExperimentConfig,
             device: torch.device) -> torch.Tensor | None:
    """``compute`` over ``tensors`` in inference batches, in eval mode, gathered on the CPU (None
    where it gives None: a model without a teacher)."""
    with _eval_mode(detector), torch.no_grad(), reused_memory():
        parts = []
        for batch in tensors.split(config.inference.batch_size):
            with autocast(device, config.run.precision):
                output = compute(batch.to(device))
            if output is None:
                return None
            parts.append(output.cpu())
        return torch.cat(parts)


@contextmanager
def _eval_mode(detector: AnomalyDetector) -> Iterator[None]:
    """Eval mode for scoring; a model in training gets its modes back."""
    modes = {module: module.training for module in detector.modules()}
    detector.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _maps_and_scores(detector: AnomalyDetector, inputs: torch.Tensor, teacher_outputs: torch.Tensor | None,
                     config: ExperimentConfig, device: torch.device,
                     parts: Sequence[str] | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{part: (maps at the input size, image scores)} for ``parts`` of the model's maps (None: all)."""
    size = (detector.image_size, detector.image_size)
    maps: dict[str, list[torch.Tensor]] = {}
    scores: dict[str, list[torch.Tensor]] = {}
    batch_size = config.inference.batch_size
    for lo, batch in zip(range(0, len(inputs), batch_size), inputs.split(batch_size)):
        teacher = None if teacher_outputs is None else teacher_outputs[lo:lo + batch_size].to(device)
        with autocast(device, config.run.precision):
            grid, own = detector.grid_output_from(batch.to(device), teacher)
        resized = detector.to_size({part: grid[part] for part in (grid if parts is None else parts)}, size)
        for part, part_map in resized.items():
            part_map = part_map.float()
            # The model's own image score (PatchCore's reweighting) belongs to its combined map.
            score = own if own is not None and part == "combined" else image_scores(part_map, detector.score)
            scores.setdefault(part, []).append(score.float().cpu())
            maps.setdefault(part, []).append(part_map.cpu())
    return {part: (torch.cat(maps[part]).numpy(), torch.cat(scores[part]).numpy()) for part in maps}


def synthetic_maps_of_parts(detector: AnomalyDetector, inputs: ScoringInputs, config: ExperimentConfig,
                            device: torch.device, parts: Sequence[str] | None = None) -> dict[str, SyntheticMaps]:
    """The detector's maps (``combined`` and the parts it is made of, or only ``parts``) and image
    scores of the set from its model inputs (:func:`scoring_inputs`), in one pass over the set."""
    with _eval_mode(detector), torch.no_grad():
        clean = _maps_and_scores(detector, inputs.clean, inputs.clean_teacher, config, device, parts)
        anomalous = _maps_and_scores(detector, inputs.anomalous, inputs.anomalous_teacher, config, device, parts)
    sets = {}
    for part, (clean_maps, clean_scores) in clean.items():
        anomalous_maps, anomalous_scores = anomalous[part]
        if not (np.isfinite(clean_maps).all() and np.isfinite(anomalous_maps).all()):
            raise TrainingError(f"{inputs.folder}: the model's {part} maps of the synthetic-anomaly validation set "
                                "have NaN/inf values: the training diverged (try a lower learning rate)")
        sets[part] = SyntheticMaps(clean_maps, clean_scores, anomalous_maps, anomalous_scores, inputs.masks)
    return sets


def synthetic_maps(detector: AnomalyDetector, inputs: ScoringInputs, config: ExperimentConfig,
                   device: torch.device) -> SyntheticMaps:
    """The combined map's :class:`SyntheticMaps` alone (a sweep's validation pass)."""
    return synthetic_maps_of_parts(detector, inputs, config, device, ("combined",))["combined"]


def part_metrics(sets: dict[str, SyntheticMaps], pro_fpr_limit: float) -> dict[str, float | None]:
    """``val_synthetic_*_<part>`` for every part of a combined map in ``sets`` (EfficientAD's and
    EfficientAD-AST's ``st`` and ``ae``, the AST teacher's ``teacher``): which part finds and
    localises the anomalies, still without a test label. Empty for a model with one map."""
    return {f"{name}_{part}": value for part, found in sets.items() if part != "combined"
            for name, value in found.metrics(pro_fpr_limit).items()}


def synthetic_validation_metrics(detector: AnomalyDetector, inputs: ScoringInputs, config: ExperimentConfig,
                                 device: torch.device) -> dict[str, float | None]:
    """The detector's ``val_synthetic_*`` metrics on the set's model inputs (:func:`scoring_inputs`)."""
    return synthetic_maps(detector, inputs, config, device).metrics(config.evaluation.pro_fpr_limit)


def objective_value(metrics: dict[str, float | None], objective: str) -> float:
    """One category's objective; ``val_synthetic_mean`` is the mean of image AUROC and AU-PRO
    (image AUROC alone where AU-PRO is undefined)."""
    if objective == "val_synthetic_mean":
        parts = [metrics[name] for name in ("val_synthetic_image_auroc", "val_synthetic_au_pro")
                 if metrics.get(name) is not None]
        return float(sum(parts) / len(parts)) if parts else math.nan
    value = metrics.get(objective)
    return math.nan if value is None else float(value)


class TrainingScorer:
    """Scores one model's final stage while it trains (a sweep trial, a stage's ``select_by``):
    the model as it is at a validation pass, with the extractor of its inputs built once, the
    set of each category through it computed once, and its frozen teacher's outputs of the set
    once per stage (per model object trained)."""

    def __init__(self, config: ExperimentConfig, model_name: str, device: torch.device):
        self.config, self.model_name, self.device = config, model_name, device
        self._inputs: tuple[str, ScoringInputs] | None = None  # one category's: categories train one by one
        self._teacher_of: weakref.ref[torch.nn.Module] | None = None  # the model whose teacher made them

    @functools.cached_property
    def extractor(self) -> FeatureExtractor | None:
        extractor = model_input(self.config, self.model_name).extractor
        return extractor.to(self.device) if extractor is not None else None

    def inputs(self, category: str, detector: AnomalyDetector) -> ScoringInputs:
        """The category's set through ``detector``'s extractor (built at the first call)."""
        if self._inputs is None or self._inputs[0] != category:
            anomalies = ensure_validation_anomalies(self.config, category)
            self._inputs = category, scoring_inputs(detector, anomalies, self.config, self.device)
            self._teacher_of = None
        # A weak reference: another model built later at the same address is not taken for this one.
        if self._teacher_of is None or self._teacher_of() is not detector.model:
            self._inputs = category, with_teacher_outputs(detector, self._inputs[1], self.config, self.device)
            self._teacher_of = weakref.ref(detector.model)
        return self._inputs[1]

    def metrics(self, event: Validated) -> dict[str, float | None]:
        """The ``val_synthetic_*`` metrics of ``event.model`` as if training ended at this pass;
        the model is left in the mode it was in."""
        was_training = event.model.training
        try:
            if event.ready is not None:
                event.ready()
            detector = as_detector(self.config, self.model_name, event.model, self.extractor)
            return synthetic_validation_metrics(detector, self.inputs(event.category, detector), self.config,
                                                self.device)
        finally:
            event.model.train(was_training)


class SelectionScorer:
    """The scorer behind ``select_by``: adds the ``val_synthetic_*`` metrics, and the one a stage
    selects by, to the row of every validation pass of a stage that asks for them."""

    def __init__(self, config: ExperimentConfig, device: torch.device, shared: TrainingScorer | None = None):
        self.config, self.device = config, device
        self._scorers = {shared.model_name: shared} if shared is not None else {}

    def __call__(self, event: Validated) -> None:
        if event.selects_by is None or event.selects_by in event.row:
            return
        ending = [model.name for model in MODELS.values() if model.stages[-1] == event.stage]
        if len(ending) != 1:
            raise TrainingError(f"{event.stage} ({event.category}): select_by {event.selects_by} scores the detector "
                                f"that the stage ends, and {len(ending)} models end with it")
        model_name = ending[0]
        if model_name not in self._scorers:
            self._scorers[model_name] = TrainingScorer(self.config, model_name, self.device)
        metrics = self._scorers[model_name].metrics(event)
        event.row.update(metrics)
        event.row[event.selects_by] = objective_value(metrics, event.selects_by)


def selecting(config: ExperimentConfig, shared: TrainingScorer | None = None) -> AbstractContextManager[None]:
    """Score the stages trained inside this block that select their model by a ``val_synthetic_*``
    score (``select_by``); stages that select by their validation loss are left alone. ``shared``:
    a scorer the caller already has for its model (a sweep trial's), so its extractor and inputs
    are built once."""
    device = shared.device if shared is not None else resolve_device(config.run.device, config.run.precision)
    return scoring(SelectionScorer(config, device, shared))
