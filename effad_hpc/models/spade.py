"""SPADE (Cohen and Hoshen, 2020): image-level kNN, then pixel-level kNN among the nearest images.

The input is the layers upsampled to the finest grid and concatenated
(:func:`effad_hpc.models.feature_maps.upsample_concat`); an image's global feature is the
spatial mean of that pyramid. The image score is the mean distance to the ``image_neighbors``
nearest training images; a pixel's score is the mean distance of its feature to its
``pixel_neighbors`` nearest features among every position of those images.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from effad_hpc.models.knn import nearest_neighbours
from effad_hpc.models.registry import register_model


class SPADE(nn.Module):
    def __init__(self, gallery_size: int, channels: int, map_size: tuple[int, int], image_neighbors: int = 50,
                 pixel_neighbors: int = 1, smoothing_sigma: float = 4.0):
        super().__init__()
        self.smoothing_sigma = smoothing_sigma  # of the map upsampled to the image, in its pixels
        self.image_neighbors = min(image_neighbors, gallery_size)
        self.pixel_neighbors = pixel_neighbors
        self.register_buffer("gallery", torch.zeros(gallery_size, channels, *map_size))
        self.register_buffer("global_features", torch.zeros(gallery_size, channels))

    @classmethod
    def fit(cls, batches: Iterable[torch.Tensor], image_neighbors: int = 50, pixel_neighbors: int = 1) -> SPADE:
        gallery = torch.cat([batch.float().cpu() for batch in batches])
        model = cls(len(gallery), gallery.shape[1], tuple(gallery.shape[-2:]), image_neighbors, pixel_neighbors)
        model.gallery.copy_(gallery)
        model.global_features.copy_(gallery.mean(dim=(2, 3)))
        return model

    def _nearest_images(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return nearest_neighbours(features.float().mean(dim=(2, 3)), self.global_features, self.image_neighbors)

    def maps(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        _, nearest = self._nearest_images(features)
        out = []
        for image, neighbours in zip(features.float(), nearest):
            bank = self.gallery[neighbours].permute(0, 2, 3, 1).reshape(-1, self.gallery.shape[1])
            distances, _ = nearest_neighbours(image.flatten(1).T, bank, self.pixel_neighbors)
            out.append(distances.mean(1).reshape(image.shape[-2:]))
        return {"combined": torch.stack(out)}

    def image_scores(self, features: torch.Tensor, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        distances, _ = self._nearest_images(features)
        return distances.mean(1)


@register_model("spade")
def spade(gallery_size: int, channels: int, map_size: tuple[int, int], image_neighbors: int = 50,
          pixel_neighbors: int = 1, smoothing_sigma: float = 4.0) -> SPADE:
    return SPADE(gallery_size, channels, map_size, image_neighbors, pixel_neighbors, smoothing_sigma)
