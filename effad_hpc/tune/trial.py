"""One sweep trial: a config with the trial's values, trained label-free, scored on the
synthetic-anomaly validation set at the validation passes of its final stage where ASHA decides
(and at the end of every category), reported to Tune.

A trial's run folder is ``<sweep>/trials/<trial id>/``: its ``config.yaml``, ``trial.json``
with every report and the number of tries, and later its test evaluation. Its features and
stages live in the shared cache (``run.shared_dir``, by default ``<run.out_dir>/sweeps/cache/``)
under their keys: trials that agree on the features read one store, trials that agree on the
teacher read one teacher, and a stage another trial is training is waited for (its lock), never
trained twice. Test images and labels are never read here
(:func:`~effad_hpc.data.label_free`).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from effad_hpc.config import ExperimentConfig, write_resolved_config
from effad_hpc.data import label_free
from effad_hpc.evaluation.synthetic_validation import (
    METRICS,
    TrainingScorer,
    objective_value,
    selecting,
    synthetic_validation_metrics,
)
from effad_hpc.training import recipe, train
from effad_hpc.training.detector import load_detector
from effad_hpc.training.hooks import Validated, listening
from effad_hpc.tune.space import apply_params
from effad_hpc.utils.atomic import atomic_write_json
from effad_hpc.utils.device import resolve_device

TRIAL_RECORD = "trial.json"
ROUND = "validation_round"
"""Tune's time attribute: validation passes of the final stage, counted over the categories."""
OBJECTIVE = "objective"


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of one Tune experiment shares (sent to the trial processes)."""

    base: dict
    """The resolved base config (JSON dump)."""
    model: str
    categories: list[str]
    sweep_dir: str
    sweep_name: str
    objective: str
    asha_milestones: tuple[int, float] | None = None
    """ASHA's (grace period, reduction factor): passes are scored and reported only at the rounds
    where ASHA decides, and at the end of each category; None (FIFO): only at the ends."""

    def scores_round(self, round_: int) -> bool:
        """Whether ASHA decides at this round: the first at or past a milestone g * r^k. ASHA records
        a trial's first result at or past each milestone, so reporting these rounds alone leaves its
        decisions as they would be with a report at every pass, at a fraction of the scoring."""
        if self.asha_milestones is None:
            return False
        milestone, factor = self.asha_milestones
        while math.ceil(milestone) < round_:
            milestone *= factor
        return math.ceil(milestone) == round_

    @property
    def shared_dir(self) -> Path:
        """The config's ``run.shared_dir``, else ``<run.out_dir>/sweeps/cache``: every sweep of a
        config reuses what another trained."""
        shared, out = self.base["run"].get("shared_dir"), self.base["run"]["out_dir"]
        return Path(shared) if shared else Path(out) / "sweeps" / "cache"

    def config(self, params: dict[str, Any], trial_id: str) -> ExperimentConfig:
        """The trial's complete config: the base with its values, its own run folder, the shared cache."""
        config = apply_params(self.base, params, f"sweep {self.sweep_name} trial {trial_id}")
        run = config.run.model_copy(update={"out_dir": trial_dir(Path(self.sweep_dir), trial_id),
                                            "shared_dir": self.shared_dir,
                                            "trial": f"{self.sweep_name}/{trial_id}"})
        return config.model_copy(update={"run": run, "models": [self.model],
                                         "data": config.data.model_copy(update={"categories": self.categories})})


def trial_dir(sweep_dir: Path, trial_id: str) -> Path:
    return Path(sweep_dir) / "trials" / trial_id


