"""EfficientAD-S and -M (Batzner et al., WACV 2024; SPEC section 1) on images.

A frozen PDN teacher (distilled beforehand from a pretrained backbone), a PDN student with 768
outputs (the first 384 regress the teacher, the last 384 the autoencoder) and an image
autoencoder. The training layer fills the buffers that are statistics of data:

- ``teacher_mean`` / ``teacher_std``: per-channel statistics of the teacher's output over the
  training images; the teacher's output is normalized with them everywhere;
- ``map_quantiles``: (q_a, q_b) of the student-teacher and of the autoencoder map on validation
  images, which map those quantiles to 0 and 0.1 before the two maps are averaged.

Images come in [0, 1] and are normalized with the ImageNet statistics here.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from effad_hpc.models.autoencoder import ImageAutoencoder
from effad_hpc.models.losses import hard_mse
from effad_hpc.models.map_normalization import UNCALIBRATED, normalize_map
from effad_hpc.models.pdn import FEATURE_CHANNELS, PDN, PDNSize, pdn_output_size
from effad_hpc.models.base import AnomalyModel
from effad_hpc.models.registry import register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAP_PADDING = 4
"""The unpadded PDN's grid lacks 4 cells on each side of the image's (56 + 8 = 64 = 256 / 4)."""


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=images.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=images.device)[:, None, None]
    return (images - mean) / std


class EfficientAD(AnomalyModel):
    def __init__(self, pdn_size: PDNSize = "small", image_size: int = 256, hard_quantile: float = 0.999,
                 ae_dropout: float = 0.2):
        super().__init__()
        self.hard_quantile = hard_quantile
        self.teacher = PDN(pdn_size).requires_grad_(False)
        self.student = PDN(pdn_size, 2 * FEATURE_CHANNELS)
        self.autoencoder = ImageAutoencoder(image_size, pdn_output_size(pdn_size, image_size), FEATURE_CHANNELS,
                                            ae_dropout)
        self.register_buffer("teacher_mean", torch.zeros(1, FEATURE_CHANNELS, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, FEATURE_CHANNELS, 1, 1))
        # (q_a, q_b) for the ST and the AE map; (0, 0.1) leaves the maps as they are until calibrated.
        self.register_buffer("map_quantiles", torch.tensor(UNCALIBRATED))

    def train(self, mode: bool = True) -> EfficientAD:
        super().train(mode)
        self.teacher.eval()  # frozen
        return self

    @torch.no_grad()
    def teacher_outputs(self, images: torch.Tensor, normalized: bool = True) -> torch.Tensor:
        raw = self.teacher(normalize_images(images)).float()
        return (raw - self.teacher_mean) / self.teacher_std if normalized else raw

    def losses(self, images: torch.Tensor, ae_images: torch.Tensor,
               penalty_images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Hard ST loss on ``images``; AE and student-AE losses on ``ae_images`` (the augmented
        copies); the penalty on ImageNet-like images when given."""
        teacher = self.teacher_outputs(images)
        parts = {"st": hard_mse(teacher, self.student(normalize_images(images))[:, :FEATURE_CHANNELS].float(),
                                self.hard_quantile)}
        teacher_ae = self.teacher_outputs(ae_images)
        normalized_ae = normalize_images(ae_images)
        reconstruction = self.autoencoder(normalized_ae).float()
        student_ae = self.student(normalized_ae)[:, FEATURE_CHANNELS:].float()
        parts["ae"] = (teacher_ae - reconstruction).pow(2).mean()
        parts["stae"] = (reconstruction - student_ae).pow(2).mean()
        if penalty_images is not None:
            penalty = self.student(normalize_images(penalty_images))[:, :FEATURE_CHANNELS].float()
            parts["penalty"] = penalty.pow(2).mean()
        parts["total"] = sum(parts.values())
        return parts

    def raw_maps(self, images: torch.Tensor, teacher_outputs: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The student-teacher and autoencoder maps (B, h, w) before normalization."""
        normalized = normalize_images(images)
        teacher = self.teacher_outputs(images) if teacher_outputs is None else teacher_outputs
        student = self.student(normalized).float()
        reconstruction = self.autoencoder(normalized).float()
        st = (teacher - student[:, :FEATURE_CHANNELS]).pow(2).mean(1)
        ae = (reconstruction - student[:, FEATURE_CHANNELS:]).pow(2).mean(1)
        return st, ae

    def maps(self, images: torch.Tensor, teacher_outputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Normalized maps padded by 4 cells (zeros: the validation set's 0.9 quantile), so that
        resizing to the image aligns them as in the paper."""
        st, ae = self.raw_maps(images, teacher_outputs)
        (st_a, st_b), (ae_a, ae_b) = self.map_quantiles
        st, ae = normalize_map(st, st_a, st_b), normalize_map(ae, ae_a, ae_b)
        maps = {"combined": 0.5 * st + 0.5 * ae, "st": st, "ae": ae}
        return {name: F.pad(m, (MAP_PADDING,) * 4) for name, m in maps.items()}


@register_model("efficientad_s")
def efficientad_s(image_size: int = 256, hard_quantile: float = 0.999, ae_dropout: float = 0.2) -> EfficientAD:
    return EfficientAD("small", image_size, hard_quantile, ae_dropout)


@register_model("efficientad_m")
def efficientad_m(image_size: int = 256, hard_quantile: float = 0.999, ae_dropout: float = 0.2) -> EfficientAD:
    return EfficientAD("medium", image_size, hard_quantile, ae_dropout)
