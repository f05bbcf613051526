"""Turning a backbone's named feature maps into the one input tensor a model reads.

Each model family reads the layers differently, and names its way here (``PREPARATIONS``), so
the feature sources of training and the detector of inference prepare features identically:

- ``coarsest``: AST family (the default), layers concatenated on the coarsest grid;
- ``finest``: PaDiM and SPADE, layers upsampled to the finest grid and concatenated;
- ``patches``: PatchCore (and EfficientAD's distillation targets, and the AST family's
  ``teacher.feature_grid: patches``), each layer averaged over a 3x3 neighbourhood first, so that
  a vector describes its surroundings, then as ``finest``;
- ``pyramid_global``: SPADE with an image-level layer: every layer but the last as ``finest``,
  followed by the last layer's global average pool, the same at every position.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from torch.nn import functional as F

Preparation = Literal["coarsest", "finest", "patches", "pyramid_global"]


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


def upsample_concat(features: Mapping[str, torch.Tensor], layers: Sequence[str]) -> torch.Tensor:
    """Concatenate several layers along channels on the finest grid among them (bilinear upsampling)."""
    maps = [features[name].float() for name in layers]
    height, width = max(m.shape[-2] for m in maps), max(m.shape[-1] for m in maps)
    return torch.cat([m if m.shape[-2:] == (height, width)
                      else F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False)
                      for m in maps], dim=1)


def patch_features(features: Mapping[str, torch.Tensor], layers: Sequence[str]) -> torch.Tensor:
    """PatchCore's locally aware patch features (Roth et al., CVPR 2022) on the finest grid."""
    smoothed = {name: F.avg_pool2d(features[name].float(), 3, stride=1, padding=1, count_include_pad=False)
                for name in layers}
    return upsample_concat(smoothed, layers)


def pyramid_with_global(features: Mapping[str, torch.Tensor], layers: Sequence[str]) -> torch.Tensor:
    """SPADE's pixel pyramid (``layers[:-1]`` on the finest grid) followed by the global average
    pool of ``layers[-1]`` (the paper's image-level feature), broadcast over that grid."""
    *pyramid_layers, global_layer = layers
    if not pyramid_layers:
        raise ValueError(f"pyramid_global needs pyramid layers before the global layer, got {list(layers)}")
    pyramid = upsample_concat(features, pyramid_layers)
    pooled = features[global_layer].float().mean(dim=(2, 3), keepdim=True)
    return torch.cat([pyramid, pooled.expand(-1, -1, *pyramid.shape[-2:])], dim=1)


PREPARATIONS: dict[str, Callable[[Mapping[str, torch.Tensor], Sequence[str]], torch.Tensor]] = {
    "coarsest": concat_layers, "finest": upsample_concat, "patches": patch_features,
    "pyramid_global": pyramid_with_global}
