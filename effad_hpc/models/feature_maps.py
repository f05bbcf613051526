"""Turning a backbone's named feature maps into the one input tensor the AST-family models read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.nn import functional as F


def concat_layers(features: Mapping[str, torch.Tensor], layers: Sequence[str]) -> torch.Tensor:
    """Concatenate several layers along channels on the coarsest grid among them.

    Finer maps are average-pooled onto that grid (pooling keeps local statistics, where
    subsampling would drop positions). With a single layer this is the layer itself.
    """
    maps = [features[name] for name in layers]
    if len(maps) == 1:
        return maps[0]
    height = min(m.shape[-2] for m in maps)
    width = min(m.shape[-1] for m in maps)
    return torch.cat([m if m.shape[-2:] == (height, width) else F.adaptive_avg_pool2d(m, (height, width))
                      for m in maps], dim=1)
