"""Matplotlib figures written as PNG atomically (the Agg backend: batch nodes have no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from matplotlib import pyplot as plt  # noqa: E402  (after the backend is chosen)

from effad_hpc.utils.atomic import atomic_path  # noqa: E402


def save_figure(figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path
