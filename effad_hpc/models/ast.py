"""AST (Rudolph et al., WACV 2023) and EfficientAD-AST (the thesis model, SPEC section 3).

Both read one feature map (B, C, h, w) of a frozen backbone. The normalizing-flow teacher maps it
to z; a student sees the features plus the positional encoding and regresses z. EfficientAD-AST
adds a feature autoencoder and gives the student a second head that regresses the autoencoder's
output, as EfficientAD does with images.

Every model here offers the same interface to the training and evaluation layers:
``losses(features, penalty_features=None, teacher_z=None) -> {"total": ..., <parts>}`` for the
trained student stage (``teacher_z``: the teacher's output computed beforehand, else here)
and ``maps(features, teacher_outputs=None) -> {"combined": (B, h, w), <parts>}`` for inference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from effad_hpc.models.autoencoder import FeatureAutoencoder
from effad_hpc.models.flow import FlowTeacher, negative_log_likelihood
from effad_hpc.models.losses import hard_mse
from effad_hpc.models.map_normalization import UNCALIBRATED, normalize_map
from effad_hpc.models.positional import positional_encoding_2d
from effad_hpc.models.base import AnomalyModel
from effad_hpc.models.registry import register_model
from effad_hpc.models.student import ResidualStudent, unrecorded_batch_statistics


AE_TARGETS = ("teacher", "features")


def _full_precision(device: torch.device):
    """Flows are numerically delicate: the teacher always runs in float32, also under autocast."""
    return torch.autocast(device_type=device.type, enabled=False)


class ASTTeacher(nn.Module):
    """The flow together with its positional-encoding condition; trained alone in the teacher stage."""

    def __init__(self, feature_channels: int, map_size: int, pos_enc_channels: int = 32, coupling_blocks: int = 4,
                 hidden_channels: int = 1024, kernel_sizes: Sequence[int] = (3, 3, 3, 5), clamp: float = 3.0):
        super().__init__()
        # pos_enc_channels 0: an empty encoding, so a position-free teacher and students (the features alone).
        self.register_buffer("positions", positional_encoding_2d(pos_enc_channels, map_size, map_size),
                             persistent=False)
        self.flow = FlowTeacher(feature_channels, pos_enc_channels, map_size, coupling_blocks, hidden_channels,
                                kernel_sizes, clamp)

    def condition(self, batch: int) -> torch.Tensor:
        return self.positions.expand(batch, -1, -1, -1)

    def with_positions(self, features: torch.Tensor) -> torch.Tensor:
        """Features with the positional encoding appended: the students' input."""
        return torch.cat([features, self.condition(len(features)).to(features.dtype)], dim=1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _full_precision(features.device):  # the module's own dtype: float32 unless made double
            return self.flow(features.to(self.positions.dtype), self.condition(len(features)))

    def nll(self, features: torch.Tensor) -> torch.Tensor:
        return negative_log_likelihood(*self(features))

    def nll_map(self, z: torch.Tensor) -> torch.Tensor:
        """Per-position anomaly score of the teacher alone: 0.5 * mean over channels of z^2."""
        return 0.5 * z.pow(2).mean(dim=1)


class _StudentTeacher(AnomalyModel):
    """Common part: a frozen, trained teacher whose z the students regress."""

    def __init__(self, feature_channels: int, map_size: int, teacher: dict, loss_percentile: float):
        super().__init__()
        self.feature_channels = feature_channels
        self.teacher = ASTTeacher(feature_channels, map_size, **teacher)
        self.teacher.requires_grad_(False)
        self.loss_percentile = loss_percentile

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # trained in its own stage; frozen here
        return self

    def teacher_outputs(self, features: torch.Tensor) -> torch.Tensor:
        """The teacher's z."""
        with torch.no_grad():
            z, _ = self.teacher(features)
        return z


@register_model("ast")
class AST(_StudentTeacher):
    def __init__(self, feature_channels: int, map_size: int, teacher: dict, hidden_channels: int = 1024,
                 residual_blocks: int = 4, loss_percentile: float = 1.0):
        super().__init__(feature_channels, map_size, teacher, loss_percentile)
        in_channels = feature_channels + self.teacher.positions.shape[0]
        self.student = ResidualStudent(in_channels, feature_channels, hidden_channels, residual_blocks)

    def losses(self, features: torch.Tensor, penalty_features: torch.Tensor | None = None,
               teacher_z: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        z = self.teacher_outputs(features) if teacher_z is None else teacher_z
        student = self.student(self.teacher.with_positions(features)).float()
        parts = {"st": hard_mse(z, student, self.loss_percentile)}
        if penalty_features is not None:
            with unrecorded_batch_statistics(self.student):
                penalty = self.student(self.teacher.with_positions(penalty_features))
            parts["penalty"] = penalty.float().pow(2).mean()
        parts["total"] = sum(parts.values())
        return parts

    def maps(self, features: torch.Tensor, teacher_outputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        z = self.teacher_outputs(features) if teacher_outputs is None else teacher_outputs
        student = self.student(self.teacher.with_positions(features)).float()
        st = (z - student).pow(2).mean(dim=1)
        return {"combined": st, "st": st, "teacher": self.teacher.nll_map(z)}


@register_model("efficientad_ast")
class EfficientADAST(_StudentTeacher):
    def __init__(self, feature_channels: int, map_size: int, teacher: dict, hidden_channels: int = 1024,
                 residual_blocks: int = 4, loss_percentile: float = 1.0, ae_channels: int = 64,
                 ae_upsampling_stages: int = 2, ae_dropout: float = 0.2, map_normalization: bool = False,
                 smoothing_sigma: float = 0.0, ae_target: str = "teacher"):
        super().__init__(feature_channels, map_size, teacher, loss_percentile)
        self.smoothing_sigma = smoothing_sigma
        # What the autoencoder reconstructs: the teacher's z (the thesis), or the backbone's
        # features standardised per channel with the training features' statistics (set by the
        # training layer), which carry the structure that z whitens away.
        if ae_target not in AE_TARGETS:
            raise ValueError(f"ae_target {ae_target!r}: expected one of {', '.join(AE_TARGETS)}")
        self.ae_target = ae_target
        if ae_target == "features":
            self.register_buffer("feature_mean", torch.zeros(1, feature_channels, 1, 1))
            self.register_buffer("feature_std", torch.ones(1, feature_channels, 1, 1))
        # The thesis averages the raw ST and AE maps; with map_normalization each is first mapped
        # with its validation quantiles (EfficientAD's rule, set by the training layer).
        self.map_normalization = map_normalization
        if map_normalization:
            self.register_buffer("map_quantiles", torch.tensor(UNCALIBRATED))
        in_channels = feature_channels + self.teacher.positions.shape[0]
        # Two heads in one network: [:C] regresses the teacher, [C:] the autoencoder.
        self.student = ResidualStudent(in_channels, 2 * feature_channels, hidden_channels, residual_blocks)
        self.autoencoder = FeatureAutoencoder(in_channels, feature_channels, ae_channels, ae_upsampling_stages,
                                              ae_dropout)

    def _outputs(self, features: torch.Tensor, teacher_z: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.teacher_outputs(features) if teacher_z is None else teacher_z
        inputs = self.teacher.with_positions(features)
        student = self.student(inputs).float()
        reconstruction = self.autoencoder(inputs).float()
        channels = self.feature_channels
        return z, student[:, :channels], student[:, channels:], reconstruction

    def autoencoder_target(self, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """What the autoencoder learns to reconstruct (``ae_target``)."""
        if self.ae_target == "teacher":
            return z
        return (features.float() - self.feature_mean) / self.feature_std

    def losses(self, features: torch.Tensor, penalty_features: torch.Tensor | None = None,
               teacher_z: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        z, student_st, student_ae, reconstruction = self._outputs(features, teacher_z)
        parts = {
            "st": hard_mse(z, student_st, self.loss_percentile),
            "ae": (self.autoencoder_target(features, z) - reconstruction).pow(2).mean(),
            "stae": (reconstruction - student_ae).pow(2).mean(),
        }
        if penalty_features is not None:
            with unrecorded_batch_statistics(self.student):
                penalty = self.student(self.teacher.with_positions(penalty_features))[:, :self.feature_channels]
            parts["penalty"] = penalty.float().pow(2).mean()
        parts["total"] = sum(parts.values())
        return parts

    def _raw_maps(self, features: torch.Tensor, teacher_z: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z, student_st, student_ae, reconstruction = self._outputs(features, teacher_z)
        return z, (z - student_st).pow(2).mean(dim=1), (reconstruction - student_ae).pow(2).mean(dim=1)

    def raw_maps(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ST and AE maps (B, h, w) before any normalisation."""
        return self._raw_maps(features)[1:]

    def maps(self, features: torch.Tensor, teacher_outputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        z, st, ae = self._raw_maps(features, teacher_outputs)
        if self.map_normalization:
            (st_a, st_b), (ae_a, ae_b) = self.map_quantiles
            st, ae = normalize_map(st, st_a, st_b), normalize_map(ae, ae_a, ae_b)
        return {"combined": 0.5 * st + 0.5 * ae, "st": st, "ae": ae, "teacher": self.teacher.nll_map(z)}
