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

    def teacher_outputs(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """What the model's frozen teacher computes from ``inputs`` (the AST teacher's z,
        EfficientAD's normalised PDN output), or None for a model without one. The model's last
        training stage does not change it, so a caller that maps the same inputs at every
        validation pass computes it once and hands it to :meth:`maps`."""
        return None

    def maps(self, inputs: torch.Tensor, teacher_outputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``teacher_outputs``: :meth:`teacher_outputs` of these inputs, computed earlier; None:
        computed here (a model without a teacher ignores it)."""
        raise NotImplementedError

    def image_scores(self, inputs: torch.Tensor, maps: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The model's own image scores (B,), or None: the max (or mean) of the combined map."""
        return None
