"""Synthetic categories in the MVTec AD layout: textures and objects with structural defects."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from effad_hpc.data.synthetic.render import (
    STRUCTURAL_DEFECTS,
    Rng,
    apply_lighting,
    coordinates,
    draw_visible,
    missing_piece,
    mask_to_pil,
    save_png,
    smooth_noise,
    to_pil,
)

# A renderer returns the normal image, the mask of where defects may go, and the background
# a missing piece reveals.
Rendered = tuple[np.ndarray, np.ndarray, np.ndarray]


def _rotated(rng: Rng, size: int, max_degrees: float) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = coordinates(size, size)
    angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees))
    shift = rng.uniform(0, size, size=2)
    u = (xx + shift[0]) * np.cos(angle) + (yy + shift[1]) * np.sin(angle)
    v = -(xx + shift[0]) * np.sin(angle) + (yy + shift[1]) * np.cos(angle)
    return u, v


def fabric(rng: Rng, size: int) -> Rendered:
    """Woven fabric: interlaced warp and weft threads with uneven yarn."""
    u, v = _rotated(rng, size, 4)
    period = size / 20 * rng.uniform(0.95, 1.05)
    warp = 0.5 + 0.5 * np.cos(2 * np.pi * v / period)
    weft = 0.5 + 0.5 * np.cos(2 * np.pi * u / period)
    over = np.sin(np.pi * u / period) * np.sin(np.pi * v / period) > 0
    yarn = 0.08 * smooth_noise(rng, size, size, 24)
    shade = np.where(over, 0.55 + 0.35 * weft, 0.45 + 0.35 * warp) + yarn
    base = np.array([0.35, 0.42, 0.62]) * rng.uniform(0.9, 1.1, size=3)
    image = (shade[..., None] * base).astype(np.float32)
    return image, np.ones((size, size), bool), image.copy()


def grid(rng: Rng, size: int) -> Rendered:
    """A metal wire mesh (grayscale, like MVTec's grid)."""
    u, v = _rotated(rng, size, 3)
    period = size / 9 * rng.uniform(0.97, 1.03)
    wire = size / 70
    dist = np.minimum(np.abs((u % period) - period / 2), np.abs((v % period) - period / 2))
    wires = np.clip(1.5 - dist / wire, 0, 1)
    background = 0.18 + 0.05 * smooth_noise(rng, size, size, 8)
    shade = background + wires * (0.55 + 0.1 * smooth_noise(rng, size, size, 16))
    image = np.repeat(shade[..., None], 3, axis=2).astype(np.float32)
    return image, np.ones((size, size), bool), image.copy()


def wood(rng: Rng, size: int) -> Rendered:
    """Wood grain: long wavy rings with knots of darker colour."""
    u, v = _rotated(rng, size, 6)
    warp = 0.06 * size * smooth_noise(rng, size, size, 3) + 0.01 * size * smooth_noise(rng, size, size, 12)
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * (v + warp) / (size / 14 * rng.uniform(0.9, 1.1)))
    fine = 0.04 * smooth_noise(rng, size, size, 48)
    shade = 0.65 + 0.2 * rings ** 3 + fine
    base = np.array([0.72, 0.5, 0.3]) * rng.uniform(0.92, 1.08)
    image = (shade[..., None] * base).astype(np.float32)
    return image, np.ones((size, size), bool), image.copy()


def washer(rng: Rng, size: int) -> Rendered:
    """A round machined part seen from above: turned disc, bore, one locating notch."""
    yy, xx = coordinates(size, size)
    cx, cy = size * (0.5 + rng.uniform(-0.03, 0.03, size=2))
    r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    theta = np.arctan2(yy - cy, xx - cx)
    outer, inner = size * 0.38 * rng.uniform(0.98, 1.02), size * 0.15
    notch_angle = rng.uniform(-np.pi, np.pi)
    notch = (np.abs(np.angle(np.exp(1j * (theta - notch_angle)))) < 0.12) & (r > outer - 0.06 * size)
    part = (r <= outer) & (r >= inner) & ~notch
    background = np.zeros((size, size, 3), np.float32) + (0.12 + 0.03 * smooth_noise(rng, size, size, 4))[..., None]
    turning = 0.06 * np.sin(2 * np.pi * r / (size / 60)) + 0.15 * np.cos(theta - rng.uniform(0, 2 * np.pi))
    metal = np.clip(0.62 + turning, 0, 1)[..., None] * np.array([0.95, 0.97, 1.0])
    image = np.where(part[..., None], metal, background).astype(np.float32)
    return image, part, background


