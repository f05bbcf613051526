"""A complete detector for inference: one backbone pass per image feeds every network of a model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from effad_hpc.features.backbones import FeatureExtractor
from effad_hpc.models.feature_maps import concat_layers

ImageScore = Literal["max", "mean"]


class AnomalyDetector(nn.Module):
    """``forward(images in [0, 1]) -> {"maps": {name: (B, S, S)}, "score": (B,)}``.

    Each map of the model (``combined`` plus its parts) is resized bilinearly to the image size,
    without padding; the image score is the max (or mean) of the combined map.
    """

    def __init__(self, extractor: FeatureExtractor, model: nn.Module, layers: Sequence[str], image_size: int,
                 score: ImageScore = "max"):
        super().__init__()
        self.extractor, self.model = extractor, model
        self.layers, self.image_size, self.score = list(layers), image_size, score
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict:
        features = concat_layers(self.extractor(images), self.layers)
        maps = {name: F.interpolate(m.float()[:, None], size=(self.image_size, self.image_size), mode="bilinear",
                                    align_corners=False)[:, 0]
                for name, m in self.model.maps(features).items()}
        combined = maps["combined"].flatten(1)
        score = combined.amax(dim=1) if self.score == "max" else combined.mean(dim=1)
        return {"maps": maps, "score": score}
