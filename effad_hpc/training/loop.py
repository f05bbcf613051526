"""The epoch loop every trained stage shares: resumable, seeded, validated on good images only.

A stage hands :func:`fit` a model, an objective (features -> named losses with a ``total``) and a
feature source. After every epoch the full training state is checkpointed atomically; a rerun,
or a requeued job, resumes from it and ends exactly as an uninterrupted run would, because the
sample order of each epoch is drawn from a generator seeded by (seed, stage, epoch) and the
global RNG (dropout) is restored from the checkpoint.

Model selection looks only at validation data: the lowest loss on the validation split (good
images), or a stage's ``select_by`` score on the synthetic-anomaly validation set (highest),
chooses ``model.pt``. Early stopping ends the stage after ``patience_fraction * epochs`` epochs
without a lower validation loss, whatever chooses: the loss is smooth where a score on some 100
synthetic anomalies moves by about 0.01 from pass to pass and would stop a model that still
improves. So a model chosen by the score is never chosen among fewer passes than the loss's.
Test labels are never read here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from torch import nn

from effad_hpc.config import VALIDATION_LOSS, Precision, TrainedStage, stable_hash
from effad_hpc.errors import DataError, TrainingError
from effad_hpc.training.artifacts import (
    BEST_MODEL,
    LAST_CHECKPOINT,
    StageRecord,
    complete_stage,
    load_state,
    save_state,
    write_log,
)
from effad_hpc.training.hooks import Validated, announce, rounds, scorer_installed
from effad_hpc.training.sources import FeatureSource, PenaltyImages
from effad_hpc.utils.device import autocast, grad_scaler
from effad_hpc.utils.memory import reused_memory

Objective = Callable[[torch.Tensor, torch.Tensor | None], dict[str, torch.Tensor]]


@dataclass
class StageRun:
    """One stage of one category, ready to train."""

    stage: str
    category: str
    folder: Path
    key: str
    settings: TrainedStage
    model: nn.Module
    objective: Objective
    source: FeatureSource
    seed: int
    precision: Precision = "auto"
    penalty: PenaltyImages | None = None
    finish: Callable[[], None] | None = None
    """Sets what the trained model needs from data once its weights are final (the hybrid's map
    quantiles): run on the best model before ``model.pt`` is complete, and before each scoring of
    a validation pass (a stage's ``select_by``, a sweep's report)."""
    select_by: str = VALIDATION_LOSS
    """What chooses ``model.pt``: the validation loss (lower is better), or a ``val_synthetic_*``
    score that a scorer (:func:`~effad_hpc.training.hooks.scoring`) adds to each validation
    pass's row (higher is better)."""

    def check_scorer(self) -> None:
        """A stage that selects by a score needs a scorer: known before it trains an epoch."""
        if self.select_by != VALIDATION_LOSS and not scorer_installed():
            raise TrainingError(
                f"{self.stage} ({self.category}): select_by is {self.select_by}, and nothing scores the model on the "
                "synthetic-anomaly validation set; train through `effad-hpc train` or `run`, or inside "
                "effad_hpc.evaluation.synthetic_validation.selecting(config)")

    def improves(self, value: float | None, best: float | None) -> bool:
        """Whether a pass's :meth:`selected_value` is better than ``best`` (a score that is not
        finite, e.g. AU-PRO without an anomalous region, never is)."""
        if value is None or not math.isfinite(value):
            return False
        if best is None:
            return True
        return value < best if self.select_by == VALIDATION_LOSS else value > best

    def selected_value(self, row: dict) -> float | None:
        """The value of a validation pass's ``row`` that model selection compares."""
        if self.select_by == VALIDATION_LOSS:
            return row["validation"]
        if self.select_by not in row:
            raise TrainingError(f"{self.stage} ({self.category}): the scorer did not add {self.select_by}")
        return row[self.select_by]


def seeded_generator(seed: int, *purpose) -> torch.Generator:
    return torch.Generator().manual_seed(int(stable_hash([seed, *purpose]), 16) % (2**63))


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_training_state(path: Path, key: str, model: nn.Module, optimizer, scheduler, scaler,
                        device: torch.device, progress: dict) -> None:
    """Everything a resumed run needs (weights, optimizer, schedule, loss scaler, RNG) plus the
    loop's own ``progress`` (epoch or step, history, ...), atomically."""
    save_state({"key": key, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(device),
                **progress}, path)


def resume_training_state(path: Path, key: str, model: nn.Module, optimizer, scheduler, scaler,
                          device: torch.device) -> dict | None:
    """Load a training state written for ``key`` into the objects; its ``progress`` entries, or None."""
    if not path.is_file():
        return None
    state = load_state(path)
    if state["key"] != key:
        return None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"], device)
    return state


def patience_epochs(settings: TrainedStage, epochs: int) -> int | None:
    if settings.patience_fraction is None:
        return None
    return max(1, math.ceil(settings.patience_fraction * epochs))


def _validate(run: StageRun) -> float:
    run.model.eval()
    total, count = 0.0, 0
    order = range(run.source.size("validation"))
    with torch.no_grad():
        for features in run.source.batches("validation", order, run.settings.batch_size):
            with autocast(features.device, run.precision):
                loss = run.objective(features, None)["total"]
            total += loss.item() * len(features)
            count += len(features)
    value = total / count
    if not math.isfinite(value):
        raise TrainingError(f"{run.stage} ({run.category}): validation loss is {value}; try a lower {run.stage}.lr")
    return value


