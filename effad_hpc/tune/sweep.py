"""``effad-hpc sweep``: a Ray Tune search over a sweep file's space, then the best trials on test.

Layout of a sweep folder, ``<run.out_dir>/sweeps/<sweep file name>/`` (the features and stages
its trials train are in ``run.shared_dir``, by default ``<run.out_dir>/sweeps/cache/``, where
every sweep of the config finds them)::

    ray/<model>/                Tune's experiment (storage_path): what ``--resume`` restores
    trials/<trial id>/          each trial's run folder: config.yaml, trial.json, its test evaluation
    sweep_summary.csv           one row per trial (see :mod:`effad_hpc.tune.outputs`)
    best_config.yaml            the best trial's complete config, for ``effad-hpc run --config``
    plots/                      objective against each parameter; objective over training time
    leaderboard/                the evaluated trials' leaderboard, tagged with sweep and trial

The search reads no test file; only once it has ended are the ``top_k`` best trials (by their
final objective) evaluated on the test split, and only then are test metrics written.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import ray
from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from rich.console import Console

from effad_hpc.config import ExperimentConfig
from effad_hpc.data import categories_of
from effad_hpc.errors import ConfigError
from effad_hpc.tune import sweep_dir
from effad_hpc.tune.outputs import SweepResult, write_outputs
from effad_hpc.tune.space import SweepSpec, check_space, param_space
from effad_hpc.tune.trial import OBJECTIVE, ROUND, TrialSetup, run_trial

ASHA_MAX_ROUNDS = 10**6
"""ASHA's max_t: trials end by their own schedule (epochs, early stopping), never by ASHA's cap."""


class ProgressLine(Callback):
    """One line whenever a trial changes state: running, stopped early, done, failed, and the
    best objective so far."""

    def __init__(self, model: str, mode: str):
        # No console object: Tune pickles its callbacks with the experiment (for --resume).
        self.model, self.mode, self.last = model, mode, None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.show(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.show(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.show(trials)

    def show(self, trials) -> None:
        counts = {"running": 0, "pending": 0, "stopped": 0, "done": 0, "failed": 0}
        best = None
        for trial in trials:
            final = bool((trial.last_result or {}).get("final"))
            state = {"RUNNING": "running", "PENDING": "pending", "PAUSED": "pending", "ERROR": "failed"}.get(
                trial.status, "done" if final else "stopped")
            counts[state] += 1
            value = (trial.last_result or {}).get(OBJECTIVE)
            if value is not None and value == value and (
                    best is None or (value > best[0] if self.mode == "max" else value < best[0])):
                best = (value, trial.trial_id)
        line = f"sweep {self.model}: " + ", ".join(f"{n} {k}" for k, n in counts.items()) + (
            f"; best {OBJECTIVE} {best[0]:.4f} ({best[1]})" if best else "")
        if line != self.last:
            print(line, file=sys.stderr, flush=True)
            self.last = line


def _search(spec: SweepSpec):
    """The search algorithm, which also holds the sweep's concurrency: Tune's own
    ``max_concurrent_trials`` is ignored, with a warning, for the random and grid generator."""
    if spec.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
            return ConcurrencyLimiter(OptunaSearch(seed=spec.seed), max_concurrent=spec.max_concurrent)
        except (ImportError, AssertionError) as exc:
            raise ConfigError(f"search optuna: {exc}; install optuna (pip install optuna) or use search: random") \
                from None
    return BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.max_concurrent)


def _scheduler(spec: SweepSpec):
    s = spec.scheduler
    if s.kind == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr=ROUND, max_t=ASHA_MAX_ROUNDS, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)


def tune_model(setup: TrialSetup, spec: SweepSpec, storage: Path, resume: bool):
    """Run (or with ``resume`` restore and finish) the Tune experiment of one model."""
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                    {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    path = storage / setup.model
    if tune.Tuner.can_restore(str(path)):
        if not resume:
            raise ConfigError(f"{path}: this sweep was started before; pass --resume to finish it, or remove {path}")
        # Finished trials stay finished and failed ones failed; unfinished ones continue from
        # their last checkpoint (a restored Tuner keeps its run config, callbacks included).
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=False).fit()
    # Nothing to restore (a driver stopped before this model's experiment began): start it.
    tuner = tune.Tuner(
        trainable, param_space=param_space(spec),
        tune_config=tune.TuneConfig(metric=OBJECTIVE, mode=spec.mode, scheduler=_scheduler(spec),
                                    search_alg=_search(spec), num_samples=spec.num_samples,
                                    trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=tune.RunConfig(name=setup.model, storage_path=str(storage), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                  # every checkpoint kept (a few bytes each: the training state is
                                  # the stage's own last.pt); a cap would force a state snapshot
                                  # at every report
                                  callbacks=[ProgressLine(setup.model, spec.mode)]))
    return tuner.fit()


def run_sweep(config: ExperimentConfig, spec: SweepSpec, spec_path: Path, address: str | None = None,
              resume: bool = False, console: Console | None = None) -> SweepResult:
    """Check the space, search it on Ray (a private local one, or the cluster at ``address``), evaluate the best
    trials on test and write the summary, the best config, the plots and the leaderboard."""

    console = console or Console(stderr=True)
    base = config.model_dump(mode="json")
    check_space(base, spec, spec_path)  # before Ray starts: a wrong key costs no cluster time
    categories = list(spec.categories or categories_of(config))
    folder = sweep_dir(config, spec_path)
    folder.mkdir(parents=True, exist_ok=True)
    storage = folder / "ray"
    # Trials log to their own files; Ray's dashboard and usage report are no use in a batch job.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    caller_sigterm = signal.getsignal(signal.SIGTERM)
    # Without an address, a private Ray here: Ray's own default would join whatever RAY_ADDRESS or
    # the last `ray start` on this machine names (a stale one once made every local sweep of a CI
    # run wait for a cluster long gone).
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
             configure_logging=False, ignore_reinit_error=True)
    if callable(caller_sigterm) and threading.current_thread() is threading.main_thread():
        # ray.init turns SIGTERM into an exit; a batch job's own handler stays: submitit ignores
        # the SIGTERM that comes before a preemption's USR2, on which it requeues the allocation.
        signal.signal(signal.SIGTERM, caller_sigterm)
    try:
        grids = {}
        for model in spec.models:
            asha = spec.scheduler
            setup = TrialSetup(base, model, categories, str(folder), folder.name, spec.objective,
                               (asha.grace_period, asha.reduction_factor) if asha.kind == "asha" else None)
            grids[model] = (setup, tune_model(setup, spec, storage, resume))
        return write_outputs(folder, spec, grids, console)
    finally:
        ray.shutdown()
