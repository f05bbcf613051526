"""Stages of the baselines PatchCore, PaDiM and SPADE: one pass over the training features fits
the model (a memory bank, Gaussians, a gallery), which is saved like a trained model.

Each baseline reads its own ``layers`` prepared its own way: from the feature store (the
config's backbone at ``data.image_size``), or computed on the fly, also by its own backbone at
its own image size (the papers' WideResNet-50 at 256 px, while the AST family reads B5 at 768
px). The stage record's ``best_validation`` is the mean image score of the validation split
(good images), a scale for comparing runs; nothing is selected on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from effad_hpc.config import BaselineConfig, ExperimentConfig
from effad_hpc.errors import DataError
from effad_hpc.models import SPADE, PaDiM, PatchCore, build_model, image_scores
from effad_hpc.models.feature_maps import Preparation
from effad_hpc.training.artifacts import (
    BEST_MODEL,
    StageRecord,
    complete_stage,
    completed_record,
    save_state,
    stage_dir,
)
from effad_hpc.training.registry import (
    ModelInputs,
    ModelRecipe,
    Stage,
    register_recipe,
    register_stage,
    stage_key,
)
from effad_hpc.training.sources import FeatureSource, open_source
from effad_hpc.utils.device import resolve_device

Fit = Callable[[ExperimentConfig, Iterable[torch.Tensor]], nn.Module]


def _validation_score(model: nn.Module, source: FeatureSource, batch_size: int) -> float:
    scores = []
    with torch.no_grad():
        for features in source.batches("validation", range(source.size("validation")), batch_size):
            maps = model.maps(features)
            own = model.image_scores(features, maps) if hasattr(model, "image_scores") else None
            scores.append(own if own is not None else image_scores(maps["combined"]))
    return float(torch.cat(scores).mean()) if scores else float("nan")


def _fit_stage(name: str, preparation: Preparation, fit: Fit) -> Callable[..., StageRecord]:
    def run(config: ExperimentConfig, category: str, show_progress: bool = True) -> StageRecord:
        folder, key = stage_dir(config, category, name), stage_key(config, name)
        if (done := completed_record(folder, key)) is not None:
            return done
        settings: BaselineConfig = getattr(config, name)
        inputs = _inputs(name, preparation)(config)
        device = resolve_device(config.run.device)
        source = open_source(config, category, settings.feature_source, device, inputs.layers, preparation,
                             inputs.backbone, inputs.image_size)
        if source.size("train") == 0:
            raise DataError(f"{category}: the train split is empty; {name} needs good training images")
        started = time.monotonic()
        model = fit(config, source.batches("train", range(source.size("train")), settings.batch_size)).to(device).eval()
        seconds = time.monotonic() - started
        save_state({k: v.cpu() for k, v in model.state_dict().items()}, folder / BEST_MODEL)
        return complete_stage(folder, stage=name, category=category, key=key, best_epoch=1, final_epoch=1,
                              best_validation=_validation_score(model, source, settings.batch_size),
                              stopped_early=False, train_seconds=round(seconds, 3))

    return run


def _fit_patchcore(config: ExperimentConfig, batches: Iterable[torch.Tensor]) -> nn.Module:
    p = config.patchcore
    return PatchCore.fit(batches, p.coreset_ratio, p.projection_dim, p.num_neighbors, config.seed)


def _fit_padim(config: ExperimentConfig, batches: Iterable[torch.Tensor]) -> nn.Module:
    return PaDiM.fit(batches, config.padim.dims, config.padim.regularization, config.seed)


def _fit_spade(config: ExperimentConfig, batches: Iterable[torch.Tensor]) -> nn.Module:
    return SPADE.fit(batches, config.spade.image_neighbors, config.spade.pixel_neighbors)


def _build_patchcore(config: ExperimentConfig, channels: int, _map_size: int, state: dict) -> nn.Module:
    return build_model("patchcore", channels=channels, bank_size=state["bank"].shape[0],
                       num_neighbors=config.patchcore.num_neighbors,
                       smoothing_sigma=config.patchcore.smoothing_sigma)


def _build_padim(config: ExperimentConfig, channels: int, map_size: int, state: dict) -> nn.Module:
    return build_model("padim", in_channels=channels, map_size=(map_size, map_size),
                       dims=state["channel_index"].numel(), seed=config.seed,
                       smoothing_sigma=config.padim.smoothing_sigma)


def _build_spade(config: ExperimentConfig, _channels: int, _map_size: int, state: dict) -> nn.Module:
    gallery = state["gallery"]
    return build_model("spade", gallery_size=gallery.shape[0], channels=gallery.shape[1],
                       map_size=tuple(gallery.shape[-2:]), image_neighbors=config.spade.image_neighbors,
                       pixel_neighbors=config.spade.pixel_neighbors, smoothing_sigma=config.spade.smoothing_sigma)


def _inputs(name: str, preparation: Preparation) -> Callable[[ExperimentConfig], ModelInputs]:
    def inputs(config: ExperimentConfig) -> ModelInputs:
        section: BaselineConfig = getattr(config, name)
        backbone = config.backbone_or_main(section.backbone)
        layers = list(section.layers or backbone.layers)
        # the extractor runs the backbone up to the deepest of exactly these layers
        return ModelInputs(section.image_size or config.data.image_size, backbone.model_copy(update={"layers": layers}),
                           tuple(layers), preparation)

    return inputs


def _settings(name: str, preparation: Preparation) -> Callable[[ExperimentConfig], dict]:
    def settings(config: ExperimentConfig) -> dict:
        inputs = _inputs(name, preparation)(config)
        values = getattr(config, name).model_dump(mode="json", exclude={"feature_source", "batch_size"})
        return values | {"backbone": inputs.backbone.identity(), "image_size": inputs.image_size,
                         "layers": list(inputs.layers)}

    return settings


for _name, _preparation, _fit, _build in (("patchcore", "patches", _fit_patchcore, _build_patchcore),
                                          ("padim", "finest", _fit_padim, _build_padim),
                                          ("spade", "finest", _fit_spade, _build_spade)):
    register_stage(Stage(_name, _fit_stage(_name, _preparation, _fit), _settings(_name, _preparation),
                         uses_store=lambda config, name=_name: getattr(config, name).feature_source == "stored"))
    register_recipe(ModelRecipe(_name, (_name,), _build, _inputs(_name, _preparation)))