class TrialReporter:
    """The trial's validation listener: scores the final stage's model as it trains and reports
    the running mean over the categories (finished ones at their final model, the current one at
    its latest pass) to Tune, with a checkpoint that names the round (the training state itself is
    the stage's ``last.pt`` in the shared cache, which a retried trial resumes from)."""

    def __init__(self, setup: TrialSetup, config: ExperimentConfig, device: torch.device, resumed_round: int):
        self.setup, self.config, self.device = setup, config, device
        self.final_stage = recipe(setup.model).stages[-1]
        self.scorer = TrainingScorer(config, setup.model, device)
        self.finished: list[dict[str, float | None]] = []
        self.round_base = 0
        self.category: str | None = None
        self.rounds_in_category = 0
        self.resumed_round = resumed_round
        self.record_path = config.run.out_dir / TRIAL_RECORD
        earlier = json.loads(self.record_path.read_text()) if self.record_path.is_file() else {}
        self.tries = earlier.get("tries", 0) + 1
        self.reports = earlier.get("reports", []) if resumed_round else []
        # Reports written after the checkpoint Tune restored from are made again.
        self.reports = [report for report in self.reports if report[ROUND] <= resumed_round]
        self.started = time.monotonic()
        self._write_record()

    def _write_record(self) -> None:
        atomic_write_json(self.record_path, {"trial": self.config.run.trial, "objective": self.setup.objective,
                                             "tries": self.tries, "reports": self.reports})

    def start(self, category: str) -> None:
        self.category, self.rounds_in_category = category, 0

    def __call__(self, event: Validated) -> None:
        if event.stage != self.final_stage or event.category != self.category:
            return  # an upstream stage (the teacher): not yet the model the trial is about
        self.rounds_in_category = event.round
        if not self.setup.scores_round(self.round_base + event.round):
            return  # no scheduler decision at this pass: the synthetic set is not scored
        if all(name in event.row for name in METRICS):  # scored already: the stage selects by the score
            metrics = {name: event.row[name] for name in METRICS}
        else:
            metrics = self.scorer.metrics(event)
            event.row.update(metrics)  # next to the validation loss in log.csv
        self._report(metrics, self.round_base + event.round, final=False)

    def finish(self, category: str, last: bool) -> None:
        """Score the category's trained model (the one evaluation would load) and report it."""
        detector = load_detector(self.config, self.setup.model, category, self.device)
        metrics = synthetic_validation_metrics(detector, self.scorer.inputs(category, detector), self.config,
                                               self.device)
        self.finished.append(metrics)
        # A category finished before a retry reports no pass now: it ends at the round it ended at.
        earlier = [report[ROUND] for report in self.reports if report["categories_done"] == len(self.finished)]
        if self.rounds_in_category == 0 and earlier:
            self.round_base = min(earlier)
        else:
            self.round_base += max(self.rounds_in_category, 1)
        self.rounds_in_category = 0
        self._report(None, self.round_base, final=last)

    def _report(self, current: dict[str, float | None] | None, round_: int, final: bool) -> None:
        if round_ <= self.resumed_round:
            return  # reported before the trial was retried or restored
        from ray import tune

        categories = self.finished + ([current] if current is not None else [])
        values: dict[str, Any] = {
            OBJECTIVE: _mean([objective_value(m, self.setup.objective) for m in categories]), ROUND: round_,
            "category": self.category, "categories_done": len(self.finished), "final": final,
            "trial_seconds": round(time.monotonic() - self.started, 3)}
        for name in METRICS:
            values[name] = _mean([m.get(name) for m in categories])
        self.reports.append(values)
        self._write_record()
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "round.json").write_text(json.dumps({ROUND: round_}))
            tune.report(values, checkpoint=tune.Checkpoint.from_directory(folder))


def _mean(values: list[float | None]) -> float:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return float(sum(present) / len(present)) if present else math.nan


def resumed_round() -> int:
    """The round of the checkpoint Tune restored this trial from (0: a fresh start)."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        return int(json.loads((Path(folder) / "round.json").read_text())[ROUND])


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """Tune's function trainable for one trial."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    config = setup.config(params, trial_id)
    config.run.out_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(config, config.run.out_dir)
    record = config.run.out_dir / TRIAL_RECORD
    reports = json.loads(record.read_text())["reports"] if record.is_file() else []
    if reports and reports[-1]["final"]:
        # It finished before the driver stopped, and Tune's saved state may not say so: its
        # result is reported again as it was, and nothing is trained, scored or rewritten.
        tune.report(reports[-1])
        return
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    reporter = TrialReporter(setup, config, resolve_device(config.run.device, config.run.precision), resumed_round())
    # A stage that selects by the score is scored before the reporter looks, by its scorer.
    with label_free(), selecting(config, reporter.scorer), listening(reporter):
        for index, category in enumerate(setup.categories):
            reporter.start(category)
            train(config, setup.model, category, show_progress=False)
            reporter.finish(category, last=index == len(setup.categories) - 1)
