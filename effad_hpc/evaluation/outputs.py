"""Files a researcher looks at: anomaly maps as float32 TIFF in the official evaluators' layout,
binary masks and heat-map overlays as PNG, and ROC / PR / loss curves as PNG. All written atomically."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; jobs have no display

import numpy as np
import tifffile
from matplotlib import colormaps
from matplotlib import pyplot as plt
from PIL import Image

from effad_hpc.utils.atomic import atomic_path
from effad_hpc.utils.figures import save_figure

OVERLAY_ALPHA = 0.5


def write_map(path: Path, anomaly_map: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, anomaly_map.astype(np.float32))


def read_map(path: Path) -> np.ndarray:
    return tifffile.imread(path)


def _write_png(path: Path, image: Image.Image) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def write_mask(path: Path, anomaly_map: np.ndarray, threshold: float) -> None:
    """White where the map reaches the threshold, black elsewhere."""
    _write_png(path, Image.fromarray(((anomaly_map >= threshold) * 255).astype(np.uint8)))


def write_overlay(path: Path, image: Image.Image, anomaly_map: np.ndarray, low: float, high: float) -> None:
    """The image with the map as a jet heat map on a scale shared by all test images."""
    scaled = np.clip((anomaly_map - low) / max(high - low, 1e-12), 0, 1)
    heat = (colormaps["jet"](scaled)[..., :3] * 255).astype(np.float32)
    blended = (1 - OVERLAY_ALPHA) * np.asarray(image.convert("RGB"), dtype=np.float32) + OVERLAY_ALPHA * heat
    _write_png(path, Image.fromarray(blended.round().astype(np.uint8)))


def plot_curve(path: Path, x: np.ndarray, y: np.ndarray, title: str, xlabel: str, ylabel: str,
               label: str) -> None:
    figure, axes = plt.subplots(figsize=(4.5, 4))
    axes.plot(x, y, label=label)
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02))
    axes.legend(loc="lower right")
    axes.grid(alpha=0.3)
    save_figure(figure, path)


def plot_losses(path: Path, logs: dict[str, list[dict]], title: str) -> None:
    """Training and validation loss per epoch (or step), one panel per trained stage."""
    logs = {stage: rows for stage, rows in logs.items() if rows}  # fitted baselines have no loss
    figure, panels = plt.subplots(1, max(len(logs), 1), figsize=(4.5 * max(len(logs), 1), 3.5), squeeze=False)
    for axes, (stage, rows) in zip(panels[0], logs.items()):
        unit = "epoch" if "epoch" in rows[0] else "step"
        axes.plot([int(row[unit]) for row in rows], [float(row["train_total"]) for row in rows], label="train")
        validated = [(int(row[unit]), float(row["validation"])) for row in rows if row.get("validation")]
        if validated:
            axes.plot(*zip(*validated), marker="o", markersize=3, label="validation")
        axes.set(title=f"{title}: {stage}", xlabel=unit, ylabel="loss")
        axes.legend()
        axes.grid(alpha=0.3)
    save_figure(figure, path)
