"""Pure torch anomaly models (no file I/O, no config parsing), built by name from explicit sizes.

Every model is an :class:`~effad_hpc.models.base.AnomalyModel`: ``maps(inputs) -> {"combined":
(B, h, w), <parts>}``, and ``image_scores(inputs, maps) -> (B,)`` where its image score is not
the max (or mean) of its combined map (else None). The inputs are images in [0, 1] (EfficientAD) or
backbone features prepared as :data:`effad_hpc.models.feature_maps.PREPARATIONS` names.
"""

from effad_hpc.models import ast, efficientad, padim, patchcore, spade  # noqa: F401  (register the models)
from effad_hpc.models.ast import AST, ASTTeacher, EfficientADAST
from effad_hpc.models.base import AnomalyModel
from effad_hpc.models.detector import AnomalyDetector, image_scores, resize_maps
from effad_hpc.models.efficientad import EfficientAD
from effad_hpc.models.feature_maps import PREPARATIONS, concat_layers, patch_features, upsample_concat
from effad_hpc.models.losses import hard_mse
from effad_hpc.models.padim import PaDiM
from effad_hpc.models.patchcore import PatchCore
from effad_hpc.models.pdn import PDN
from effad_hpc.models.registry import build_model, list_models, register_model
from effad_hpc.models.spade import SPADE

__all__ = [
    "AST", "ASTTeacher", "AnomalyDetector", "AnomalyModel", "EfficientAD", "EfficientADAST", "PDN", "PREPARATIONS",
    "PaDiM", "PatchCore", "SPADE", "build_model", "concat_layers", "hard_mse", "image_scores", "list_models",
    "patch_features", "register_model", "resize_maps", "upsample_concat",
]
