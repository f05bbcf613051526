"""The synthetic-anomaly validation set: a label-free way to score a model while choosing it.

A validation loss cannot compare trials that change the loss, the width or the teacher; test
labels must not be used at all. So anomalies are made from what may be used: each is one of the
category's validation images (good) with a region replaced, and the region's mask:

- ``cut_paste``: a rectangle cut from another training image, rotated by a multiple of 90 degrees,
  possibly flipped, recoloured (per-channel gain away from 1, so it is never invisible on a
  texture) and pasted at a random place;
- ``noise_blend``: a region shaped by thresholded smooth noise inside a random window, where a
  transformed training image (rotated, channel-permuted, contrast-inverted) shows through with a
  random opacity.

The set is drawn once per category from ``validation_anomalies.seed`` and the names of the train
and validation files (so a copy of the data draws the same set), written as PNG images and masks
(0/255) with a ``manifest.json`` (written last) into a folder keyed by the files' fingerprints
(so changed data draws anew), and reused by every trial and model of every run that shares the
folder. It reads no test image and no mask of the test split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from effad_hpc.config import ExperimentConfig, stable_hash
from effad_hpc.data import category_fingerprints, label_free, load_category
from effad_hpc.data.dataset import resize_image
from effad_hpc.data.images import read_label_map, read_rgb
from effad_hpc.data.mvtec import Sample
from effad_hpc.data.synthetic.render import smooth_noise
from effad_hpc.errors import DataError
from effad_hpc.utils.atomic import atomic_path, atomic_write_json, exclusive_lock

GENERATOR_VERSION = 2  # 2: drawn from the files' names, not their times
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Anomaly:
    image: Path
    mask: Path
    source: Sample
    """The validation image it was made from."""
    kind: str


@dataclass
class AnomalySet:
    """The anomalies of one category and the clean validation images they are scored against."""

    folder: Path
    key: str
    anomalies: list[Anomaly]
    clean: list[Sample]
    _tensors: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def tensors(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(clean images, anomalous images, their masks) at ``size``: (N, 3, S, S) in [0, 1] twice
        and (M, S, S) bool; loaded once per size (a sweep scores the set at every validation pass)."""
        if size not in self._tensors:
            clean = torch.stack([resize_image(read_rgb(sample.path), size) for sample in self.clean])
            anomalous = torch.stack([resize_image(read_rgb(a.image), size) for a in self.anomalies])
            masks = torch.stack([torch.from_numpy(np.asarray(
                Image.fromarray(read_label_map(a.mask)).resize((size, size), Image.Resampling.NEAREST)) > 0)
                for a in self.anomalies])
            self._tensors[size] = (clean, anomalous, masks)
        return self._tensors[size]


def anomaly_set_key(config: ExperimentConfig, category: str) -> str:
    fingerprints = category_fingerprints(config, category)
    settings = config.validation_anomalies.model_dump(mode="json")
    return stable_hash({"version": GENERATOR_VERSION, "settings": settings, "category": category,
                        "data": {split: fingerprints[split] for split in ("train", "validation")}})


def anomaly_set_dir(config: ExperimentConfig, category: str) -> Path:
    """``<run.shared_dir or run.out_dir>/validation_anomalies/<category>/<key>/``."""
    root = config.run.shared_dir or config.run.out_dir
    return root / "validation_anomalies" / category / anomaly_set_key(config, category)


