"""Feature batches for training: read from the HDF5 store, or computed by the frozen backbone.

Both sources take the same sample order and return the same (B, C, h, w) float32 tensors (the
requested backbone layers prepared into one tensor as the model reads them, see
:data:`effad_hpc.models.PREPARATIONS`), so a seed gives the same training run whichever source
a config picks, up to the store's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import DataLoader

from effad_hpc.config import BackboneConfig, BaselineConfig, ExperimentConfig
from effad_hpc.data import ImageDataset, load_category
from effad_hpc.data.images import IMAGE_SUFFIXES
from effad_hpc.data.mvtec import Sample
from effad_hpc.errors import ConfigError, DataError
from effad_hpc.features.backbones import Backbone, build_backbone, check_input_size
from effad_hpc.features.extract import split_keys, store_dir
from effad_hpc.features.store import FeatureDataset
from effad_hpc.models.feature_maps import PREPARATIONS, Preparation
from effad_hpc.utils.device import autocast


def _batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    order = [int(i) for i in order]
    return [order[lo:lo + batch_size] for lo in range(0, len(order), batch_size)]


class _PassOrder:
    """A batch sampler whose batches are set before each pass, so one DataLoader serves them all."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class FeatureSource:
    """``batches(split, order, batch_size)`` yields feature tensors on the device, in ``order``."""

    channels: int
    layer_channels: dict[str, int]
    map_size: int

    def __init__(self, config: ExperimentConfig, device: torch.device, layers: Sequence[str] | None = None,
                 preparation: Preparation = "coarsest"):
        self.config, self.device = config, device
        self.layers = list(layers or config.backbone.layers)
        self.preparation = preparation
        self._loaders: dict[int, DataLoader] = {}

    def _set_shape(self, layers: dict[str, tuple[int, int]]) -> None:
        """From {layer: (channels, map size)}: the prepared tensor's channels and grid side."""
        self.layer_channels = {name: layers[name][0] for name in self.layers}
        self.channels = sum(self.layer_channels.values())
        sizes = [layers[name][1] for name in self.layers]
        self.map_size = min(sizes) if self.preparation == "coarsest" else max(sizes)

    def size(self, split: str) -> int:
        raise NotImplementedError

    def batches(self, split: str, order: Sequence[int], batch_size: int) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def _loader(self, dataset, order: Sequence[int], batch_size: int) -> DataLoader:
        """One DataLoader per dataset for every pass: its worker processes (``features.num_workers``)
        live across epochs and validation passes instead of starting again for each."""
        loaders = self._loaders
        if id(dataset) not in loaders:
            workers = self.config.features.num_workers
            loaders[id(dataset)] = DataLoader(dataset, batch_sampler=_PassOrder(), num_workers=workers,
                                              persistent_workers=workers > 0, pin_memory=self.device.type == "cuda")
        loader = loaders[id(dataset)]
        loader.batch_sampler.batches = _batches(order, batch_size)  # read when the pass starts
        return loader


class StoredFeatures(FeatureSource):
    def __init__(self, config: ExperimentConfig, category: str, device: torch.device,
                 layers: Sequence[str] | None = None, preparation: Preparation = "coarsest"):
        super().__init__(config, device, layers, preparation)
        folder, keys = store_dir(config, category), split_keys(config, category)
        self.splits = {split: FeatureDataset(folder, split, self.layers, expected_key=keys[split])
                       for split in ("train", "validation")}
        self._set_shape({layer["name"]: (layer["channels"], layer["map_size"])
                         for layer in self.splits["train"].manifest["layers"]})

    def size(self, split: str) -> int:
        return len(self.splits[split])

    def batches(self, split: str, order: Sequence[int], batch_size: int) -> Iterator[torch.Tensor]:
        for batch in self._loader(self.splits[split], order, batch_size):
            features = PREPARATIONS[self.preparation](batch["features"], self.layers)
            yield features.float().to(self.device, non_blocking=True)


class BackboneFeatures:
    """The frozen backbone (always in eval mode) as a function: images in [0, 1] -> prepared features,
    computed as extraction computes the stored ones (:meth:`FeatureExtractor.optimize`,
    ``inference.channels_last``) so that training on either source gives the same model."""

    def __init__(self, config: ExperimentConfig, device: torch.device, backbone: Backbone | None = None,
                 layers: Sequence[str] | None = None, preparation: Preparation = "coarsest"):
        self.backbone = backbone or build_backbone(config.backbone)
        self.backbone.extractor.to(device).optimize(config.inference.channels_last)
        self.layers, self.preparation = list(layers or config.backbone.layers), preparation
        self.device, self.precision = device, config.run.precision

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(self.device, self.precision):
            features = self.backbone.extractor(images.to(self.device, non_blocking=True))
        return PREPARATIONS[self.preparation]({name: f.float().contiguous() for name, f in features.items()},
                                              self.layers)


