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


def resize_maps(maps: dict[str, torch.Tensor], size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """(B, h, w) maps -> (B, *size), bilinear, without padding."""
    return {name: F.interpolate(m.float()[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
            for name, m in maps.items()}


def image_scores(combined: torch.Tensor, how: ImageScore = "max") -> torch.Tensor:
    flat = combined.flatten(1)
    return flat.amax(dim=1) if how == "max" else flat.mean(dim=1)


class AnomalyDetector(nn.Module):
    """``forward(images in [0, 1], size) -> {"maps": {name: (B, *size)}, "score": (B,)}``.

    Each map of the model (``combined`` plus its parts) is resized bilinearly to ``size`` (default:
    the square input size), without padding; the image score is the max (or mean) of the
    resized combined map.
    """

    def __init__(self, extractor: FeatureExtractor, model: nn.Module, layers: Sequence[str], image_size: int,
                 score: ImageScore = "max"):
        super().__init__()
        self.extractor, self.model = extractor, model
        self.layers, self.image_size, self.score = list(layers), image_size, score
        self.eval()

    @torch.no_grad()
    def grid_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's maps on the feature grid, before resizing."""
        return self.model.maps(concat_layers(self.extractor(images), self.layers))

    @torch.no_grad()
    def forward(self, images: torch.Tensor, size: tuple[int, int] | None = None) -> dict:
        maps = resize_maps(self.grid_maps(images), size or (self.image_size, self.image_size))
        return {"maps": maps, "score": image_scores(maps["combined"], self.score)}
