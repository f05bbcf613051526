"""The thesis's published numbers (``effad_hpc/resources/published.csv``), one value per
(dataset, model, category, metric) with the table it comes from.

Values use the units of ``metrics.json``: AUROC, F1, precision and recall as fractions, latency in
ms per image, training time in seconds. The thesis chose its F1 thresholds on the test set, so its
F1 / precision / recall are stored as ``oracle_*``. ``category`` is a category name, or ``mean``,
``textures``, ``objects`` for the averages the thesis reports.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib.resources import files

AGGREGATES = ("mean", "textures", "objects")


@dataclass(frozen=True)
class PublishedValue:
    dataset: str
    model: str
    category: str
    metric: str
    value: float
    source: str


def published_values() -> list[PublishedValue]:
    text = files("effad_hpc").joinpath("resources/published.csv").read_text()
    return [PublishedValue(row["dataset"], row["model"], row["category"], row["metric"], float(row["value"]),
                           row["source"]) for row in csv.DictReader(text.splitlines())]


def published_rows() -> dict[tuple[str, str, str], dict]:
    """(dataset, model, category) -> {metric: value, ..., "published_source": tables}."""
    rows: dict[tuple[str, str, str], dict] = {}
    for value in published_values():
        row = rows.setdefault((value.dataset, value.model, value.category), {"published_source": set()})
        row[value.metric] = value.value
        row["published_source"].add(value.source.split(" (")[0])
    for row in rows.values():
        row["published_source"] = "; ".join(sorted(row["published_source"]))
    return rows
