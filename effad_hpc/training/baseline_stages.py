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
from dataclasses import replace

import torch
from torch import nn

from effad_hpc.config import BaselineConfig, ExperimentConfig
from effad_hpc.errors import DataError
from effad_hpc.features.weights import checkpoint_identity
from effad_hpc.models import SPADE, PaDiM, PatchCore, build_model, image_scores
from effad_hpc.models.feature_maps import Preparation
from effad_hpc.training.artifacts import (
    BEST_MODEL,
    StageRecord,
    complete_stage,
    completed_record,
    save_state,
)
from effad_hpc.training.hooks import Validated, announce
from effad_hpc.training.registry import (
    ModelInputs,
    ModelRecipe,
    Stage,
    register_recipe,
    register_stage,
    stage_folder,
    stage_key,
)
from effad_hpc.training.sources import FeatureSource, open_source
from effad_hpc.utils.device import resolve_device

Fit = Callable[[ExperimentConfig, FeatureSource, Iterable[torch.Tensor]], nn.Module]
"""``fit(config, source, training batches)``: the fitted model."""
Inputs = Callable[[ExperimentConfig], ModelInputs]


def _validation_score(model: nn.Module, source: FeatureSource, batch_size: int) -> float:
    scores = []
    with torch.no_grad():
        for features in source.batches("validation", range(source.size("validation")), batch_size):
            maps = model.maps(features)
            own = model.image_scores(features, maps)
            scores.append(own if own is not None else image_scores(maps["combined"]))
    return float(torch.cat(scores).mean()) if scores else float("nan")


def _fit_stage(name: str, inputs_of: Inputs, fit: Fit) -> Callable[..., StageRecord]:
    def run(config: ExperimentConfig, category: str, show_progress: bool = True) -> StageRecord:
        folder, key = stage_folder(config, category, name), stage_key(config, name, category)
        if (done := completed_record(folder, key, verify=True)) is not None:
            return done
        settings: BaselineConfig = getattr(config, name)
        inputs = inputs_of(config)
        device = resolve_device(config.run.device, config.run.precision)
        source = open_source(config, category, settings.feature_source, device, inputs.layers, inputs.preparation,
                             inputs.backbone, inputs.image_size)
        if source.size("train") == 0:
            raise DataError(f"{category}: the train split is empty; {name} needs good training images")
        started = time.monotonic()
        batches = source.batches("train", range(source.size("train")), settings.batch_size)
        model = fit(config, source, batches).to(device).eval()
        seconds = time.monotonic() - started
        validation = _validation_score(model, source, settings.batch_size)
        announce(Validated(name, category, 1, 1, {"validation": validation}, model))
        save_state({k: v.cpu() for k, v in model.state_dict().items()}, folder / BEST_MODEL)
        return complete_stage(folder, stage=name, category=category, key=key, best_epoch=1, final_epoch=1,
                              best_validation=validation, stopped_early=False, train_seconds=round(seconds, 3))

    return run


def _fit_patchcore(config: ExperimentConfig, _source: FeatureSource, batches: Iterable[torch.Tensor]) -> nn.Module:
    p = config.patchcore
    return PatchCore.fit(batches, p.coreset_ratio, p.projection_dim, p.num_neighbors, config.seed)


def _fit_padim(config: ExperimentConfig, _source: FeatureSource, batches: Iterable[torch.Tensor]) -> nn.Module:
    return PaDiM.fit(batches, config.padim.dims, config.padim.regularization, config.seed)


def _fit_spade(config: ExperimentConfig, source: FeatureSource, batches: Iterable[torch.Tensor]) -> nn.Module:
    s = config.spade
    global_channels = None if s.global_layer is None else source.layer_channels[s.global_layer]
    return SPADE.fit(batches, s.image_neighbors, s.pixel_neighbors, global_channels, getattr(torch, s.gallery_dtype))


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
                       pixel_neighbors=config.spade.pixel_neighbors, smoothing_sigma=config.spade.smoothing_sigma,
                       global_channels=None if config.spade.global_layer is None else state["global_features"].shape[1],
                       gallery_dtype=gallery.dtype)


def _inputs(name: str, preparation: Preparation) -> Inputs:
    def inputs(config: ExperimentConfig) -> ModelInputs:
        section: BaselineConfig = getattr(config, name)
        backbone = config.backbone_or_main(section.backbone)
        layers = list(section.layers or backbone.layers)
        # the extractor runs the backbone up to the deepest of exactly these layers
        return ModelInputs(section.image_size or config.data.image_size, backbone.model_copy(update={"layers": layers}),
                           tuple(layers), preparation)

    return inputs


def _spade_inputs(config: ExperimentConfig) -> ModelInputs:
    """SPADE's pixel pyramid, followed by its ``global_layer`` (prepared as ``pyramid_global``) when it names one."""
    pyramid = _inputs("spade", "finest")(config)
    if config.spade.global_layer is None:
        return pyramid
    layers = [*pyramid.layers, config.spade.global_layer]
    return replace(pyramid, backbone=pyramid.backbone.model_copy(update={"layers": layers}), layers=tuple(layers),
                   preparation="pyramid_global")


def _settings(name: str, inputs_of: Inputs) -> Callable[[ExperimentConfig], dict]:
    def settings(config: ExperimentConfig) -> dict:
        inputs = inputs_of(config)
        values = getattr(config, name).model_dump(mode="json", exclude={"feature_source", "batch_size"})
        return values | {"backbone": checkpoint_identity(inputs.backbone), "image_size": inputs.image_size,
                         "layers": list(inputs.layers)}

    return settings


for _name, _inputs_of, _fit, _build in (
        ("patchcore", _inputs("patchcore", "patches"), _fit_patchcore, _build_patchcore),
        ("padim", _inputs("padim", "finest"), _fit_padim, _build_padim),
        ("spade", _spade_inputs, _fit_spade, _build_spade)):
    register_stage(Stage(_name, _fit_stage(_name, _inputs_of, _fit), _settings(_name, _inputs_of),
                         uses_store=lambda config, name=_name: getattr(config, name).feature_source == "stored"))
    register_recipe(ModelRecipe(_name, (_name,), _build, _inputs_of))
