"""A complete detector for inference: one backbone pass per image feeds every network of a model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from effad_hpc.features.backbones import FeatureExtractor
from effad_hpc.models.base import AnomalyModel
from effad_hpc.models.feature_maps import PREPARATIONS, Preparation

ImageScore = Literal["max", "mean"]


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, 1, H, W) maps smoothed by a Gaussian of standard deviation ``sigma`` pixels, truncated at
    4 sigma, borders reflected: torchvision's ``gaussian_blur`` as two 1-D passes, which costs
    2k instead of k^2 multiply-adds per pixel (k = 129 for sigma 16 at 1024 px)."""
    radius = math.ceil(4 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=maps.device)
    kernel = torch.softmax(-0.5 * (offsets / sigma) ** 2, dim=0)
    padded = F.pad(maps, (radius, radius, radius, radius), mode="reflect")
    return F.conv2d(F.conv2d(padded, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))


def resize_maps(maps: dict[str, torch.Tensor], size: tuple[int, int], sigma: float = 0.0) -> dict[str, torch.Tensor]:
    """(B, h, w) maps -> (B, *size), bilinear, without padding; then, with ``sigma`` > 0, smoothed
    by a Gaussian of that standard deviation in output pixels (PatchCore, PaDiM and SPADE: 4 px at
    their input size)."""
    resized = {name: F.interpolate(m.float()[:, None], size=size, mode="bilinear", align_corners=False)
               for name, m in maps.items()}
    if sigma > 0:
        resized = {name: gaussian_smooth(m, sigma) for name, m in resized.items()}
    return {name: m[:, 0] for name, m in resized.items()}


def image_scores(combined: torch.Tensor, how: ImageScore = "max") -> torch.Tensor:
    flat = combined.flatten(1)
    return flat.amax(dim=1) if how == "max" else flat.mean(dim=1)


class AnomalyDetector(nn.Module):
    """``forward(images in [0, 1], size) -> {"maps": {name: (B, *size)}, "score": (B,)}``.

    The model reads the images themselves (``extractor=None``, EfficientAD) or the backbone's
    ``layers`` prepared as ``preparation`` names. Each map of the model (``combined`` plus its
    parts) is resized bilinearly to ``size`` (default: the square input size) and smoothed when
    the model asks for it (``model.smoothing_sigma``, in pixels of its input); the image score is
    the model's own (``model.image_scores``, e.g. PatchCore's reweighting) where it has one, else
    the max (or mean) of the resized combined map.
    """

    def __init__(self, model: AnomalyModel, image_size: int, score: ImageScore = "max",
                 extractor: FeatureExtractor | None = None, layers: Sequence[str] = (),
                 preparation: Preparation = "coarsest"):
        super().__init__()
        self.extractor, self.model = extractor, model
        self.layers, self.preparation = list(layers), preparation
        self.image_size, self.score = image_size, score
        self.memory_format = torch.contiguous_format
        self._inputs, self._maps = self._prepared_inputs, self.model.maps
        self.eval()

    def optimize(self, channels_last: bool = True, compile: bool = False) -> AnomalyDetector:
        """For inference with fixed weights: convolutions in the NHWC layout (``channels_last``), the
        backbone's batch norms folded into its convolutions, its "same" padding done by them and
        its squeeze-excitation gates applied to the weights after them
        (:meth:`FeatureExtractor.optimize`), and the backbone and the model's maps compiled by
        ``torch.compile`` with the weights frozen into the graph (``compile``; the weights must not
        change afterwards)."""
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)
        if self.extractor is not None:
            self.extractor.optimize(channels_last)
        if compile:
            # Static shapes: the detector's size is fixed, and dynamo would otherwise turn a second
            # detector's other size (the same code object) into symbolic shapes, which freezing refuses.
            options = {"freezing": True}
            self._inputs = torch.compile(self._prepared_inputs, dynamic=False, options=options)
            self._maps = torch.compile(self.model.maps, dynamic=False, options=options)
        return self

    def _prepared_inputs(self, images: torch.Tensor) -> torch.Tensor:
        images = images.contiguous(memory_format=self.memory_format)
        if self.extractor is None:
            return images
        return PREPARATIONS[self.preparation](self.extractor(images), self.layers)

    def model_inputs(self, images: torch.Tensor) -> torch.Tensor:
        return self._inputs(images)

    @torch.no_grad()
    def grid_output(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The model's maps on its grid, before resizing, and its own image scores (or None)."""
        return self.grid_output_from(self.model_inputs(images))

    @torch.no_grad()
    def grid_output_from(self, inputs: torch.Tensor, teacher_outputs: torch.Tensor | None = None
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """:meth:`grid_output` from model inputs made earlier by :meth:`model_inputs` (the
        backbone is frozen: images scored again and again need its features once) and, for a
        model with a frozen teacher, the teacher's outputs of them (:meth:`AnomalyModel.teacher_outputs`)."""
        maps = self._maps(inputs) if teacher_outputs is None else self.model.maps(inputs, teacher_outputs)
        return maps, self.model.image_scores(inputs, maps)

    @torch.no_grad()
    def grid_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.grid_output(images)[0]

    def to_size(self, grid: dict[str, torch.Tensor], size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Grid maps at ``size``, smoothed as the model asks (its sigma scaled from its input size)."""
        sigma = self.model.smoothing_sigma * size[0] / self.image_size
        return resize_maps(grid, size, sigma)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, size: tuple[int, int] | None = None) -> dict:
        grid, scores = self.grid_output(images)
        maps = self.to_size(grid, size or (self.image_size, self.image_size))
        return {"maps": maps, "score": scores if scores is not None else image_scores(maps["combined"], self.score)}
