"""Feature batches for training: read from the HDF5 store, or computed by the frozen backbone.

Both sources take the same sample order and return the same (B, C, h, w) float32 tensors (the
configured backbone layers on one grid, see :func:`effad_hpc.models.concat_layers`), so a seed
gives the same training run whichever source a config picks, up to the store's dtype.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from effad_hpc.config import ExperimentConfig
from effad_hpc.data import ImageDataset, load_category
from effad_hpc.data.images import IMAGE_SUFFIXES
from effad_hpc.data.mvtec import Sample
from effad_hpc.errors import ConfigError, DataError
from effad_hpc.features.backbones import Backbone, build_backbone
from effad_hpc.features.extract import feature_key, store_dir
from effad_hpc.features.store import FeatureDataset
from effad_hpc.models.feature_maps import concat_layers
from effad_hpc.utils.device import autocast


def _batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    order = [int(i) for i in order]
    return [order[lo:lo + batch_size] for lo in range(0, len(order), batch_size)]


class FeatureSource:
    """``batches(split, order, batch_size)`` yields feature tensors on the device, in ``order``."""

    channels: int
    map_size: int

    def __init__(self, config: ExperimentConfig, device: torch.device):
        self.config, self.device = config, device
        self.layers = list(config.backbone.layers)

    def size(self, split: str) -> int:
        raise NotImplementedError

    def batches(self, split: str, order: Sequence[int], batch_size: int) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def _loader(self, dataset, order: Sequence[int], batch_size: int) -> DataLoader:
        return DataLoader(dataset, batch_sampler=_batches(order, batch_size),
                          num_workers=self.config.features.num_workers, pin_memory=self.device.type == "cuda")


class StoredFeatures(FeatureSource):
    def __init__(self, config: ExperimentConfig, category: str, device: torch.device):
        super().__init__(config, device)
        folder, key = store_dir(config, category), feature_key(config)
        self.splits = {split: FeatureDataset(folder, split, self.layers, expected_key=key)
                       for split in ("train", "validation")}
        meta = {layer["name"]: layer for layer in self.splits["train"].manifest["layers"]}
        self.channels = sum(meta[name]["channels"] for name in self.layers)
        self.map_size = min(meta[name]["map_size"] for name in self.layers)

    def size(self, split: str) -> int:
        return len(self.splits[split])

    def batches(self, split: str, order: Sequence[int], batch_size: int) -> Iterator[torch.Tensor]:
        for batch in self._loader(self.splits[split], order, batch_size):
            yield concat_layers(batch["features"], self.layers).to(self.device, non_blocking=True)


class BackboneFeatures:
    """The frozen backbone (always in eval mode) as a function: images in [0, 1] -> features."""

    def __init__(self, config: ExperimentConfig, device: torch.device, backbone: Backbone | None = None):
        self.backbone = backbone or build_backbone(config.backbone)
        self.backbone.extractor.to(device)
        self.layers, self.device, self.mixed_precision = list(config.backbone.layers), device, config.run.mixed_precision

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(self.device, self.mixed_precision):
            features = self.backbone.extractor(images.to(self.device, non_blocking=True))
        return concat_layers({name: f.float() for name, f in features.items()}, self.layers)


class ComputedFeatures(FeatureSource):
    def __init__(self, config: ExperimentConfig, category: str, device: torch.device):
        super().__init__(config, device)
        data = load_category(config, category)
        size = config.data.image_size
        self.splits = {split: ImageDataset(data.samples(split), size) for split in ("train", "validation")}
        self.compute = BackboneFeatures(config, device)
        layers = {layer.name: layer for layer in self.compute.backbone.layers}
        self.channels = sum(layers[name].channels for name in self.layers)
        self.map_size = min(layers[name].map_size(size) for name in self.layers)

    def size(self, split: str) -> int:
        return len(self.splits[split])

    def batches(self, split: str, order: Sequence[int], batch_size: int) -> Iterator[torch.Tensor]:
        for batch in self._loader(self.splits[split], order, batch_size):
            yield self.compute(batch["image"])


def open_source(config: ExperimentConfig, category: str, kind: str, device: torch.device) -> FeatureSource:
    if kind == "stored":
        return StoredFeatures(config, category, device)
    return ComputedFeatures(config, category, device)


class PenaltyImages:
    """Backbone features of random images from an ImageNet-like folder (EfficientAD's penalty)."""

    def __init__(self, folder: Path, config: ExperimentConfig, compute: BackboneFeatures):
        if not folder.is_dir():
            raise ConfigError(f"student.penalty_images: {folder} is not a folder")
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise DataError(f"{folder}: no images (suffixes {', '.join(IMAGE_SUFFIXES)}) for student.penalty_images")
        self.images = ImageDataset([Sample(f"penalty/{i}", path, "train", "good") for i, path in enumerate(paths)],
                                   config.data.image_size)
        self.compute = compute

    def batch(self, generator: torch.Generator, batch_size: int) -> torch.Tensor:
        picks = torch.randint(len(self.images), (batch_size,), generator=generator).tolist()
        return self.compute(torch.stack([self.images[i]["image"] for i in picks]))
