"""Reading images and masks from disk, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from effad_hpc.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _open_fully(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()  # decode now: a truncated file fails here, not deep inside a DataLoader
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable or truncated image ({exc})") from None
    return image


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header alone, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None


def read_rgb(path: Path) -> Image.Image:
    """The image as 3-channel RGB; grayscale (and palette, RGBA) images are converted."""
    return _open_fully(path).convert("RGB")


def read_label_map(path: Path) -> np.ndarray:
    """A ground-truth PNG as a 2-D uint8 array of pixel values (0 = background)."""
    image = _open_fully(path)
    if image.mode not in ("L", "1", "P"):
        image = image.convert("L")
    return np.asarray(image, dtype=np.uint8)
