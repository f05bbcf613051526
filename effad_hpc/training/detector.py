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
from effad_hpc.models import AnomalyDetector
from effad_hpc.training.artifacts import BEST_MODEL, load_state
from effad_hpc.training.registry import completed_stage, recipe, stage_folder
from effad_hpc.utils.device import autocast


def load_detector(config: ExperimentConfig, model_name: str, category: str, device: torch.device) -> AnomalyDetector:
    """The trained model of this config and category with its backbone, in eval mode on ``device``."""
    model_recipe = recipe(model_name)
    final = model_recipe.stages[-1]
    folder = stage_folder(config, category, final)
    if completed_stage(config, final, category, verify=True) is None:
        raise CheckpointError(f"{folder}: {model_name} is not trained for this config; run "
                              f"`effad-hpc train --model {model_name} --category {category}` first")
    inputs = model_recipe.inputs(config)
    state = load_state(folder / BEST_MODEL)
    if inputs.backbone is None:
        model = model_recipe.build(config, 3, inputs.image_size, state)
        extractor = None
    else:
        backbone = build_backbone(inputs.backbone)
        layers = {layer.name: layer for layer in backbone.layers}
        channels = sum(layers[name].channels for name in inputs.layers)
        sizes = [layers[name].map_size(inputs.image_size) for name in inputs.layers]
        map_size = min(sizes) if inputs.preparation == "coarsest" else max(sizes)
        model = model_recipe.build(config, channels, map_size, state)
        extractor = backbone.extractor
    model.load_state_dict(state)
    detector = AnomalyDetector(model, inputs.image_size, config.inference.score, extractor, inputs.layers,
                               inputs.preparation)
    return detector.to(device).eval()


def predict(detector: AnomalyDetector, samples: Sequence[Sample], config: ExperimentConfig,
            device: torch.device) -> Iterator[tuple[list[int], dict]]:
    """Batched inference over samples: yields (sample indices, detector output on the CPU)."""
    loader = DataLoader(ImageDataset(samples, detector.image_size), batch_size=config.inference.batch_size,
                        num_workers=config.features.num_workers, pin_memory=device.type == "cuda")
    for batch in loader:
        with autocast(device, config.run.mixed_precision):
            output = detector(batch["image"].to(device, non_blocking=True))
        yield batch["index"].tolist(), {"maps": {k: v.float().cpu() for k, v in output["maps"].items()},
                                        "score": output["score"].float().cpu()}