def bottle(rng: Rng, size: int) -> Rendered:
    """A glass bottle seen from above: shoulder, bright rim, dark mouth."""
    yy, xx = coordinates(size, size)
    cx, cy = size * (0.5 + rng.uniform(-0.02, 0.02, size=2))
    r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    outer = size * 0.45 * rng.uniform(0.98, 1.02)
    glass = np.array([0.25, 0.35, 0.22]) * rng.uniform(0.9, 1.1)
    shoulder = np.clip(1 - r / outer, 0, 1)
    rim = np.exp(-(((r - size * 0.2) / (size * 0.025)) ** 2))
    highlight = np.exp(-((xx - cx + size * 0.12) ** 2 + (yy - cy + size * 0.12) ** 2) / (2 * (size * 0.05) ** 2))
    body = glass * (0.5 + shoulder)[..., None] + (0.6 * rim + 0.35 * highlight)[..., None]
    body = np.where((r < size * 0.17)[..., None], glass * 0.25, body)
    background = np.full((size, size, 3), 0.08, np.float32)
    part = r <= outer
    image = np.where(part[..., None], body, background).astype(np.float32)
    return image, part, background


@dataclass(frozen=True)
class AdCategory:
    render: Callable[[Rng, int], Rendered]
    defects: tuple[str, ...]
    grayscale: bool = False


AD_CATEGORIES: dict[str, AdCategory] = {
    "fabric": AdCategory(fabric, ("hole", "stain", "contamination")),
    "grid": AdCategory(grid, ("scratch", "hole", "contamination"), grayscale=True),
    "wood": AdCategory(wood, ("scratch", "crack", "stain")),
    "washer": AdCategory(washer, ("scratch", "crack", "missing_piece", "contamination")),
    "bottle": AdCategory(bottle, ("crack", "missing_piece", "contamination")),
}


def _render_defect(name: str, image: np.ndarray, rng: Rng, allowed: np.ndarray, background: np.ndarray) -> np.ndarray:
    draw = partial(missing_piece, background=background) if name == "missing_piece" else STRUCTURAL_DEFECTS[name]
    return draw_visible(draw, image, rng, allowed)


def write_category(out: Path, name: str, rng_for: Callable[..., Rng], size: int,
                   num_train: int, num_test_good: int, num_test_per_defect: int) -> None:
    category = AD_CATEGORIES[name]

    # Defects are drawn before the lighting, so defective pixels carry the same gradient and
    # sensor noise as the rest of the image and are not found by their flatness alone.
    for i in range(num_train):
        rng = rng_for("train", i)
        image, _, _ = category.render(rng, size)
        save_png(to_pil(apply_lighting(image, rng), category.grayscale), out / "train" / "good" / f"{i:03d}.png")
    for i in range(num_test_good):
        rng = rng_for("test_good", i)
        image, _, _ = category.render(rng, size)
        save_png(to_pil(apply_lighting(image, rng), category.grayscale), out / "test" / "good" / f"{i:03d}.png")
    for defect in category.defects:
        for i in range(num_test_per_defect):
            rng = rng_for(f"test_{defect}", i)
            image, allowed, background = category.render(rng, size)
            mask = _render_defect(defect, image, rng, allowed, background)
            save_png(to_pil(apply_lighting(image, rng), category.grayscale), out / "test" / defect / f"{i:03d}.png")
            save_png(mask_to_pil(mask), out / "ground_truth" / defect / f"{i:03d}_mask.png")
