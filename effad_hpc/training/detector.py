"""Trained detectors for inference: a model's final stage loaded onto the backbone it was trained on."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from effad_hpc.config import ExperimentConfig
from effad_hpc.data import ImageDataset
from effad_hpc.data.mvtec import Sample
from effad_hpc.errors import CheckpointError
from effad_hpc.features.backbones import build_backbone
from effad_hpc.models import AnomalyDetector, build_model
from effad_hpc.training.artifacts import BEST_MODEL, completed_record, load_state, stage_dir
from effad_hpc.training.registry import recipe, stage_key
from effad_hpc.utils.device import autocast


def load_detector(config: ExperimentConfig, model_name: str, category: str, device: torch.device) -> AnomalyDetector:
    """The trained model of this config and category with its backbone, in eval mode on ``device``."""
    model_recipe = recipe(model_name)
    final = model_recipe.stages[-1]
    folder = stage_dir(config, category, final)
    if completed_record(folder, stage_key(config, final)) is None:
        raise CheckpointError(f"{folder}: {model_name} is not trained for this config; run "
                              f"`effad-hpc train --model {model_name} --category {category}` first")
    backbone = build_backbone(config.backbone)
    layers = {layer.name: layer for layer in backbone.layers}
    size = config.data.image_size
    channels = sum(layers[name].channels for name in config.backbone.layers)
    map_size = min(layers[name].map_size(size) for name in config.backbone.layers)
    model = build_model(model_name, **model_recipe.kwargs(config, channels, map_size))
    model.load_state_dict(load_state(folder / BEST_MODEL))
    detector = AnomalyDetector(backbone.extractor, model, config.backbone.layers, size, config.inference.score)
    return detector.to(device).eval()


def predict(detector: AnomalyDetector, samples: Sequence[Sample], config: ExperimentConfig,
            device: torch.device) -> Iterator[tuple[list[int], dict]]:
    """Batched inference over samples: yields (sample indices, detector output on the CPU)."""
    loader = DataLoader(ImageDataset(samples, config.data.image_size), batch_size=config.inference.batch_size,
                        num_workers=config.features.num_workers, pin_memory=device.type == "cuda")
    for batch in loader:
        with autocast(device, config.run.mixed_precision):
            output = detector(batch["image"].to(device, non_blocking=True))
        yield batch["index"].tolist(), {"maps": {k: v.float().cpu() for k, v in output["maps"].items()},
                                        "score": output["score"].float().cpu()}
