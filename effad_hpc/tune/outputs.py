"""What a sweep leaves behind: the summary CSV, the best config, plots, the test evaluation of the
best trials and their leaderboard.

``sweep_summary.csv`` has one row per trial: ``model``, ``trial``, ``status`` (``done``: trained
to the end of its schedule; ``stopped``: stopped early by the scheduler; ``failed``: raised on
every try), ``param:<key>`` for each key of the space, ``objective_best`` / ``objective_last``,
``objective_by_round`` (``round:value`` pairs of every report), ``rounds`` (validation rounds
reached), ``reports``, ``stopped_early``, ``tries`` (1 + retries), ``seconds``, ``error``, and for
the trials evaluated at the end ``test_image_auroc``, ``test_pixel_auroc``, ``test_au_pro`` (means over the categories).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from matplotlib import pyplot as plt
from rich.console import Console

from effad_hpc.config import to_yaml
from effad_hpc.evaluation import evaluate_category
from effad_hpc.leaderboard import build_leaderboard, write_leaderboard
from effad_hpc.tune.space import SweepSpec
from effad_hpc.tune.trial import OBJECTIVE, ROUND, TRIAL_RECORD, TrialSetup, trial_dir
from effad_hpc.utils.atomic import atomic_write_text
from effad_hpc.utils.figures import save_figure

SUMMARY = "sweep_summary.csv"
BEST_CONFIG = "best_config.yaml"
TEST_METRICS = ("image_auroc", "pixel_auroc", "au_pro")


def _row(model: str, result, spec: SweepSpec, folder: Path) -> dict:
    """One trial's summary row from Tune's record of it (every report it made)."""
    trial = Path(result.path).name
    record = trial_dir(folder, trial) / TRIAL_RECORD
    tries = json.loads(record.read_text()).get("tries", 0) if record.is_file() else 0
    frame = result.metrics_dataframe
    reports = [] if frame is None or OBJECTIVE not in frame else frame[[ROUND, OBJECTIVE]].to_dict("records")
    last = result.metrics or {}
    values = [r[OBJECTIVE] for r in reports if not math.isnan(r[OBJECTIVE])]
    pick = max if spec.mode == "max" else min
    status = "failed" if result.error is not None else "done" if last.get("final") else "stopped"
    row = {"model": model, "trial": trial, "status": status}
    row |= {f"param:{key}": _cell(result.config.get(key)) for key in spec.space}
    row |= {"objective_best": pick(values) if values else None, "objective_last": values[-1] if values else None,
            "objective_by_round": ";".join(f"{int(r[ROUND])}:{r[OBJECTIVE]:.6g}" for r in reports),
            "rounds": int(reports[-1][ROUND]) if reports else 0, "reports": len(reports),
            "stopped_early": status == "stopped", "tries": tries,
            "seconds": round(float(last.get("time_total_s", 0.0)), 3),
            "error": str(result.error).strip().splitlines()[-1] if result.error is not None else ""}
    return row


def _cell(value) -> str | float | int | None:
    """A parameter as a CSV cell: numbers as they are, anything else (a list, a mapping) as YAML."""
    if value is None or isinstance(value, (int, float, str)):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip()


def _ranked(rows: list[dict], mode: str) -> list[dict]:
    done = [row for row in rows if row["status"] == "done" and row["objective_last"] is not None]
    return sorted(done, key=lambda row: row["objective_last"], reverse=mode == "max")


def _evaluate_on_test(setup: TrialSetup, row: dict, params: dict, console: Console) -> Path:
    """The test evaluation of one of the best trials (after the search: the first read of a test file)."""
    config = setup.config(params, row["trial"])
    per_category = [evaluate_category(config, setup.model, category, show_progress=False)["metrics"]
                    for category in setup.categories]
    for name in TEST_METRICS:
        values = [m[name] for m in per_category if m.get(name) is not None]
        row[f"test_{name}"] = float(np.mean(values)) if values else None
    console.print(f"sweep {setup.model}: trial {row['trial']} on test: " +
                  ", ".join(f"{name} {row[f'test_{name}']:.4f}" for name in TEST_METRICS
                            if row.get(f"test_{name}") is not None), soft_wrap=True)
    return config.run.out_dir


def _best_config(setup: TrialSetup, row: dict, params: dict, folder: Path) -> str:
    """The best trial's config as a normal run: its own out_dir, the sweep's cache (so `run`
    finds the trial's trained stages), no trial tag."""
    config = setup.config(params, row["trial"])
    run = config.run.model_copy(update={"out_dir": folder / "best" / setup.model, "trial": None})
    config = config.model_copy(update={"run": run})
    return (f"# best trial {row['trial']} of sweep {folder.name} ({OBJECTIVE} {row['objective_last']:.6g}, "
            f"chosen on the synthetic-anomaly validation set)\n{to_yaml(config)}")


def _csv(rows: list[dict]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [name for name in row if name not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _plots(folder: Path, rows: list[dict], grids: dict, spec: SweepSpec) -> list[Path]:
    written = []
    reported = [row for row in rows if row["objective_last"] is not None]
    for key in spec.space:
        figure, axes = plt.subplots(figsize=(6, 4), layout="constrained")
        values = [row[f"param:{key}"] for row in reported]
        numeric = all(isinstance(v, (int, float)) for v in values)
        labels = sorted({str(v) for v in values})
        x = values if numeric else [labels.index(str(v)) for v in values]
        for status, marker in (("done", "o"), ("stopped", "x")):
            points = [(xi, row["objective_last"]) for xi, row in zip(x, reported) if row["status"] == status]
            if points:
                axes.scatter(*zip(*points), marker=marker, label=status)
        if not numeric:
            axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        elif spec.space[key].loguniform is not None:
            axes.set_xscale("log")
        axes.set(xlabel=key, ylabel=f"{OBJECTIVE} ({spec.objective}, last report)", title=f"sweep {folder.name}")
        axes.legend()
        written.append(save_figure(figure, folder / "plots" / f"objective_vs_{key}.png"))
    figure, axes = plt.subplots(figsize=(7, 4), layout="constrained")
    for model, (_, grid) in grids.items():
        for result in grid:
            frame = result.metrics_dataframe
            if frame is not None and OBJECTIVE in frame and "time_total_s" in frame:
                axes.plot(frame["time_total_s"], frame[OBJECTIVE], marker=".",
                          label=f"{model} {Path(result.path).name}")
    axes.set(xlabel="trial time (s)", ylabel=OBJECTIVE, title=f"sweep {folder.name}: objective over training time")
    if axes.lines:
        axes.legend(fontsize="small")
    written.append(save_figure(figure, folder / "plots" / "objective_over_time.png"))
    return written


@dataclass
class SweepResult:
    folder: Path
    trials: list[dict] = field(default_factory=list)
    """The summary rows."""
    best_config: Path | None = None


def write_outputs(folder: Path, spec: SweepSpec, grids: dict, console: Console) -> SweepResult:
    """``grids``: ``{model: (TrialSetup, ResultGrid)}`` of the finished search."""
    rows, evaluated, best = [], [], None
    for model, (setup, grid) in grids.items():
        results = {Path(result.path).name: result for result in grid}
        model_rows = [_row(model, result, spec, folder) for result in results.values()]
        ranked = _ranked(model_rows, spec.mode)
        for row in ranked[:spec.top_k]:
            evaluated.append(_evaluate_on_test(setup, row, results[row["trial"]].config, console))
        if ranked:
            text = _best_config(setup, ranked[0], results[ranked[0]["trial"]].config, folder)
            atomic_write_text(folder / f"best_config_{model}.yaml", text)
            if best is None or (ranked[0]["objective_last"] > best[0]) == (spec.mode == "max"):
                best = (ranked[0]["objective_last"], text)
        rows += model_rows
    atomic_write_text(folder / SUMMARY, _csv(rows))
    result = SweepResult(folder, rows)
    if best is not None:
        atomic_write_text(folder / BEST_CONFIG, best[1])
        result.best_config = folder / BEST_CONFIG
    _plots(folder, rows, grids, spec)
    if evaluated:
        write_leaderboard(build_leaderboard(evaluated), folder / "leaderboard")
    return result
