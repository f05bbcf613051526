"""SPADE (Cohen and Hoshen, 2020): image-level kNN, then pixel-level kNN among the nearest images.

The input is the pixel pyramid: layers upsampled to the finest grid and concatenated
(:func:`effad_hpc.models.feature_maps.upsample_concat`), optionally followed by
``global_channels`` channels that hold an image-level feature at every position (the paper: the
global average pool of the backbone's last layer, see
:func:`effad_hpc.models.feature_maps.pyramid_with_global`). Without them an image's global feature
is the spatial mean of the pyramid. The image score is the mean distance to the
``image_neighbors`` nearest training images; a pixel's score is the mean distance of its feature
to its ``pixel_neighbors`` nearest features among every position of those images.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from effad_hpc.models.knn import nearest_neighbours
from effad_hpc.models.base import AnomalyModel
from effad_hpc.models.registry import register_model


def _split(features: torch.Tensor, pixel_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``pixel_channels`` channels, and the spatial mean of the rest (of the pyramid when none)."""
    features = features.float()
    pyramid = features[:, :pixel_channels]
    image_level = features[:, pixel_channels:] if features.shape[1] > pixel_channels else pyramid
    return pyramid, image_level.mean(dim=(2, 3))


class SPADE(AnomalyModel):
    def __init__(self, gallery_size: int, channels: int, map_size: tuple[int, int], image_neighbors: int = 50,
                 pixel_neighbors: int = 1, smoothing_sigma: float = 4.0, global_channels: int | None = None,
                 gallery_dtype: torch.dtype = torch.float16):
        """``channels``: the pixel pyramid's; ``global_channels``: those of the image-level feature
        that follow them in the input (``None``: the input is the pyramid alone). The gallery is
        kept in ``gallery_dtype``: float16 halves the largest memory of all the models (6 GB in
        float32 at paper sizes, WideResNet-50 layers 1-3 of 209 images at 256 px); distances are
        computed in float32 either way."""
        super().__init__()
        self.smoothing_sigma = smoothing_sigma  # of the map upsampled to the image, in its pixels
        self.image_neighbors = min(image_neighbors, gallery_size)
        self.pixel_neighbors = pixel_neighbors
        self.pixel_channels, self.global_channels = channels, global_channels
        # empty: the pages become memory only as the fit or a loaded state fills them
        self.register_buffer("gallery", torch.empty(gallery_size, channels, *map_size, dtype=gallery_dtype))
        self.register_buffer("global_features", torch.zeros(gallery_size, global_channels or channels))

    def split(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input -> (pixel pyramid (B, C, h, w), global features (B, C_global))."""
        expected = self.pixel_channels + (self.global_channels or 0)
        if features.shape[1] != expected:
            raise ValueError(f"SPADE expects {expected} input channels ({self.pixel_channels} pyramid + "
                             f"{self.global_channels or 0} global), got {features.shape[1]}")
        return _split(features, self.pixel_channels)

    @classmethod
    def fit(cls, batches: Iterable[torch.Tensor], image_neighbors: int = 50, pixel_neighbors: int = 1,
            global_channels: int | None = None, gallery_dtype: torch.dtype = torch.float16) -> SPADE:
        pyramids, global_features = [], []
        for batch in batches:  # split batch by batch: the broadcast global channels are not kept
            pyramid, image_level = _split(batch.cpu(), batch.shape[1] - (global_channels or 0))
            pyramids.append(pyramid.to(gallery_dtype, copy=True))
            global_features.append(image_level)
        if not pyramids:
            raise ValueError("SPADE.fit: no training features")
        size = sum(len(p) for p in pyramids)
        model = cls(size, pyramids[0].shape[1], tuple(pyramids[0].shape[-2:]), image_neighbors, pixel_neighbors,
                    global_channels=global_channels, gallery_dtype=gallery_dtype)
        start = 0
        while pyramids:  # each batch is freed once copied: the peak is one gallery, not two
            part = pyramids.pop(0)
            model.gallery[start:start + len(part)] = part
            start += len(part)
        model.global_features.copy_(torch.cat(global_features))
        return model

    def _nearest_images(self, global_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return nearest_neighbours(global_features, self.global_features, self.image_neighbors)

    def maps(self, features: torch.Tensor, teacher_outputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        pyramid, global_features = self.split(features)
        _, nearest = self._nearest_images(global_features)
        out = []
        for image, neighbours in zip(pyramid, nearest):
            bank = self.gallery[neighbours].permute(0, 2, 3, 1).reshape(-1, self.pixel_channels)
            distances, _ = nearest_neighbours(image.flatten(1).T, bank, self.pixel_neighbors)
            out.append(distances.mean(1).reshape(image.shape[-2:]))
        return {"combined": torch.stack(out)}

    def image_scores(self, features: torch.Tensor, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        distances, _ = self._nearest_images(self.split(features)[1])
        return distances.mean(1)


@register_model("spade")
def spade(gallery_size: int, channels: int, map_size: tuple[int, int], image_neighbors: int = 50,
          pixel_neighbors: int = 1, smoothing_sigma: float = 4.0, global_channels: int | None = None,
          gallery_dtype: torch.dtype = torch.float16) -> SPADE:
    return SPADE(gallery_size, channels, map_size, image_neighbors, pixel_neighbors, smoothing_sigma, global_channels,
                 gallery_dtype)