def _window(rng: np.random.Generator, height: int, width: int, area: float) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random rectangle of about ``area`` pixels, aspect in [1/2, 2]."""
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    h = int(np.clip(round(np.sqrt(area / aspect)), 2, height - 1))
    w = int(np.clip(round(area / h), 2, width - 1))
    return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w


def _gain(rng: np.random.Generator) -> np.ndarray:
    """Per-channel gains at least 25 % away from 1, so a pasted patch differs in colour."""
    return np.where(rng.random(3) < 0.5, rng.uniform(0.4, 0.75, 3), rng.uniform(1.25, 1.7, 3))


def _transformed(image: np.ndarray, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """``image`` turned by a multiple of 90 degrees, maybe mirrored, resized to ``size`` (w, h)."""
    turned = np.rot90(image, int(rng.integers(4)))
    turned = np.ascontiguousarray(turned[:, ::-1] if rng.random() < 0.5 else turned)
    return np.asarray(Image.fromarray(turned).resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def _cut_paste(target: np.ndarray, source: np.ndarray, rng: np.random.Generator,
               area: float) -> tuple[np.ndarray, np.ndarray]:
    height, width = target.shape[:2]
    top, left, h, w = _window(rng, height, width, area)
    source = np.asarray(Image.fromarray(source).resize((width, height), Image.Resampling.BILINEAR))
    y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    patch = _transformed(source[y:y + h, x:x + w], rng, (w, h))
    out = target.astype(np.float32)
    out[top:top + h, left:left + w] = np.clip(patch * _gain(rng), 0, 255)
    mask = np.zeros((height, width), dtype=bool)
    mask[top:top + h, left:left + w] = True
    return out, mask


def _noise_blend(target: np.ndarray, source: np.ndarray, rng: np.random.Generator,
                 area: float) -> tuple[np.ndarray, np.ndarray]:
    height, width = target.shape[:2]
    top, left, h, w = _window(rng, height, width, 2 * area)  # the region covers about half its window
    noise = smooth_noise(rng, h, w, int(rng.integers(2, 5)))
    region = noise > np.median(noise)
    mask = np.zeros((height, width), dtype=bool)
    mask[top:top + h, left:left + w] = region
    if not mask.any():
        mask[top + h // 2, left + w // 2] = True
    texture = _transformed(source, rng, (width, height))[..., rng.permutation(3)]
    texture = 255 - texture if rng.random() < 0.5 else texture
    opacity = rng.uniform(0.6, 0.9)
    out = target.astype(np.float32)
    out[mask] = (1 - opacity) * out[mask] + opacity * texture[mask]
    return out, mask


KINDS = {"cut_paste": _cut_paste, "noise_blend": _noise_blend}


def _draw(config: ExperimentConfig, category: str, train: list[Sample], validation: list[Sample],
          folder: Path) -> list[Anomaly]:
    settings = config.validation_anomalies
    # Drawn from what names the data, not from the key: the key hashes file times, and a copy of
    # the data (a new checkout, cp without -p) must give the same set, or every validation score,
    # threshold and choice made on it would change with the copy.
    names = stable_hash([category, [s.sample_id for s in train], [s.sample_id for s in validation]])
    anomalies = []
    for index in range(settings.count):
        rng = np.random.default_rng([settings.seed, index, int(names[:8], 16)])
        target = validation[index % len(validation)]
        kind = settings.kinds[index % len(settings.kinds)]
        image = np.asarray(read_rgb(target.path))
        others = [s for s in train if s.path != target.path] or train
        source = np.asarray(read_rgb(others[int(rng.integers(len(others)))].path))
        fraction = rng.uniform(*settings.area)
        pixels, mask = KINDS[kind](image, source, rng, fraction * image.shape[0] * image.shape[1])
        name = f"{index:03d}_{kind}"
        anomaly = Anomaly(folder / f"{name}.png", folder / f"{name}_mask.png", target, kind)
        for path, picture in ((anomaly.image, Image.fromarray(np.rint(pixels).astype(np.uint8))),
                              (anomaly.mask, Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)))):
            with atomic_path(path) as tmp:
                picture.save(tmp, format="PNG")
        anomalies.append(anomaly)
    return anomalies


def _intact(folder: Path, key: str, validation: list[Sample]) -> list[Anomaly] | None:
    """The set the manifest lists, when it is current and every file has its size; else None."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    by_id = {sample.sample_id: sample for sample in validation}
    anomalies = []
    for entry in manifest.get("anomalies", []) if manifest.get("key") == key else [None]:
        if entry is None or entry["source"] not in by_id:
            return None
        anomaly = Anomaly(folder / entry["image"], folder / entry["mask"], by_id[entry["source"]], entry["kind"])
        for file, size in ((anomaly.image, entry["image_bytes"]), (anomaly.mask, entry["mask_bytes"])):
            if not file.is_file() or file.stat().st_size != size:
                return None
        anomalies.append(anomaly)
    return anomalies


def ensure_validation_anomalies(config: ExperimentConfig, category: str) -> AnomalySet:
    """The category's synthetic-anomaly validation set, drawn and written when it is not on disk
    (under a lock: of two trials that need it, one draws it, the other reads it)."""
    with label_free():  # whoever calls, this reads train and validation images only
        data = load_category(config, category)
    train, validation = data.samples("train"), data.samples("validation")
    if not validation or not train:
        raise DataError(f"{data.root}: the synthetic-anomaly validation set needs validation and training images "
                        f"({len(validation)} and {len(train)} found)")
    key = anomaly_set_key(config, category)
    folder = anomaly_set_dir(config, category)
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(folder.parent / f".{key}.lock"):
        anomalies = _intact(folder, key, validation)
        if anomalies is None:
            anomalies = _draw(config, category, train, validation, folder)
            atomic_write_json(folder / MANIFEST, {"key": key, "version": GENERATOR_VERSION, "category": category,
                                                  "anomalies": [{"image": a.image.name, "mask": a.mask.name,
                                                                 "source": a.source.sample_id, "kind": a.kind,
                                                                 "image_bytes": a.image.stat().st_size,
                                                                 "mask_bytes": a.mask.stat().st_size}
                                                                for a in anomalies]})
    return AnomalySet(folder, key, anomalies, validation)
