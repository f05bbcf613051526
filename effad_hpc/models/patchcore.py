"""PatchCore's patch features (Roth et al., CVPR 2022): locally aware, mid-level, one grid.

Each layer is averaged over a 3x3 neighbourhood (so a patch feature describes its surroundings),
the coarser layers are upsampled bilinearly to the finest layer's grid, and the layers are
concatenated. The memory bank is a greedy coreset of these vectors (``models.coreset``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.nn import functional as F


def patch_features(features: Mapping[str, torch.Tensor], layers: Sequence[str]) -> torch.Tensor:
    """(B, sum of channels, h, w) on the finest grid among ``layers``."""
    maps = [F.avg_pool2d(features[name].float(), 3, stride=1, padding=1, count_include_pad=False) for name in layers]
    height, width = max(m.shape[-2] for m in maps), max(m.shape[-1] for m in maps)
    return torch.cat([m if m.shape[-2:] == (height, width)
                      else F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False)
                      for m in maps], dim=1)
