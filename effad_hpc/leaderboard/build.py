"""Leaderboard tables from the ``metrics.json`` files of one or more runs.

``leaderboard.csv``: one row per dataset x model x category (x sweep trial) with every metric and
its provenance; ``leaderboard_summary.csv``: per dataset x model, means over categories, texture /
object means (MVTec AD), logical / structural means (MVTec LOCO), mean latency and throughput,
total training time; ``leaderboard.md``: both, sorted, for a terminal or GitHub; PNG plots. With
``compare``, the thesis's published rows are added (``source=published``) and every measured row
gets ``delta_<metric>`` = measured - published for the same dataset, model and category.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from effad_hpc.config import PAPER_METHOD
from effad_hpc.errors import EffadError
from effad_hpc.leaderboard.published import AGGREGATES, published_rows
from effad_hpc.utils.atomic import atomic_write_text

MergeRule = Literal["latest", "best"]
IDENTITY = ["dataset", "model", "variant", "category", "category_type", "trial", "source", "budget", "run_id",
            "config_hash", "code_version", "created_at"]
PAPER_BUDGET = "paper"
"""``budget`` of a result trained as long as its paper trained (or fitted, which has no length)."""
TEXTURES = frozenset({"carpet", "grid", "leather", "tile", "wood", "fabric"})
"""MVTec AD's texture categories (and the synthetic set's); every other MVTec AD category is an object."""
SUMMARY_METRICS = [
    "image_auroc", "pixel_auroc", "au_pro", "image_f1", "pixel_f1", "oracle_image_f1", "oracle_pixel_f1",
    "auroc_logical_anomalies", "auroc_structural_anomalies", "auroc_loco_mean", "au_spro_0.05_mean",
    "au_spro_0.3_mean", "teacher_auc_mean", "teacher_auc_max", "latency_ms", "throughput_ips",
]
TIMING_CONTEXT = ["device", "precision"]
"""What latency and throughput were measured on (``compute`` of metrics.json), shown beside them:
CPU and GPU timings, or fp32 and fp16 ones, are never compared unknowingly."""
SPLIT_METRICS = ["image_auroc", "pixel_auroc"]
REQUIRED = ("schema_version", "dataset", "model", "category", "created_at", "metrics")
VALIDATION_LOSS_STAGES = frozenset({"student", "student_ae", "efficientad_s", "efficientad_m"})
"""Final training stages whose ``best_validation`` is a validation loss (lower is better), what
``--merge best`` ranks on; a loss compares only with the same stage's (the AST students' regression
loss and EfficientAD's total loss are different quantities). The baselines' stage value is the mean
validation anomaly score, a scale and not a quality: their duplicates are merged by ``latest``."""


class LeaderboardError(EffadError):
    """No usable metrics were found."""


class MetricsWarning(UserWarning):
    """A metrics.json that was skipped (malformed, partial or with an impossible value); the other rows are still
    produced."""


UNIT_INTERVAL_PARTS = ("auroc", "au_pro", "au_spro", "f1", "precision", "recall", "auc")
"""Metric names containing one of these are areas under curves or rates: in [0, 1]."""
NON_NEGATIVE_PARTS = ("seconds", "latency", "throughput", "epoch")
"""Metric names containing one of these are times, speeds or epoch counts: >= 0."""


def _metric_problem(name: str, value: object) -> str | None:
    """Why ``value`` cannot be the metric ``name`` (None: it can); thresholds may be any finite number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"not a number ({type(value).__name__})"
    if not math.isfinite(value):
        return "not finite"
    if any(part in name for part in UNIT_INTERVAL_PARTS):
        return None if 0 <= value <= 1 else "outside [0, 1]"
    if any(part in name for part in NON_NEGATIVE_PARTS):
        return None if value >= 0 else "negative"
    return None


def category_type(layout: str | None, category: str) -> str:
    if layout == "mvtec_loco":
        return "loco"
    return "texture" if category in TEXTURES else "object"


