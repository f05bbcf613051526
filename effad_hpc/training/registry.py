"""Stages and model recipes by name: what ``effad-hpc train --model NAME`` runs, in which order.

A :class:`Stage` is a function of (config, category) that writes its artifacts under
``train/<category>/<stage>/``; its key hashes every config value that changes its result plus
the keys of the stages it builds on, so a changed input retrains it and everything downstream.
A :class:`ModelRecipe` names the stages of a model and turns a config into the keyword
arguments of the pure torch model (:func:`effad_hpc.models.build_model`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from effad_hpc.config import ExperimentConfig, stable_hash
from effad_hpc.errors import ConfigError
from effad_hpc.features.extract import feature_key
from effad_hpc.training.artifacts import StageRecord


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[..., StageRecord]
    """``run(config, category, show_progress=True) -> StageRecord``."""
    settings: Callable[[ExperimentConfig], dict]
    """The config values that change this stage's output."""
    needs: tuple[str, ...] = ()
    """Upstream stages whose artifacts this one reads."""
    uses_store: Callable[[ExperimentConfig], bool] = lambda config: True
    """Whether the stage reads the HDF5 feature store (then extraction must run first)."""


@dataclass(frozen=True)
class ModelRecipe:
    name: str
    stages: tuple[str, ...]
    """In order; the last one writes the model that inference loads."""
    kwargs: Callable[[ExperimentConfig, int, int], dict]
    """``kwargs(config, feature_channels, map_size)`` for ``build_model(name, **kwargs)``."""


STAGES: dict[str, Stage] = {}
MODELS: dict[str, ModelRecipe] = {}


def register_stage(stage: Stage) -> Stage:
    if stage.name in STAGES:
        raise ValueError(f"stage {stage.name!r} is registered twice")
    STAGES[stage.name] = stage
    return stage


def register_recipe(recipe: ModelRecipe) -> ModelRecipe:
    if recipe.name in MODELS:
        raise ValueError(f"model {recipe.name!r} is registered twice")
    MODELS[recipe.name] = recipe
    return recipe


def recipe(name: str) -> ModelRecipe:
    if name not in MODELS:
        raise ConfigError(f"model {name!r} is not known; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def stage_key(config: ExperimentConfig, name: str) -> str:
    stage = STAGES[name]
    return stable_hash({
        "stage": name, "seed": config.seed, "features": feature_key(config), "layers": config.backbone.layers,
        "settings": stage.settings(config), "upstream": {need: stage_key(config, need) for need in stage.needs},
    })
