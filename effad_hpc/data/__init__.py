"""Data sets on disk: MVTec AD / LOCO readers, a torch Dataset, and the synthetic generator."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from effad_hpc.config import ExperimentConfig, stable_hash
from effad_hpc.data.dataset import ImageDataset, resize_image
from effad_hpc.data.fingerprint import split_fingerprints
from effad_hpc.data.mvtec import (
    GOOD,
    SPLITS,
    CategoryData,
    DefectSpec,
    GroundTruthRegion,
    Sample,
    list_categories,
    read_category,
)

__all__ = [
    "GOOD", "SPLITS", "CategoryData", "DefectSpec", "GroundTruthRegion", "ImageDataset", "Sample",
    "categories_of", "category_fingerprints", "dataset_name", "ensure_dataset", "label_free", "list_categories",
    "load_category", "read_category", "reads_test_split", "resize_image",
]


def ensure_dataset(config: ExperimentConfig) -> None:
    """Generate the categories of a config's synthetic data set that are not on disk yet.

    Safe to call from concurrent jobs: each category appears atomically, once.
    """
    data = config.data
    if data.synthetic is None:
        return
    from effad_hpc.data.synthetic import generate

    layout = "ad" if data.layout == "mvtec_ad" else "loco"
    generate(layout, data.root, categories=data.categories, options=data.synthetic)


def dataset_name(config: ExperimentConfig) -> str:
    data = config.data
    if data.name:
        return data.name
    return f"synthetic_{data.root.name}" if data.synthetic is not None else data.root.name


def categories_of(config: ExperimentConfig) -> list[str]:
    """The categories a config runs on: its list, or every category folder under the root."""
    ensure_dataset(config)
    return list(config.data.categories) if config.data.categories else list_categories(config.data.root)


_label_free = False


@contextmanager
def label_free() -> Iterator[None]:
    """Inside this block :func:`load_category` indexes no test file and asking for the test split
    is an error: what a sweep trial runs under, so that no choice it makes can see a test label."""
    global _label_free
    outer, _label_free = _label_free, True
    try:
        yield
    finally:
        _label_free = outer


def reads_test_split() -> bool:
    """False inside :func:`label_free`."""
    return not _label_free


def load_category(config: ExperimentConfig, name: str) -> CategoryData:
    ensure_dataset(config)
    return read_category(config.data.root / name, config.data.layout,
                         config.data.validation_fraction, config.seed, with_test=not _label_free)


def category_fingerprints(config: ExperimentConfig, name: str) -> dict[str, str]:
    """``{part: fingerprint}`` of a category's files (the images of each split, and the ground
    truth; see :func:`split_fingerprints`), with the settings that split them: what completion
    keys hash, so that a changed data set recomputes what reads it and nothing else."""
    ensure_dataset(config)
    data = config.data
    # The category's name, not its path: a data set moved with its file times keeps every key.
    splitting = {"layout": data.layout, "category": name,
                 "validation_fraction": data.validation_fraction, "seed": config.seed}
    return {split: stable_hash([fingerprint, splitting])
            for split, fingerprint in split_fingerprints(data.root / name, data.layout).items()}