def _measured_row(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        warnings.warn(f"{path}: skipped, not readable JSON ({exc})", MetricsWarning, stacklevel=2)
        return None
    missing = [key for key in REQUIRED if key not in data] if isinstance(data, dict) else list(REQUIRED)
    if missing or not isinstance(data.get("metrics"), dict):
        warnings.warn(f"{path}: skipped, partial metrics.json (missing {', '.join(missing) or 'metrics'})",
                      MetricsWarning, stacklevel=2)
        return None
    for name, value in data["metrics"].items():
        if (problem := _metric_problem(name, value)) is not None:
            warnings.warn(f"{path}: skipped, metric {name} = {value!r}: {problem}", MetricsWarning, stacklevel=2)
            return None
    run_dir = path.parents[3]  # <run>/<model>/results/<category>/metrics.json
    training = data.get("training") or {}
    final_stage = list(training)[-1] if training else None
    final = training[final_stage] if final_stage else {}
    compute = data.get("compute") or {}  # absent before provenance was recorded
    row = {
        "dataset": data["dataset"], "model": data["model"], "variant": data.get("variant", PAPER_METHOD),
        "category": data["category"],
        "category_type": category_type(data.get("layout"), data["category"]), "trial": str(data.get("trial", "")),
        "source": "measured", "budget": budget_label(data.get("budget")),
        "run_id": data.get("run_name") or run_dir.name,
        "config_hash": data.get("config_hash", ""), "code_version": data.get("code_version", ""),
        "created_at": data["created_at"],
        "device": compute.get("device_name") or data.get("device", ""), "precision": compute.get("precision", ""),
        "pixel_rule": (data.get("thresholds") or {}).get("pixel_rule", "quantile"),
        "_validation": final.get("best_validation", math.inf),
        "_final_stage": final_stage, "_path": str(path),
    }
    row.update({name: value for name, value in data["metrics"].items() if value is not None})
    return row


def budget_label(budget: dict | None) -> str:
    """``paper``, or ``reduced: <stage> <trained>/<paper> <unit>, ...`` for the stages trained for
    less than their paper (a demo, a quick test): such a row is no measure of the method."""
    if budget is None:
        return ""  # written before budgets were recorded
    reduced = [f"{stage} {entry['trained']}/{entry['paper']} {entry['unit']}" for stage, entry in budget.items()
               if entry["trained"] < entry["paper"]]
    return f"reduced: {', '.join(reduced)}" if reduced else PAPER_BUDGET


def find_metrics(run_dirs: Sequence[Path]) -> list[Path]:
    found = []
    for run_dir in run_dirs:
        if not Path(run_dir).is_dir():
            raise LeaderboardError(f"{run_dir}: not a folder")
        found += sorted(Path(run_dir).glob("*/results/*/metrics.json"))
    return found


@dataclass
class Leaderboard:
    rows: list[dict]
    summary: list[dict]
    merged: list[str] = field(default_factory=list)
    """One line per (dataset, model, category, trial) seen more than once, saying which row was kept."""


def _merge(rows: list[dict], rule: MergeRule) -> tuple[list[dict], list[str]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["model"], row["variant"], row["category"], row["trial"]), []).append(row)
    kept, notes = [], []
    for key, group in groups.items():
        not_comparable = _not_comparable(group) if rule == "best" else None
        if not_comparable is None and rule == "best":  # the lowest validation loss of the final stage
            choice = min(group, key=lambda r: (r["_validation"], r["created_at"]))
        else:
            choice = max(group, key=lambda r: r["created_at"])
        kept.append(choice)
        if len(group) > 1:
            how = rule if not_comparable is None else f"best; fell back to latest: {not_comparable}"
            notes.append(f"{'/'.join(k for k in key if k)}: {len(group)} results, kept {choice['_path']} "
                         f"(rule: {how})")
    return kept, notes


