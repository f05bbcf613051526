"""Anomaly-detection metrics as the official MVTec evaluators define them, computed in a streaming way.

Image-level metrics need one score per image and use scikit-learn. Pixel-level metrics never
hold the test maps in memory: :class:`PixelCurves` bins every map into a fixed grid of score
thresholds as it arrives (one image at a time) and keeps only per-threshold sums, so memory is
O(bins) whatever the number and size of the images. Its curves are the exact curves evaluated
at the bin edges. Half the edges are evenly spaced between the lowest and highest score, half at
quantiles of a random sample of the test pixels: a heavy tail (a few huge scores) stretches an
even grid until one bin holds nearly every pixel, while quantile edges give every bin a small
share of the pixels, and the even ones keep resolving the top scores a sample misses. With the
default 10,000 bins pixel AUROC, AU-PRO and AU-sPRO differ from an exact computation by about 1e-4.

- AU-PRO (MVTec AD): per threshold, the overlap of every connected ground-truth region (8-
  connectivity) with the thresholded map, averaged over all regions of the test set, against
  the false positive rate over every pixel outside the ground truth; integrated up to the FPR
  limit (interpolated there) and divided by it.
- AU-sPRO (MVTec LOCO): each region (one per defect PNG and pixel value, not split into
  components) scores min(TP area / saturation area, 1); the saturation area is
  ``saturation_threshold`` pixels (at most the region's area) or, with ``relative_saturation``,
  that fraction of the region's area. The FPR counts pixels of the good test images only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from effad_hpc.data.mvtec import DefectSpec, GroundTruthRegion

EIGHT_CONNECTED = np.ones((3, 3), dtype=int)
QUANTILE_SAMPLE_PER_BIN = 100
"""Test pixels sampled per bin, over all test maps, to place :class:`PixelCurves`' quantile edges."""


@dataclass(frozen=True)
class Region:
    """One ground-truth region for the overlap metrics."""

    mask: np.ndarray
    kind: str
    """For sPRO: ``logical_anomalies`` / ``structural_anomalies``; the defect type otherwise."""
    saturation: float | None = None
    """sPRO saturation area in pixels; None where there is no ``defects_config.json``."""


def saturation_area(spec: DefectSpec, area: int) -> float:
    if spec.relative_saturation:
        return spec.saturation_threshold * area
    return min(spec.saturation_threshold, area)


def pro_regions(ground_truth: Sequence[GroundTruthRegion], kind: str) -> list[Region]:
    """MVTec AD: the connected components of the union of the ground-truth masks."""
    if not ground_truth:
        return []
    union = np.logical_or.reduce([g.mask for g in ground_truth])
    labels, count = ndimage.label(union, structure=EIGHT_CONNECTED)
    return [Region(labels == k, kind) for k in range(1, count + 1)]


def spro_regions(ground_truth: Sequence[GroundTruthRegion], kind: str) -> list[Region]:
    """MVTec LOCO: every region as annotated, with its saturation area."""
    return [Region(g.mask, kind, saturation_area(g.spec, int(g.mask.sum()))) for g in ground_truth if g.mask.any()]


def area_under_curve(x: np.ndarray, y: np.ndarray, limit: float = 1.0) -> float:
    """Trapezoidal area under (x, y) for x in [0, limit], divided by ``limit``; x must be
    non-decreasing; y is interpolated linearly at ``limit``."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    inside = x <= limit
    xs, ys = x[inside], y[inside]
    if xs[-1] < limit and inside.sum() < len(x):
        nxt = int(inside.sum())
        x0, x1, y0, y1 = x[nxt - 1], x[nxt], y[nxt - 1], y[nxt]
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        xs, ys = np.append(xs, limit), np.append(ys, y_limit)
    return float(np.trapezoid(ys, xs) / limit)


def sample_pixels(values: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``count`` of the values of an array, drawn by ``rng`` without replacement."""
    values = values.ravel()
    return rng.choice(values, count, replace=False) if values.size > count else values


