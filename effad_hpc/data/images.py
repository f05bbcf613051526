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


# Pillow's convert() clips these at 255 instead of scaling, which turns most 16-bit images white.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    """Gray intensities in [0, 1] as an 8-bit RGB image."""
    return Image.fromarray(np.rint(gray * 255).astype(np.uint8)).convert("RGB")


def read_rgb(path: Path) -> Image.Image:
    """The image as 8-bit RGB, the same 0..255 range whatever the file's bit depth.

    16-bit grayscale is scaled (value / 65535 * 255, rounded); Pillow already reads 16-bit RGB(A)
    as 8-bit. Alpha is dropped, not composited, so that an RGBA photo looks as its RGB twin.
    Palette, 1-bit, CMYK, YCbCr and LAB images are converted by Pillow; float (mode F) TIFFs must
    hold intensities in [0, 1]. 32-bit and signed integer images (mode I) have no intensity range
    to scale by and are a DataError.
    """
    image = _open_fully(path)
    if image.mode in SIXTEEN_BIT_MODES:
        return _gray_to_rgb(np.asarray(image, dtype=np.float64) / 65535)
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise DataError(f"{path}: float image (mode F) with values outside [0, 1]; save it as 8- or 16-bit")
        return _gray_to_rgb(values)
    if image.mode == "I":
        raise DataError(f"{path}: 32-bit or signed integer image (mode I) has no intensity range; "
                        "save it as 8- or 16-bit unsigned")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise DataError(f"{path}: image mode {image.mode} cannot be converted to RGB ({exc})") from None


def read_label_map(path: Path) -> np.ndarray:
    """A ground-truth PNG as a 2-D array of pixel values (0 = background).

    uint8, except for 16-bit (and mode I) masks: their values are kept as uint16, not clipped
    or scaled, so any nonzero pixel stays a defect and a value above 255 cannot pass for an
    8-bit LOCO defect value.
    """
    image = _open_fully(path)
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        values = np.asarray(image)
        if values.min() < 0 or values.max() > 65535:
            raise DataError(f"{path}: mask (mode {image.mode}) has values outside 0..65535")
        return values.astype(np.uint16)
    if image.mode not in ("L", "1", "P"):
        image = image.convert("L")
    return np.asarray(image, dtype=np.uint8)
