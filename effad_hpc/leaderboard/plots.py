"""Leaderboard plots: AUROC per category grouped by model, and AUROC against throughput."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
from matplotlib import pyplot as plt

from effad_hpc.utils.figures import save_figure


def plot_auroc_per_category(path: Path, rows: list[dict], dataset: str) -> Path:
    rows = [r for r in rows if r["dataset"] == dataset]
    categories = sorted({r["category"] for r in rows})
    series = sorted({(r["model"], r["source"]) for r in rows})
    figure, panels = plt.subplots(2, 1, figsize=(max(6.0, 0.45 * len(categories) * max(1, len(series))), 8),
                                  layout="constrained")
    width = 0.8 / max(len(series), 1)
    for axes, metric in zip(panels, ("image_auroc", "pixel_auroc")):
        for i, (model, source) in enumerate(series):
            values = {r["category"]: r.get(metric) for r in rows if (r["model"], r["source"]) == (model, source)}
            heights = [values.get(c) if isinstance(values.get(c), (int, float)) else np.nan for c in categories]
            label = model if source == "measured" else f"{model} (published)"
            axes.bar(np.arange(len(categories)) + i * width, heights, width, label=label)
        axes.set_xticks(np.arange(len(categories)) + 0.4 - width / 2, categories, rotation=45, ha="right")
        axes.set(ylabel=metric.replace("_", " "), ylim=(0, 1.02), title=f"{dataset}: {metric.replace('_', ' ')}")
        axes.grid(axis="y", alpha=0.3)
    panels[0].legend(fontsize="small", ncols=2)
    return save_figure(figure, path)


def plot_auroc_vs_throughput(path: Path, summary: list[dict], dataset: str) -> Path | None:
    points = [e for e in summary if e["dataset"] == dataset and e.get("throughput_ips") and e.get("image_auroc")]
    if not points:
        return None
    figure, axes = plt.subplots(figsize=(5.5, 4))
    for entry in points:
        marker = "o" if entry["source"] == "measured" else "s"
        axes.scatter(entry["throughput_ips"], entry["image_auroc"], marker=marker)
        axes.annotate(entry["model"] + ("" if entry["source"] == "measured" else " (published)"),
                      (entry["throughput_ips"], entry["image_auroc"]), fontsize="small", xytext=(4, 4),
                      textcoords="offset points")
    axes.set(xscale="log", xlabel="throughput (images/s, log scale)", ylabel="mean image AUROC",
             title=f"{dataset}: AUROC vs throughput")
    axes.grid(alpha=0.3)
    return save_figure(figure, path)
