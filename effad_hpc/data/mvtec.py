"""Readers for the MVTec AD and MVTec LOCO AD folder layouts (SPEC section 5).

MVTec AD (and any folder in its layout)::

    <category>/train/good/*.png
    <category>/test/<defect>/*.png                 (``good`` for normal test images)
    <category>/ground_truth/<defect>/<id>_mask.png (no masks for ``good``)

MVTec LOCO AD::

    <category>/train/good/*.png
    <category>/validation/good/*.png
    <category>/test/{good,logical_anomalies,structural_anomalies}/*.png
    <category>/ground_truth/<type>/<id>/000.png, 001.png, ...  (one PNG per defect region)
    <category>/defects_config.json

Indexing checks the layout and every mask's size against its image (from the file headers, so it
is cheap); pixels are decoded only when a sample is loaded. :func:`check_ground_truth` decodes
every mask once to check its pixel values; ``train`` and evaluation call it before their work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from effad_hpc.data.images import IMAGE_SUFFIXES, image_size, read_label_map
from effad_hpc.errors import DataError

Layout = Literal["mvtec_ad", "mvtec_loco"]
Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
GOOD = "good"
LOCO_ANOMALY_TYPES = ("logical_anomalies", "structural_anomalies")


@dataclass(frozen=True)
class DefectSpec:
    """One entry of a LOCO ``defects_config.json``."""

    defect_name: str
    pixel_value: int
    saturation_threshold: float
    relative_saturation: bool


@dataclass(frozen=True)
class Sample:
    """One image of a category with everything needed to score it."""

    sample_id: str
    """Unique within the category: ``<split>/<defect>/<file stem>``."""
    path: Path
    split: Split
    defect_type: str
    """``good``, a MVTec AD defect folder, or ``logical_anomalies`` / ``structural_anomalies``."""
    mask_paths: tuple[Path, ...] = ()
    """MVTec AD: one binary mask; LOCO: one PNG per ground-truth region."""

    @property
    def label(self) -> int:
        return 0 if self.defect_type == GOOD else 1

    @property
    def stem(self) -> str:
        return self.path.stem


@dataclass(frozen=True)
class GroundTruthRegion:
    """A ground-truth map of one test image: the pixels of one defect (LOCO) or all (AD)."""

    mask: np.ndarray
    """Boolean (H, W) at the image's original size."""
    defect_name: str
    spec: DefectSpec | None = None
    """LOCO only: the entry of ``defects_config.json`` whose pixel value the PNG carries."""


@dataclass(frozen=True)
class CategoryData:
    name: str
    layout: Layout
    root: Path
    splits: dict[str, list[Sample]]
    defects: dict[int, DefectSpec] = field(default_factory=dict)
    """LOCO only: ``defects_config.json`` keyed by pixel value."""

    def samples(self, split: Split) -> list[Sample]:
        if split not in self.splits:
            raise DataError(f"{self.root}: the {split} split was not indexed (a label-free reader, such as a sweep "
                            "trial, reads no test file)")
        return self.splits[split]

    def ground_truth(self, sample: Sample) -> list[GroundTruthRegion]:
        """The sample's ground-truth regions (an empty list for good images)."""
        regions = []
        for mask_path in sample.mask_paths:
            values = read_label_map(mask_path)
            if self.layout == "mvtec_ad":
                regions.append(GroundTruthRegion(values > 0, sample.defect_type))
                continue
            present = np.unique(values[values > 0])
            if present.size == 0:
                continue  # LOCO ships a few empty region files; they carry no region
            for value in present.tolist():
                spec = self.defects.get(int(value))
                if spec is None:
                    raise DataError(
                        f"{mask_path}: pixel value {value} is not listed in "
                        f"{self.root / 'defects_config.json'}"
                    )
                regions.append(GroundTruthRegion(values == value, spec.defect_name, spec))
        return regions

    def union_mask(self, sample: Sample) -> np.ndarray:
        """All anomalous pixels of a sample as one boolean (H, W) mask at the original size."""
        width, height = image_size(sample.path)
        mask = np.zeros((height, width), dtype=bool)
        for region in self.ground_truth(sample):
            mask |= region.mask
        return mask