def _not_comparable(group: list[dict]) -> str | None:
    """Why the validation values of duplicate rows cannot rank them (None: they can)."""
    stages = sorted({str(r["_final_stage"]) for r in group})
    if len(stages) > 1:
        return f"their final stages differ ({', '.join(stages)})"
    if stages[0] not in VALIDATION_LOSS_STAGES:
        return f"the final stage {stages[0]} reports no validation loss"
    if not all(isinstance(r["_validation"], (int, float)) and math.isfinite(r["_validation"]) for r in group):
        return f"a validation loss of {stages[0]} is missing or not finite"
    return None


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return sum(values) / len(values) if values else None


def _summarize(rows: list[dict], published: dict[tuple[str, str, str], dict]) -> list[dict]:
    summary = []
    measured: dict[tuple[str, str, str], list[dict]] = {}
    for row in rows:
        if row["source"] == "measured":
            measured.setdefault((row["dataset"], row["model"], row["variant"]), []).append(row)
    for (dataset, model, variant), group in measured.items():
        budgets = {r["budget"] for r in group}
        entry = {"dataset": dataset, "model": model, "variant": variant, "source": "measured", "categories": len(group),
                 "budget": budgets.pop() if len(budgets) == 1 else "mixed"}
        for metric in SUMMARY_METRICS:
            entry[metric] = _mean([r.get(metric) for r in group])
        for context in TIMING_CONTEXT:  # more than one: the mean timings mix machines
            entry[context] = "; ".join(sorted({r[context] for r in group if r.get(context)})) or None
        for kind in ("texture", "object"):
            for metric in SPLIT_METRICS:
                entry[f"{kind}_{metric}"] = _mean([r.get(metric) for r in group if r["category_type"] == kind])
        totals = [r["train_seconds_total"] for r in group if "train_seconds_total" in r]
        entry["train_seconds_total"] = sum(totals) if totals else None
        summary.append(entry)
    for (dataset, model, category), values in published.items():
        if category != "mean":
            continue
        entry = {"dataset": dataset, "model": model, "variant": PAPER_METHOD, "source": "published", "categories": None,
                 "budget": PAPER_BUDGET}
        entry |= {metric: values.get(metric) for metric in SUMMARY_METRICS}
        for kind, aggregate in (("texture", "textures"), ("object", "objects")):
            split = published.get((dataset, model, aggregate), {})
            entry |= {f"{kind}_{metric}": split.get(metric) for metric in SPLIT_METRICS}
        entry["train_seconds_total"] = None
        summary.append(entry)
    summary.sort(key=lambda e: (e["dataset"], -(e["image_auroc"] if e["image_auroc"] is not None else -1), e["model"],
                                e["source"]))
    return summary


def build_leaderboard(run_dirs: Sequence[Path], rule: MergeRule = "latest", compare: bool = False) -> Leaderboard:
    paths = find_metrics(run_dirs)
    if not paths:
        raise LeaderboardError(f"no metrics.json under {', '.join(str(d) for d in run_dirs)} "
                               "(expected <run>/<model>/results/<category>/metrics.json; run `effad-hpc evaluate`)")
    rows = [row for path in paths if (row := _measured_row(path)) is not None]
    if not rows:
        raise LeaderboardError(f"none of the {len(paths)} metrics.json files under "
                               f"{', '.join(str(d) for d in run_dirs)} could be read (see the warnings)")
    rows, notes = _merge(rows, rule)
    published = published_rows() if compare else {}
    if compare:
        for row in rows:
            reference = published.get((row["dataset"], row["model"], row["category"]), {})
            for metric, value in reference.items():
                if metric != "published_source" and isinstance(row.get(metric), (int, float)):
                    row[f"delta_{metric}"] = row[metric] - value
        for (dataset, model, category), values in published.items():
            if category in AGGREGATES:
                continue
            rows.append({"dataset": dataset, "model": model, "category": category,
                         "category_type": category_type("mvtec_loco" if dataset == "mvtec_loco" else "mvtec_ad",
                                                        category),
                         "variant": PAPER_METHOD, "trial": "", "source": "published", "budget": PAPER_BUDGET,
                         "run_id": values["published_source"],
                         **{k: v for k, v in values.items() if k != "published_source"}})
    for row in rows:
        row.pop("_validation", None)
        row.pop("_final_stage", None)
        row.pop("_path", None)
    rows.sort(key=lambda r: (r["dataset"], r["model"], r["category"], r["trial"], r["source"]))
    return Leaderboard(rows, _summarize(rows, published), notes)


