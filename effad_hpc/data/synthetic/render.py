"""Rendering primitives for the synthetic data sets: noise, lighting, and structural defects.

Images are float32 arrays (H, W, 3) in [0, 1]. Every defect function draws into an image in
place and returns the boolean mask of the pixels it changed, so masks align with images by
construction. Sizes are fractions of the image size, so any ``--size`` gives the same scene.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

Rng = np.random.Generator


def smooth_noise(rng: Rng, height: int, width: int, cells: int) -> np.ndarray:
    """Smooth noise in [-1, 1]: a random grid of ``cells`` per side upsampled bicubically."""
    grid = rng.uniform(-1, 1, size=(cells + 1, cells + 1)).astype(np.float32)
    field = np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BICUBIC))
    return np.clip(field, -1, 1)


def coordinates(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) as float32 grids."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return yy + 0.5, xx + 0.5


def apply_lighting(image: np.ndarray, rng: Rng, strength: float = 0.12, noise: float = 0.015) -> np.ndarray:
    """Natural variation of normal images: brightness, a lighting gradient and sensor noise."""
    height, width = image.shape[:2]
    yy, xx = coordinates(height, width)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * (xx / width - 0.5) + np.sin(angle) * (yy / height - 0.5)) * 2
    gain = rng.uniform(1 - strength / 2, 1 + strength / 2) * (1 + strength / 2 * ramp)
    lit = image * gain[..., None] + rng.normal(0, noise, size=image.shape).astype(np.float32)
    return np.clip(lit, 0, 1).astype(np.float32)


def to_pil(image: np.ndarray, grayscale: bool = False) -> Image.Image:
    pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    if grayscale:
        return Image.fromarray(pixels.mean(axis=2).round().astype(np.uint8), mode="L")
    return Image.fromarray(pixels, mode="RGB")


def mask_to_pil(mask: np.ndarray, value: int = 255) -> Image.Image:
    """A boolean mask as an 8-bit PNG image: ``value`` on the region, 0 elsewhere."""
    return Image.fromarray(np.where(mask, value, 0).astype(np.uint8), mode="L")


def save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def _random_point(rng: Rng, allowed: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(allowed)
    pick = rng.integers(len(ys))
    return float(xs[pick]), float(ys[pick])


def _stroke(height: int, width: int, points: list[tuple[float, float]], line_width: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).line(points, fill=255, width=line_width, joint="curve")
    return np.asarray(canvas) > 0


def _blend(image: np.ndarray, mask: np.ndarray, color: np.ndarray, alpha: np.ndarray | float = 1.0) -> None:
    weight = (mask * alpha)[..., None] if np.ndim(alpha) else mask[..., None] * alpha
    image[:] = image * (1 - weight) + color * weight


# --- structural defects --------------------------------------------------------------------
# Each takes (image, rng, allowed) where `allowed` marks the pixels a defect may start on
# (the object, or the whole texture) and returns the mask of changed pixels.


def scratch(image: np.ndarray, rng: Rng, allowed: np.ndarray) -> np.ndarray:
    """A thin bright or dark polyline of a few segments."""
    height, width = image.shape[:2]
    size = min(height, width)
    x, y = _random_point(rng, allowed)
    heading = rng.uniform(0, 2 * np.pi)
    points = [(x, y)]
    for _ in range(rng.integers(2, 5)):
        heading += rng.normal(0, 0.35)
        step = rng.uniform(0.06, 0.12) * size
        x, y = x + step * np.cos(heading), y + step * np.sin(heading)
        points.append((x, y))
    mask = _stroke(height, width, points, max(1, round(size / 90))) & ndimage.binary_dilation(allowed, iterations=2)
    shade = rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 0.45)
    _blend(image, mask, np.clip(image + shade, 0, 1))
    return mask


def crack(image: np.ndarray, rng: Rng, allowed: np.ndarray) -> np.ndarray:
    """A jagged dark random walk with a short branch."""
    height, width = image.shape[:2]
    size = min(height, width)
    mask = np.zeros((height, width), dtype=bool)
    x, y = _random_point(rng, allowed)
    heading = rng.uniform(0, 2 * np.pi)
    for branch in range(2):
        points = [(x, y)]
        for _ in range(rng.integers(6, 12) if branch == 0 else rng.integers(2, 5)):
            heading += rng.normal(0, 0.6)
            step = rng.uniform(0.015, 0.035) * size
            points.append((points[-1][0] + step * np.cos(heading), points[-1][1] + step * np.sin(heading)))
        mask |= _stroke(height, width, points, max(1, round(size / 110)))
        x, y = points[len(points) // 2]
        heading += rng.choice([-1.0, 1.0]) * 1.2
    mask &= ndimage.binary_dilation(allowed, iterations=2)
    _blend(image, mask, image * rng.uniform(0.15, 0.35))
    return mask


def hole(image: np.ndarray, rng: Rng, allowed: np.ndarray) -> np.ndarray:
    """A small dark ellipse with a lighter rim."""
    height, width = image.shape[:2]
    yy, xx = coordinates(height, width)
    x, y = _random_point(rng, ndimage.binary_erosion(allowed, iterations=3) if allowed.sum() > 100 else allowed)
    radius = rng.uniform(0.025, 0.05) * min(height, width)
    aspect = rng.uniform(0.6, 1.0)
    dist = np.sqrt(((xx - x) / radius) ** 2 + ((yy - y) / (radius * aspect)) ** 2)
    mask = dist <= 1.25
    _blend(image, mask & (dist > 1.0), np.clip(image + 0.25, 0, 1))
    _blend(image, dist <= 1.0, np.full(3, rng.uniform(0.02, 0.1), dtype=np.float32))
    return mask


def stain(image: np.ndarray, rng: Rng, allowed: np.ndarray) -> np.ndarray:
    """A soft translucent blob of a foreign colour."""
    height, width = image.shape[:2]
    yy, xx = coordinates(height, width)
    x, y = _random_point(rng, allowed)
    radius = rng.uniform(0.05, 0.1) * min(height, width)
    wobble = 1 + 0.35 * smooth_noise(rng, height, width, 6)
    alpha = np.clip(1.2 - np.sqrt((xx - x) ** 2 + (yy - y) ** 2) / (radius * wobble), 0, 1) * rng.uniform(0.5, 0.75)
    mask = alpha > 0.15
    color = rng.uniform(0.1, 0.7, size=3).astype(np.float32)
    _blend(image, mask, color, alpha)
    return mask


def contamination(image: np.ndarray, rng: Rng, allowed: np.ndarray) -> np.ndarray:
    """A clump of small specks of foreign material."""
    height, width = image.shape[:2]
    yy, xx = coordinates(height, width)
    size = min(height, width)
    cx, cy = _random_point(rng, allowed)
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(rng.integers(3, 8)):
        x, y = cx + rng.normal(0, 0.025 * size), cy + rng.normal(0, 0.025 * size)
        mask |= (xx - x) ** 2 + (yy - y) ** 2 <= (rng.uniform(0.008, 0.02) * size) ** 2
    color = np.array(rng.choice([[0.05, 0.05, 0.05], [0.9, 0.85, 0.2], [0.6, 0.25, 0.1], [0.95, 0.95, 0.95]]),
                     dtype=np.float32)
    _blend(image, mask, color)
    return mask


def missing_piece(image: np.ndarray, rng: Rng, allowed: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
    """A chunk bitten out of the object's edge, showing the background."""
    height, width = image.shape[:2]
    yy, xx = coordinates(height, width)
    edge = allowed & ~ndimage.binary_erosion(allowed, iterations=2)
    x, y = _random_point(rng, edge)
    radius = rng.uniform(0.05, 0.09) * min(height, width)
    mask = ((xx - x) ** 2 + (yy - y) ** 2 <= radius ** 2) & allowed
    fill = background if background is not None else np.zeros_like(image)
    image[mask] = fill[mask]
    return mask


DefectFn = Callable[[np.ndarray, Rng, np.ndarray], np.ndarray]
STRUCTURAL_DEFECTS: dict[str, DefectFn] = {
    "scratch": scratch,
    "crack": crack,
    "hole": hole,
    "stain": stain,
    "contamination": contamination,
}

DEFECT_ATTEMPTS = 100  # from 32 pixels up, a few percent of the draws change no pixel: all 100 never do


def draw_visible(draw: DefectFn, image: np.ndarray, rng: Rng, allowed: np.ndarray) -> np.ndarray:
    """Draw a defect, drawing again while it changes no pixel, so every defective image has a
    non-empty mask: a clump of specks started on the border can fall outside the image, and on
    small images specks can miss every pixel centre. A defect that changes no pixel leaves the
    image as it was, and one that shows at once is drawn as it always was."""
    for _ in range(DEFECT_ATTEMPTS):
        mask = draw(image, rng, allowed)
        if mask.any():
            return mask
    raise RuntimeError(f"synthetic defect {getattr(draw, '__name__', draw)!r} changed no pixel in "
                       f"{DEFECT_ATTEMPTS} attempts")
