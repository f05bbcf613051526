"""The interface every anomaly model implements, so that a detector, a training stage or a sweep
calls it without probing for attributes."""

from __future__ import annotations

import torch
from torch import nn


class AnomalyModel(nn.Module):
    """``maps(inputs) -> {"combined": (B, h, w), <parts>}`` on the model's grid; the inputs are
    images in [0, 1] (EfficientAD) or backbone features prepared as the model's recipe names."""

    smoothing_sigma: float = 0.0
    """Gaussian smoothing of the map once it is upsampled to the image, in pixels of the model's
    input (PatchCore, PaDiM, SPADE: 4); 0: none."""

    def maps(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def image_scores(self, inputs: torch.Tensor, maps: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The model's own image scores (B,), or None: the max (or mean) of the combined map."""
        return None
