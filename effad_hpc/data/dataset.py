"""Torch view of a list of samples: resized images in [0, 1] for a backbone."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from effad_hpc.data.images import read_rgb
from effad_hpc.data.mvtec import Sample


def resize_image(image: Image.Image, size: int) -> torch.Tensor:
    """A PIL RGB image as a (3, size, size) float tensor in [0, 1] (bilinear, antialiased)."""
    resized = image.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageDataset(Dataset):
    """Samples as ``{"image": (3, S, S) float tensor, "index": int}``.

    Normalization is left to the backbone, which knows its own mean and std.
    """

    def __init__(self, samples: Sequence[Sample], image_size: int):
        self.samples = list(samples)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return {"image": resize_image(read_rgb(self.samples[index].path), self.image_size), "index": index}