def _stops_early(history: list[dict], patience: int | None) -> bool:
    """Whether ``patience`` epochs passed between the first pass with the lowest validation loss
    and the last validation pass (passes only: a resumed run decides as an uninterrupted one)."""
    validated = [row for row in history if "validation" in row]
    if patience is None or not validated:
        return False
    return validated[-1]["epoch"] - min(validated, key=lambda row: row["validation"])["epoch"] >= patience


def _train_epoch(run: StageRun, epoch: int, optimizer, scaler, progress: Progress, task) -> dict[str, float]:
    run.model.train()
    n = run.source.size("train")
    order = torch.randperm(n, generator=seeded_generator(run.seed, run.stage, "order", epoch)).tolist()
    penalty_generator = seeded_generator(run.seed, run.stage, "penalty", epoch)
    # Loss sums stay on the device: reading a value per step would wait for the GPU at every step.
    sums: dict[str, torch.Tensor] = {}
    for features in run.source.batches("train", order, run.settings.batch_size):
        penalty = run.penalty.batch(penalty_generator, len(features)) if run.penalty else None
        with autocast(features.device, run.precision):
            losses = run.objective(features, penalty)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["total"]).backward()
        scaler.step(optimizer)
        scaler.update()
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float() * len(features)
        progress.advance(task, len(features))
    means = {f"train_{name}": float(value) / n for name, value in sums.items()}
    if not math.isfinite(means["train_total"]):  # checked once per epoch, before this epoch is checkpointed
        raise TrainingError(f"{run.stage} ({run.category}): the training loss became {means['train_total']} in "
                            f"epoch {epoch}; try a lower {run.stage}.lr (the checkpoint of epoch {epoch - 1} is kept)")
    return means


def fit(run: StageRun, show_progress: bool = True) -> StageRecord:
    """Train (or resume) the stage to the end and return its completion record."""
    settings, folder = run.settings, run.folder
    run.check_scorer()
    for split in ("train", "validation"):
        if run.source.size(split) == 0:
            raise DataError(f"{run.category}: the {split} split is empty; {run.stage} needs good {split} images")
    device = run.source.device
    epochs = settings.epochs_for(run.source.size("train"))
    parameters = [p for p in run.model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=settings.lr, eps=settings.adam_eps, weight_decay=settings.weight_decay)
    milestones = [] if settings.lr_drop_at is None else [max(1, round(settings.lr_drop_at * epochs))]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    scaler = grad_scaler(device, run.precision)
    patience = patience_epochs(settings, epochs)

    epoch, best_value, best_epoch, history, elapsed, resumed = 0, None, 0, [], 0.0, []
    last = folder / LAST_CHECKPOINT
    if (state := resume_training_state(last, run.key, run.model, optimizer, scheduler, scaler, device)) is not None:
        epoch, history, elapsed = state["epoch"], state["history"], state["elapsed"]
        best_value, best_epoch = state["best_value"], state["best_epoch"]
        resumed = [*state["resumed_at_epochs"], epoch]
    stopped_early = _stops_early(history, patience)

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with reused_memory(), Progress(*columns, disable=not show_progress) as progress:
        epochs_task = progress.add_task(f"{run.category} {run.stage} epochs", total=epochs, completed=epoch)
        batch_task = progress.add_task("  samples", total=run.source.size("train"))
        while epoch < epochs and not stopped_early:
            started = time.monotonic()
            progress.reset(batch_task)
            row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
            row |= _train_epoch(run, epoch + 1, optimizer, scaler, progress, batch_task)
            scheduler.step()
            epoch += 1
            if epoch % settings.validate_every == 0 or epoch == epochs:
                row["validation"] = _validate(run)
                done, total = rounds(epoch, epochs, settings.validate_every)
                announce(Validated(run.stage, run.category, done, total, row, run.model, run.finish,
                                   None if run.select_by == VALIDATION_LOSS else run.select_by))
                if run.improves(value := run.selected_value(row), best_value):
                    best_value, best_epoch = value, epoch
                    save_state(run.model.state_dict(), folder / BEST_MODEL)
            row["seconds"] = time.monotonic() - started
            elapsed += row["seconds"]
            history.append(row)
            stopped_early = _stops_early(history, patience)
            write_log(folder, history)
            save_training_state(last, run.key, run.model, optimizer, scheduler, scaler, device, {
                "epoch": epoch, "history": history, "elapsed": elapsed, "best_value": best_value,
                "best_epoch": best_epoch, "resumed_at_epochs": resumed})
            if best_value is not None:
                description = f"{run.category} {run.stage} epochs ({run.select_by} {best_value:.4g} @ {best_epoch})"
                progress.update(epochs_task, description=description)
            progress.update(epochs_task, completed=epoch)

    if best_value is None:
        raise TrainingError(f"{run.stage} ({run.category}): no validation pass had a finite {run.select_by}; "
                            "choose another select_by")
    if run.finish is not None:  # again after a kill between this and the record: same weights, same result
        run.model.load_state_dict(load_state(folder / BEST_MODEL))
        run.model.eval()
        run.finish()
        save_state(run.model.state_dict(), folder / BEST_MODEL)
    best_row = next(row for row in history if row["epoch"] == best_epoch)
    return complete_stage(folder, stage=run.stage, category=run.category, key=run.key, best_epoch=best_epoch,
                          final_epoch=epoch, best_validation=best_row["validation"], stopped_early=stopped_early,
                          train_seconds=round(elapsed, 3), resumed_at_epochs=resumed, selected_by=run.select_by,
                          best_selected=best_value)
