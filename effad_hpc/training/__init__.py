"""Training stages: functions of (config, category) that read features and write artifacts.

Importing this package registers the stages and model recipes (``teacher``, ``student``,
``student_ae``; ``ast``, ``efficientad_ast``).
"""

from effad_hpc.training import ast_stages  # noqa: F401  (registers stages and recipes)
from effad_hpc.training.artifacts import StageRecord, read_log, read_record, stage_dir
from effad_hpc.training.detector import load_detector, predict
from effad_hpc.training.registry import MODELS, STAGES, recipe, stage_key
from effad_hpc.training.train import train

__all__ = [
    "MODELS", "STAGES", "StageRecord", "load_detector", "predict", "read_log", "read_record", "recipe",
    "stage_dir", "stage_key", "train",
]
