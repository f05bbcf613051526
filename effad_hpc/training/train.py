"""``train(config, model, category)``: extraction when a stage reads the store, then the model's stages."""

from __future__ import annotations

from collections.abc import Sequence

from effad_hpc.config import ExperimentConfig
from effad_hpc.data import SPLITS, load_category, reads_test_split
from effad_hpc.data.mvtec import check_ground_truth
from effad_hpc.errors import ConfigError
from effad_hpc.features.extract import extract_category
from effad_hpc.training.artifacts import StageRecord
from effad_hpc.training.registry import STAGES, recipe, run_stage


def train(config: ExperimentConfig, model: str, category: str, stages: Sequence[str] | None = None,
          show_progress: bool = True) -> list[StageRecord]:
    """Run (or resume, or skip when complete) the stages of ``model`` for one category. Inside
    :func:`~effad_hpc.data.label_free` (a sweep trial) no test file is read: no ground-truth
    check, and only the train and validation features are extracted."""
    order = recipe(model).stages
    for name in stages or ():
        if name not in order:
            raise ConfigError(f"--stage {name!r}: {model} has the stages {', '.join(order)}")
    todo = [name for name in order if not stages or name in stages]
    if reads_test_split():  # a bad mask must stop the run before training, not after
        check_ground_truth(load_category(config, category))
    if any(STAGES[name].uses_store(config) for name in todo):
        extract_category(config, category, show_progress=show_progress,
                         splits=SPLITS if reads_test_split() else ("train", "validation"))
    return [run_stage(config, name, category, show_progress) for name in todo]