# --- indexing ------------------------------------------------------------------------------


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: missing folder ({what})")
    return path


def _check_mask_size(image: Path, mask: Path) -> None:
    if image_size(mask) != image_size(image):
        raise DataError(
            f"{mask}: mask size {image_size(mask)} differs from its image {image} {image_size(image)}"
        )


def _good_samples(folder: Path, split: Split) -> list[Sample]:
    return [Sample(f"{split}/{GOOD}/{p.stem}", p, split, GOOD) for p in _images_in(folder)]


def _split_validation(train: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out a seeded fraction of train/good as validation (MVTec AD has no validation folder)."""
    if len(train) < 2:
        raise DataError(
            f"{train[0].path.parent if train else 'train/good'}: need at least 2 training images "
            "to hold out a validation split"
        )
    order = np.random.default_rng(seed).permutation(len(train))
    n_val = min(len(train) - 1, max(1, round(fraction * len(train))))
    held_out = set(order[:n_val].tolist())
    keep = [s for i, s in enumerate(train) if i not in held_out]
    validation = [
        Sample(f"validation/{GOOD}/{s.stem}", s.path, "validation", GOOD)
        for i, s in enumerate(train) if i in held_out
    ]
    return keep, validation


def _read_ad(root: Path, validation_fraction: float, seed: int, with_test: bool) -> CategoryData:
    train = _good_samples(_require_dir(root / "train" / GOOD, "training images"), "train")
    if not train:
        raise DataError(f"{root / 'train' / GOOD}: empty category: no training images")
    train, validation = _split_validation(train, validation_fraction, seed)
    if not with_test:
        return CategoryData(root.name, "mvtec_ad", root, {"train": train, "validation": validation})

    test_dir = _require_dir(root / "test", "test images")
    test: list[Sample] = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        for image in _images_in(defect_dir):
            masks: tuple[Path, ...] = ()
            if defect != GOOD:
                mask = root / "ground_truth" / defect / f"{image.stem}_mask.png"
                if not mask.is_file():
                    raise DataError(f"{image}: defective test image without a mask (expected {mask})")
                _check_mask_size(image, mask)
                masks = (mask,)
            test.append(Sample(f"test/{defect}/{image.stem}", image, "test", defect, masks))
    if not test:
        raise DataError(f"{test_dir}: no test images")
    return CategoryData(root.name, "mvtec_ad", root,
                        {"train": train, "validation": validation, "test": test})


def read_defects_config(path: Path) -> dict[int, DefectSpec]:
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing (MVTec LOCO categories list their defects there)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a list of defect entries")
    specs: dict[int, DefectSpec] = {}
    for index, entry in enumerate(entries):
        try:
            spec = DefectSpec(
                defect_name=str(entry["defect_name"]),
                pixel_value=int(entry["pixel_value"]),
                saturation_threshold=float(entry["saturation_threshold"]),
                relative_saturation=bool(entry["relative_saturation"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: entry {index}: missing or invalid field {exc}") from None
        if spec.pixel_value in specs:
            raise DataError(f"{path}: pixel value {spec.pixel_value} is listed twice")
        specs[spec.pixel_value] = spec
    return specs


def _read_loco(root: Path, with_test: bool) -> CategoryData:
    train = _good_samples(_require_dir(root / "train" / GOOD, "training images"), "train")
    if not train:
        raise DataError(f"{root / 'train' / GOOD}: empty category: no training images")
    validation = _good_samples(_require_dir(root / "validation" / GOOD, "validation images"), "validation")
    if not validation:
        raise DataError(f"{root / 'validation' / GOOD}: no validation images")
    if not with_test:
        return CategoryData(root.name, "mvtec_loco", root, {"train": train, "validation": validation})
    defects = read_defects_config(root / "defects_config.json")

    test_root = _require_dir(root / "test", "test images")
    test = _good_samples(_require_dir(test_root / GOOD, "good test images"), "test")
    for kind in LOCO_ANOMALY_TYPES:
        kind_dir = test_root / kind
        if not kind_dir.is_dir():
            continue
        for image in _images_in(kind_dir):
            gt_dir = root / "ground_truth" / kind / image.stem
            masks = tuple(_images_in(gt_dir)) if gt_dir.is_dir() else ()
            if not masks:
                raise DataError(f"{image}: defective test image without a mask (expected PNGs in {gt_dir})")
            for mask in masks:
                _check_mask_size(image, mask)
            test.append(Sample(f"test/{kind}/{image.stem}", image, "test", kind, masks))
    return CategoryData(root.name, "mvtec_loco", root,
                        {"train": train, "validation": validation, "test": test}, defects)


def read_category(root: Path, layout: Layout, validation_fraction: float = 0.1, seed: int = 0,
                  with_test: bool = True) -> CategoryData:
    """Index one category folder; raises DataError naming the first thing that is wrong. Without
    ``with_test`` only the train and validation images are indexed: no test image, mask or
    ``defects_config.json`` is opened."""
    root = Path(root)
    _require_dir(root, "category")
    if layout == "mvtec_ad":
        return _read_ad(root, validation_fraction, seed, with_test)
    if layout == "mvtec_loco":
        return _read_loco(root, with_test)
    raise DataError(f"unknown layout {layout!r} (expected mvtec_ad or mvtec_loco)")


def mask_values(path: Path) -> np.ndarray:
    """The distinct nonzero pixel values of a ground-truth PNG, ascending."""
    values = read_label_map(path)
    if values.dtype == np.uint8:  # a 256-bin count is several times faster than sorting the pixels
        return np.flatnonzero(np.bincount(values.ravel(), minlength=256)[1:]) + 1
    present = np.unique(values)
    return present[present > 0]


def check_ground_truth(data: CategoryData) -> list[Sample]:
    """Decode every mask of the test split once and check its pixel values: a LOCO value that
    ``defects_config.json`` does not list, or an MVTec AD mask that marks no pixel, is a DataError.
    Returns the defective LOCO images whose region files mark no pixel (LOCO ships a few; their
    pixel metrics are undefined).

    Not part of :func:`read_category`: every stage indexes its category, and decoding a few hundred
    masks costs seconds each time. ``train`` and evaluation call it once, before their work, so that
    a bad mask stops a run before training rather than after inference.
    """
    unannotated, empty_ad_masks = [], []
    for sample in data.samples("test"):
        if not sample.mask_paths:
            continue
        annotated = False
        for mask_path in sample.mask_paths:
            present = mask_values(mask_path)
            annotated |= present.size > 0
            unlisted = [value for value in present.tolist() if value not in data.defects]
            if data.layout == "mvtec_loco" and unlisted:
                raise DataError(f"{mask_path}: pixel value {unlisted[0]} is not listed in "
                                f"{data.root / 'defects_config.json'} (it lists {sorted(data.defects)})")
        if not annotated:
            (empty_ad_masks if data.layout == "mvtec_ad" else unannotated).append(sample)
    if empty_ad_masks:
        raise DataError(f"{empty_ad_masks[0].mask_paths[0]}: the mask of a defective test image marks no pixel "
                        f"({len(empty_ad_masks)} such mask(s)); draw the defect, or move the image to test/good")
    return unannotated


def list_categories(root: Path) -> list[str]:
    """Category folders under a data-set root: those with a train/ sub-folder."""
    root = Path(root)
    _require_dir(root, "data set root")
    names = sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
    if not names:
        raise DataError(f"{root}: no category folders (none has a train/ sub-folder)")
    return names