def bin_edges(low: float, high: float, bins: int, sample: np.ndarray | None = None) -> np.ndarray:
    """Ascending thresholds from ``low``: ``bins`` evenly spaced below ``high``, or with a sample of
    the scores half of them evenly spaced and half at the sample's quantiles (ties merged)."""
    if sample is None or not sample.size:
        return low + (high - low) * np.arange(bins) / bins
    even = bins - bins // 2
    quantiles = np.quantile(sample.astype(np.float64), np.arange(bins // 2) / (bins // 2))
    return np.unique(np.concatenate([low + (high - low) * np.arange(even) / even, np.clip(quantiles, low, high)]))


def _at_or_above(histogram: np.ndarray) -> np.ndarray:
    """counts[k] = number of values in bins >= k, i.e. with score >= the k-th bin edge."""
    return np.cumsum(histogram[::-1])[::-1]


class PixelCurves:
    """Streaming, binned pixel-level ROC, PR, PRO and sPRO curves over scores in [low, high];
    ``sample``: test pixels for the quantile edges (see :func:`bin_edges`; without it, even edges)."""

    def __init__(self, low: float, high: float, bins: int = 10_000, sample: np.ndarray | None = None):
        if not high > low:
            high = low + 1.0  # a constant map: every threshold below it counts everything
        self.low, self.high = float(low), float(high)
        self.edges = bin_edges(self.low, self.high, bins, sample)
        """Threshold of bin k: a pixel counts as anomalous at k when its bin is >= k."""
        self.bins = len(self.edges)
        self.negatives = np.zeros(self.bins)      # pixels outside the ground truth, all test images
        self.positives = np.zeros(self.bins)      # pixels inside the ground truth
        self.good_pixels = np.zeros(self.bins)    # pixels of good test images (sPRO's FPR)
        self.pro_sum, self.pro_regions = np.zeros(self.bins), 0
        self.spro_sum: dict[str, np.ndarray] = {}
        self.spro_regions: dict[str, int] = {}

    def _bin(self, values: np.ndarray) -> np.ndarray:
        """Bin k of a value: the highest k whose edge is at most the value (0 below the first edge)."""
        return np.maximum(np.searchsorted(self.edges, values.astype(np.float64), side="right") - 1, 0)

    def _histogram(self, bins: np.ndarray) -> np.ndarray:
        return np.bincount(bins.ravel(), minlength=self.bins)

    def add(self, anomaly_map: np.ndarray, regions: Iterable[Region], good: bool) -> None:
        regions = list(regions)
        bins = self._bin(anomaly_map)
        inside = np.zeros(anomaly_map.shape, dtype=bool)
        for region in regions:
            inside |= region.mask
            covered = _at_or_above(self._histogram(bins[region.mask]))
            area = int(region.mask.sum())
            self.pro_sum += covered / area
            self.pro_regions += 1
            if region.saturation is not None:
                curve = np.minimum(covered / region.saturation, 1.0)
                self.spro_sum[region.kind] = self.spro_sum.get(region.kind, np.zeros(self.bins)) + curve
                self.spro_regions[region.kind] = self.spro_regions.get(region.kind, 0) + 1
        self.negatives += self._histogram(bins[~inside])
        self.positives += self._histogram(bins[inside])
        if good:
            self.good_pixels += self._histogram(bins)

    # --- curves: points ordered from the highest threshold to the lowest, starting at (0, 0) ---

    def _rates(self, counts: np.ndarray) -> np.ndarray:
        total = counts.sum()
        return np.concatenate([[0.0], _at_or_above(counts)[::-1] / total]) if total else np.zeros(self.bins + 1)

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        return self._rates(self.negatives), self._rates(self.positives)

    def auroc(self) -> float | None:
        if not self.positives.sum() or not self.negatives.sum():
            return None
        return area_under_curve(*self.roc())

    def pro_curve(self) -> tuple[np.ndarray, np.ndarray]:
        pro = np.concatenate([[0.0], self.pro_sum[::-1] / self.pro_regions])
        return self._rates(self.negatives), np.minimum(pro, 1.0)

    def au_pro(self, limit: float = 0.3) -> float | None:
        return area_under_curve(*self.pro_curve(), limit) if self.pro_regions and self.negatives.sum() else None

    def au_spro(self, limit: float, kinds: Sequence[str] | None = None) -> float | None:
        """AU-sPRO over the regions of ``kinds`` (default: every kind), FPR on good images."""
        kinds = [k for k in (kinds or self.spro_sum) if k in self.spro_sum]
        if not kinds or not self.good_pixels.sum():
            return None
        total = sum(self.spro_sum[k] for k in kinds) / sum(self.spro_regions[k] for k in kinds)
        return area_under_curve(self._rates(self.good_pixels), np.concatenate([[0.0], total[::-1]]), limit)

    def precision_recall(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per bin edge (ascending thresholds): precision, recall, threshold."""
        tp, fp = _at_or_above(self.positives), _at_or_above(self.negatives)
        predicted = tp + fp
        precision = np.divide(tp, predicted, out=np.ones(self.bins), where=predicted > 0)
        recall = tp / max(self.positives.sum(), 1)
        return precision, recall, self.edges


@dataclass(frozen=True)
class ThresholdScores:
    """Precision, recall and F1 of binary decisions at one threshold."""

    threshold: float
    precision: float
    recall: float
    f1: float

    @classmethod
    def from_counts(cls, threshold: float, tp: float, fp: float, fn: float) -> ThresholdScores:
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return cls(float(threshold), precision, recall, f1)


def best_f1(precision: np.ndarray, recall: np.ndarray, thresholds: np.ndarray) -> ThresholdScores:
    """The threshold with the best F1 on these (test) labels: reported only as ``oracle_*``."""
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                   where=(precision + recall) > 0)
    k = int(np.argmax(f1))
    return ThresholdScores(float(thresholds[k]), float(precision[k]), float(recall[k]), float(f1[k]))


def image_threshold_scores(labels: np.ndarray, scores: np.ndarray, threshold: float) -> ThresholdScores:
    predicted = scores >= threshold
    return ThresholdScores.from_counts(threshold, float(np.sum(predicted & (labels == 1))),
                                       float(np.sum(predicted & (labels == 0))),
                                       float(np.sum(~predicted & (labels == 1))))


def image_oracle(labels: np.ndarray, scores: np.ndarray) -> ThresholdScores:
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    return best_f1(precision[:-1], recall[:-1], thresholds)


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC, or None when the labels hold only one class."""
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return None
    return float(roc_auc_score(labels, scores))
