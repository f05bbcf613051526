"""Stages and model recipes by name: what ``effad-hpc train --model NAME`` runs, in which order.

A :class:`Stage` is a function of (config, category) that writes its artifacts under
``train/<category>/<stage>/``; its key hashes every config value that changes its result plus
the keys of the stages it builds on, so a changed input retrains it and everything downstream.
A stage marked ``shared`` (EfficientAD's teacher distillation) runs once per run, under
``train/_shared/<stage>/``, and every category's stages that need it read that one result.
A :class:`ModelRecipe` names the stages of a model, what the model reads (images, or backbone
layers prepared in a named way) and how a config and a trained state build the pure torch model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from effad_hpc.config import PAPER_METHOD, BackboneConfig, ExperimentConfig, stable_hash
from effad_hpc.errors import ConfigError
from effad_hpc.data import category_fingerprints
from effad_hpc.features.extract import feature_key
from effad_hpc.models.feature_maps import Preparation
from effad_hpc.training.artifacts import SHARED, StageRecord, completed_record, stage_dir
from effad_hpc.utils.atomic import exclusive_lock, remove_stale_temps


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
    reads_backbone: bool = True
    """Whether the stage reads ``backbone`` features (then their key is part of the stage key)."""
    shared: bool = False
    """Runs once per run for every category (its folder is ``train/_shared/<stage>``)."""
    budget: Budget | None = None
    """Epochs or steps the config trains it for, against its paper's; None for fitted stages."""


@dataclass(frozen=True)
class Budget:
    """A trained stage's length: ``configured(config, train_images)`` epochs or steps on a category
    of that many training images (None when the config does not train it, e.g. a user's teacher
    file), and ``paper``, what its paper trained."""

    configured: Callable[[ExperimentConfig, int], int | None]
    paper: int
    unit: str = "epochs"


@dataclass(frozen=True)
class ModelInputs:
    """What a model reads: images of ``image_size`` (no ``backbone``), or the backbone's ``layers``
    at ``image_size`` prepared into one tensor as ``preparation`` names."""

    image_size: int
    backbone: BackboneConfig | None = None
    layers: tuple[str, ...] = ()
    preparation: Preparation = "coarsest"


def backbone_inputs(config: ExperimentConfig) -> ModelInputs:
    """The configured backbone and layers on the grid of ``teacher.feature_grid`` (the AST family)."""
    return ModelInputs(config.data.image_size, config.backbone, tuple(config.backbone.layers),
                       config.teacher.feature_grid)


@dataclass(frozen=True)
class ModelRecipe:
    name: str
    stages: tuple[str, ...]
    """In order; the last one writes the model that inference loads."""
    build: Callable[[ExperimentConfig, int, int, dict], nn.Module]
    """``build(config, feature_channels, map_size, state)``: the pure torch model that ``state``
    (the final stage's state dict, which the caller then loads) belongs to."""
    inputs: Callable[[ExperimentConfig], ModelInputs] = backbone_inputs
    variant: Callable[[ExperimentConfig], str] = lambda config: PAPER_METHOD
    """Which form of the method the config trains: ``paper``, or the switches that change it (the
    leaderboard's ``variant`` column, so that a changed method is never read as the paper's)."""



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


def stage_key(config: ExperimentConfig, name: str, category: str) -> str:
    """Hash of every input of stage ``name`` for ``category``: its settings, the features it
    reads, the fingerprints of the category's train and validation files (every per-category
    stage trains on one and selects or calibrates on the other) and its upstream stages' keys.
    A shared stage's data (distillation images) is part of its settings."""
    stage = STAGES[name]
    backbone = {"features": feature_key(config), "layers": config.backbone.layers} if stage.reads_backbone else {}
    data = {}
    if not stage.shared:
        fingerprints = category_fingerprints(config, category)
        data = {"data": {split: fingerprints[split] for split in ("train", "validation")}}
    return stable_hash({
        "stage": name, "seed": config.seed, **backbone, **data, "settings": stage.settings(config),
        "upstream": {need: stage_key(config, need, category) for need in stage.needs},
    })


def stage_folder(config: ExperimentConfig, category: str, name: str) -> Path:
    """Where stage ``name`` of ``category`` keeps its files (the ``_shared`` folder for a shared
    stage): in the run folder, or in ``run.shared_dir`` under the stage key."""
    owner = SHARED if STAGES[name].shared else category
    if config.run.shared_dir is not None:
        return config.run.shared_dir / "train" / owner / name / stage_key(config, name, category)
    return stage_dir(config, owner, name)


def completed_stage(config: ExperimentConfig, name: str, category: str, verify: bool = False) -> StageRecord | None:
    """The record of stage ``name`` for ``category`` when it finished with the current inputs and
    its model is intact (size; with ``verify`` also the checksum), else None."""
    return completed_record(stage_folder(config, category, name), stage_key(config, name, category), verify)


def run_stage(config: ExperimentConfig, name: str, category: str, show_progress: bool = True) -> StageRecord:
    """Run (or resume, or skip when complete) one stage, under the lock of its folder: of two
    processes that start the same stage (two ``train`` commands, or every category's job reaching
    a shared stage) one trains it, the other waits and then finds it complete."""
    stage = STAGES[name]
    folder = stage_folder(config, category, name)
    with exclusive_lock(folder.parent / f".{folder.name}.lock"):
        remove_stale_temps(folder, "*")  # under the lock, no writer of this folder is alive
        return stage.run(config, SHARED if stage.shared else category, show_progress=show_progress)
