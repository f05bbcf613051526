"""EfficientAD's map normalisation (Batzner et al., WACV 2024): a map's quantiles q_a and q_b over
good validation images are mapped to 0 and 0.1, so that two maps of different scales (the
student-teacher map and the autoencoder map) contribute alike to their average."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from effad_hpc.models.losses import quantile

UNCALIBRATED = ((0.0, 0.1), (0.0, 0.1))
"""(q_a, q_b) of the ST and of the AE map that leave both maps as they are."""


def normalize_map(raw: torch.Tensor, q_a: torch.Tensor | float, q_b: torch.Tensor | float) -> torch.Tensor:
    return 0.1 * (raw - q_a) / (q_b - q_a)


def quantiles_of_maps(maps: Iterable[tuple[torch.Tensor, torch.Tensor]], quantiles: Sequence[float]) -> torch.Tensor:
    """[[q_a, q_b] of the ST maps, [q_a, q_b] of the AE maps] over batches of (ST, AE) raw maps."""
    st_values, ae_values = [], []
    for st, ae in maps:
        st_values.append(st.float().flatten().cpu())
        ae_values.append(ae.float().flatten().cpu())
    st, ae = torch.cat(st_values), torch.cat(ae_values)
    return torch.tensor([[quantile(values, q).item() for q in quantiles] for values in (st, ae)])
