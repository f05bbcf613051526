"""Pure torch anomaly models (no file I/O, no config parsing), built by name from explicit sizes."""

from effad_hpc.models import ast  # noqa: F401  (registers "ast" and "efficientad_ast")
from effad_hpc.models.ast import AST, ASTTeacher, EfficientADAST, hard_mse
from effad_hpc.models.detector import AnomalyDetector, image_scores, resize_maps
from effad_hpc.models.feature_maps import concat_layers
from effad_hpc.models.registry import build_model, list_models, register_model

__all__ = [
    "AST", "ASTTeacher", "AnomalyDetector", "EfficientADAST", "build_model", "concat_layers", "hard_mse", "image_scores",
    "list_models", "register_model", "resize_maps",
]
