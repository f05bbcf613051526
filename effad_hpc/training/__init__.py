"""Training stages: functions of (config, category) that read features and write artifacts.

Importing this package registers the stages and model recipes: ``ast_stages`` (AST,
EfficientAD-AST), ``efficientad_stages`` (teacher distillation, EfficientAD-S/M) and
``baseline_stages`` (PatchCore, PaDiM, SPADE).
"""

from effad_hpc.training import ast_stages, baseline_stages, efficientad_stages  # noqa: F401  (registration)
from effad_hpc.training.artifacts import StageRecord, read_log, read_record, stage_dir
from effad_hpc.training.detector import load_detector, predict
from effad_hpc.training.registry import MODELS, STAGES, recipe, run_stage, stage_folder, stage_key
from effad_hpc.training.train import train

__all__ = [
    "MODELS", "STAGES", "StageRecord", "load_detector", "predict", "read_log", "read_record", "recipe",
    "run_stage", "stage_dir", "stage_folder", "stage_key", "train",
]