def _image_size_key(config: ExperimentConfig, size: int) -> str:
    """The config key that set ``size``: only a baseline passes a size of its own (``<section>.image_size``)."""
    own = [f"{name}.image_size" for name, section in config
           if isinstance(section, BaselineConfig) and section.image_size == size]
    return " / ".join(own) if own and size != config.data.image_size else "data.image_size"


class ComputedFeatures(FeatureSource):
    """Features computed by the frozen backbone on every batch; by default the config's backbone at
    ``data.image_size``, or another ``backbone`` config at ``image_size`` (a baseline's own)."""

    def __init__(self, config: ExperimentConfig, category: str, device: torch.device,
                 layers: Sequence[str] | None = None, preparation: Preparation = "coarsest",
                 backbone: BackboneConfig | None = None, image_size: int | None = None):
        super().__init__(config, device, layers or (backbone.layers if backbone else None), preparation)
        data = load_category(config, category)
        size = image_size or config.data.image_size
        self.splits = {split: ImageDataset(data.samples(split), size) for split in ("train", "validation")}
        self.compute = BackboneFeatures(config, device, build_backbone(backbone) if backbone else None,
                                        layers=self.layers, preparation=preparation)
        # SPADE's global layer (the last of pyramid_global) is pooled to one vector: its grid may be small.
        mapped = self.layers[:-1] if preparation == "pyramid_global" else self.layers
        check_input_size([layer for layer in self.compute.backbone.layers if layer.name in mapped], size,
                         _image_size_key(config, size))
        self._set_shape({layer.name: (layer.channels, layer.map_size(size)) for layer in self.compute.backbone.layers})

    def size(self, split: str) -> int:
        return len(self.splits[split])

    def batches(self, split: str, order: Sequence[int], batch_size: int) -> Iterator[torch.Tensor]:
        for batch in self._loader(self.splits[split], order, batch_size):
            yield self.compute(batch["image"])


def open_source(config: ExperimentConfig, category: str, kind: str, device: torch.device,
                layers: Sequence[str] | None = None, preparation: Preparation = "coarsest",
                backbone: BackboneConfig | None = None, image_size: int | None = None) -> FeatureSource:
    """The stored features (the config's backbone at ``data.image_size``) or computed ones."""
    if kind == "stored":
        return StoredFeatures(config, category, device, layers, preparation)
    return ComputedFeatures(config, category, device, layers, preparation, backbone, image_size)


def image_folder(folder: Path, key: str, pattern: str = "**/*") -> list[Path]:
    """The image files under ``folder`` that match ``pattern``, sorted; ``key`` names the config key in errors."""
    if not folder.is_dir():
        raise ConfigError(f"{key}: {folder} is not a folder")
    paths = sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"{folder}: no images matching {pattern!r} (suffixes {', '.join(IMAGE_SUFFIXES)}) for {key}")
    return paths


def image_samples(paths: Sequence[Path], prefix: str) -> list[Sample]:
    return [Sample(f"{prefix}/{i}", path, "train", "good") for i, path in enumerate(paths)]


def penalty_folder(config: ExperimentConfig, section: Literal["student", "efficientad"]) -> tuple[Path, str] | None:
    """The image folder of ``<section>``'s penalty and the config key that named it, or None when
    the penalty is switched off or has no folder. A folder that is not there is an error that says
    how to switch the penalty off: the thesis configs name a placeholder ``imagenet``."""
    folder = getattr(config, section).penalty_folder()
    if folder is None:
        return None
    from_imagenet = folder == config.imagenet
    key = "imagenet" if from_imagenet else f"{section}.penalty_images"
    if not folder.is_dir():
        switch = "student.penalty=false efficientad.penalty=false" if from_imagenet else f"{section}.penalty=false"
        raise ConfigError(f"{key}: {folder} is not a folder: set it to an ImageNet-like image folder, "
                          f"or switch the penalty off with {switch}")
    return folder, key


class PenaltyImages:
    """Random images from an ImageNet-like folder (EfficientAD's penalty), optionally turned into
    backbone features by ``transform``."""

    def __init__(self, folder: Path, key: str, image_size: int,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.images = ImageDataset(image_samples(image_folder(folder, key), "penalty"), image_size)
        self.transform = transform

    def batch(self, generator: torch.Generator, batch_size: int) -> torch.Tensor:
        picks = torch.randint(len(self.images), (batch_size,), generator=generator).tolist()
        images = torch.stack([self.images[i]["image"] for i in picks])
        return self.transform(images) if self.transform else images