# --- writing ---------------------------------------------------------------------------------


def _columns(rows: list[dict], leading: list[str]) -> list[str]:
    rest = sorted({key for row in rows for key in row} - set(leading) - set(TIMING_CONTEXT))
    deltas = [c for c in rest if c.startswith("delta_")]
    return leading + _beside_timings([c for c in rest if c not in deltas]) + deltas


def _beside_timings(columns: list[str]) -> list[str]:
    """``columns`` with :data:`TIMING_CONTEXT` in front of ``latency_ms`` (at the end without it)."""
    columns = [c for c in columns if c not in TIMING_CONTEXT]
    at = columns.index("latency_ms") if "latency_ms" in columns else len(columns)
    return columns[:at] + TIMING_CONTEXT + columns[at:]


def _csv(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        # 10 significant digits: the metrics' precision without float noise such as 0.7749999999999999.
        writer.writerow({k: "" if v is None else format(v, ".10g") if isinstance(v, float) else v
                         for k, v in row.items()})
    return buffer.getvalue()


def _markdown(rows: list[dict], columns: list[str]) -> str:
    def cell(value) -> str:
        if value is None or value == "":
            return ""
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


MARKDOWN_ROW_COLUMNS = ["dataset", "model", "variant", "category", "source", "budget", "image_auroc", "pixel_auroc",
                        "au_pro", "auroc_loco_mean", "au_spro_0.05_mean", "image_f1", "pixel_f1", "device", "precision",
                        "latency_ms", "delta_image_auroc", "delta_pixel_auroc"]


def write_leaderboard(board: Leaderboard, out: Path) -> list[Path]:
    """Write the CSVs, the Markdown and the plots into ``out``; return their paths."""
    from effad_hpc.leaderboard.plots import plot_auroc_per_category, plot_auroc_vs_throughput

    out = Path(out)
    row_columns = _columns(board.rows, IDENTITY)
    ordered = ["dataset", "model", "variant", "source", "budget", "categories", *_beside_timings(SUMMARY_METRICS),
               *[f"{kind}_{metric}" for kind in ("texture", "object") for metric in SPLIT_METRICS],
               "train_seconds_total"]
    summary_columns = [c for c in ordered if any(entry.get(c) is not None for entry in board.summary)]
    written = [out / "leaderboard.csv", out / "leaderboard_summary.csv", out / "leaderboard.md"]
    atomic_write_text(written[0], _csv(board.rows, row_columns))
    atomic_write_text(written[1], _csv(board.summary, summary_columns))
    ranked = sorted(board.rows, key=lambda r: (r["dataset"], r["category"], -(r.get("image_auroc") or 0), r["model"]))
    md_columns = [c for c in MARKDOWN_ROW_COLUMNS if any(row.get(c) not in (None, "") for row in board.rows)]
    markdown = ["# Leaderboard", "", "`budget`: `paper` when every stage was trained as long as its paper trained it "
                "(fitted models have no length); `reduced: stage trained/paper` marks results trained for less, "
                "which are no measure of the method.", "", "## Per dataset and model (means over categories)", "",
                _markdown(board.summary, summary_columns), "", "## Per category", "", _markdown(ranked, md_columns), ""]
    if board.merged:
        markdown += ["## Merged duplicates", "", *[f"- {note}" for note in board.merged], ""]
    atomic_write_text(written[2], "\n".join(markdown))
    for dataset in sorted({row["dataset"] for row in board.rows}):
        written.append(plot_auroc_per_category(out / f"auroc_per_category_{dataset}.png", board.rows, dataset))
        written.append(plot_auroc_vs_throughput(out / f"auroc_vs_throughput_{dataset}.png", board.summary, dataset))
    return [path for path in written if path is not None]
