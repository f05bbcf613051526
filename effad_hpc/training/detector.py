"""Trained detectors for inference: a model's final stage loaded onto the backbone it was trained on."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from effad_hpc.config import ExperimentConfig
from effad_hpc.data import ImageDataset
from effad_hpc.data.mvtec import Sample
from effad_hpc.errors import CheckpointError, ConfigError
from effad_hpc.features.backbones import FeatureExtractor, build_backbone
from effad_hpc.models import AnomalyDetector
from effad_hpc.training.artifacts import BEST_MODEL, load_state
from effad_hpc.training.registry import completed_stage, recipe, stage_folder
from effad_hpc.utils.device import autocast
from effad_hpc.utils.memory import reused_memory


@dataclass(frozen=True)
class ModelInput:
    """What a model reads, built: the backbone's extractor (None for a model that reads images)
    and the channels and grid size of the tensor it is given."""

    extractor: FeatureExtractor | None
    channels: int
    map_size: int


def model_input(config: ExperimentConfig, model_name: str) -> ModelInput:
    inputs = recipe(model_name).inputs(config)
    if inputs.backbone is None:
        return ModelInput(None, 3, inputs.image_size)
    backbone = build_backbone(inputs.backbone)
    layers = {layer.name: layer for layer in backbone.layers}
    sizes = [layers[name].map_size(inputs.image_size) for name in inputs.layers]
    return ModelInput(backbone.extractor, sum(layers[name].channels for name in inputs.layers),
                      min(sizes) if inputs.preparation == "coarsest" else max(sizes))


def as_detector(config: ExperimentConfig, model_name: str, model: nn.Module,
                extractor: FeatureExtractor | None) -> AnomalyDetector:
    """``model`` (trained, or in training) with the extractor of its inputs, as a detector; the
    detector is in eval mode but shares ``model``, so the caller restores a training model's mode."""
    inputs = recipe(model_name).inputs(config)
    return AnomalyDetector(model, inputs.image_size, config.inference.score, extractor, inputs.layers,
                           inputs.preparation)


def load_detector(config: ExperimentConfig, model_name: str, category: str, device: torch.device,
                  optimized: bool = True) -> AnomalyDetector:
    """The trained model of this config and category with its backbone, in eval mode on ``device``:
    the one home for loading a trained detector (evaluation, sweeps, export). ``optimized``: in
    the layout and compiled as ``inference`` asks (export traces the plain modules instead)."""
    final = recipe(model_name).stages[-1]
    folder = stage_folder(config, category, final)
    if completed_stage(config, final, category, verify=True) is None:
        raise CheckpointError(f"{folder}: {model_name} is not trained for this config; run "
                              f"`effad-hpc train --model {model_name} --category {category}` first")
    state = load_state(folder / BEST_MODEL)
    built = model_input(config, model_name)
    model = recipe(model_name).build(config, built.channels, built.map_size, state)
    model.load_state_dict(state)
    detector = as_detector(config, model_name, model, built.extractor).to(device).eval()
    if optimized:
        detector.optimize(config.inference.channels_last, config.inference.compile)
    return detector


def untrained_detector(config: ExperimentConfig, model_name: str, train_images: int = 200,
                       device: torch.device | str = "cpu") -> AnomalyDetector:
    """A detector of this config's sizes with untrained weights, and memory (PatchCore's bank,
    PaDiM's statistics, SPADE's gallery) sized for ``train_images`` training images and filled
    with random values: for timing, memory and export checks, never for scores."""
    built = model_input(config, model_name)
    generator = torch.Generator().manual_seed(config.seed)
    memory = {  # what each baseline's build reads off a trained state: the sizes of its memory
        "patchcore": lambda: {"bank": torch.randn(max(1, round(config.patchcore.coreset_ratio * train_images
                                                                 * built.map_size ** 2)), built.channels,
                                                  generator=generator)},
        "padim": lambda: {"channel_index": torch.arange(min(config.padim.dims, built.channels))},
        "spade": lambda: {"gallery": torch.randn(train_images, built.channels, built.map_size, built.map_size,
                                                 generator=generator).to(getattr(torch, config.spade.gallery_dtype))},
    }
    if model_name == "spade" and config.spade.global_layer is not None:
        raise ConfigError("untrained_detector: SPADE with a global_layer is not supported; time it without one")
    state = memory.get(model_name, dict)()
    with torch.random.fork_rng(devices=[]):  # the same weights for the same config, the caller's RNG untouched
        torch.manual_seed(config.seed)
        model = recipe(model_name).build(config, built.channels, built.map_size, state)
    model.load_state_dict(state, strict=False)
    return as_detector(config, model_name, model, built.extractor).to(device).eval()


def predict(detector: AnomalyDetector, samples: Sequence[Sample], config: ExperimentConfig,
            device: torch.device) -> Iterator[tuple[list[int], dict]]:
    """Batched inference over samples: yields (sample indices, detector output on the CPU). Until
    the iteration ends, freed memory is kept for the next batch (:func:`reused_memory`), also for
    what the caller does between batches."""
    loader = DataLoader(ImageDataset(samples, detector.image_size), batch_size=config.inference.batch_size,
                        num_workers=config.features.num_workers, pin_memory=device.type == "cuda")
    with reused_memory():
        for batch in loader:
            with torch.inference_mode(), autocast(device, config.run.precision):
                output = detector(batch["image"].to(device, non_blocking=True))
            yield batch["index"].tolist(), {"maps": {k: v.float().cpu() for k, v in output["maps"].items()},
                                            "score": output["score"].float().cpu()}
