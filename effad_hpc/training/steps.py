"""The step loop of the step-based stages (EfficientAD's student + autoencoder, teacher distillation).

EfficientAD trains for a number of optimizer steps (70,000 at batch 1 in the paper), not
epochs. Every ``checkpoint_every`` steps the loop writes a log row (mean training losses since
the last row, the validation loss when the stage has one, the learning rate) and the full
training state atomically (the log's ``lr`` is the rate of the row's last step); a rerun or a
requeued job resumes there and ends exactly as an uninterrupted run would: step ``i`` draws its
images and augmentations from a generator seeded by (seed, stage, i), and the global RNG
(dropout) is restored from the checkpoint. The
model of the last step is the result (the paper selects nothing; neither do we, and never on
test data). ``finish`` runs once after the last step, before ``model.pt`` is written (e.g. map
normalization on validation images).
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

from effad_hpc.config import Precision
from effad_hpc.errors import TrainingError
from effad_hpc.training.artifacts import (
    BEST_MODEL,
    LAST_CHECKPOINT,
    StageRecord,
    complete_stage,
    save_state,
    write_log,
)
from effad_hpc.training.hooks import Validated, announce, rounds
from effad_hpc.training.loop import (
    resume_training_state,
    save_training_state,
    seeded_generator,
)
from effad_hpc.utils.device import autocast, grad_scaler
from effad_hpc.utils.memory import reused_memory

StepLosses = Callable[[int, torch.Generator], dict[str, torch.Tensor]]
"""``losses(step, generator)``: one training step's losses (with a ``total``); its random choices
come from the generator (its images from a :class:`StepSampler` started at the same step)."""


class StepSampler(torch.utils.data.Sampler):
    """Batches of indices for steps ``start``..``steps - 1``, each drawn with the step's own seeded
    generator: a resumed run reads the same images at the same steps, and a DataLoader with
    workers can prefetch them."""

    def __init__(self, size: int, batch_size: int, seed: int, stage: str, start: int, steps: int):
        self.size, self.batch_size, self.seed, self.stage = size, batch_size, seed, stage
        self.start, self.steps = start, steps

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self):
        for step in range(self.start, self.steps):
            generator = seeded_generator(self.seed, self.stage, "images", step)
            yield torch.randint(self.size, (self.batch_size,), generator=generator).tolist()


@dataclass
class StepRun:
    stage: str
    category: str
    folder: Path
    key: str
    model: nn.Module
    """Everything saved in checkpoints and in ``model.pt``."""
    parameters: list[nn.Parameter]
    losses: StepLosses
    steps: int
    lr: float
    weight_decay: float
    lr_drop_at: float | None
    checkpoint_every: int
    seed: int
    device: torch.device
    precision: Precision = "auto"
    validate: Callable[[], float] | None = None
    prepare: Callable[[], None] | None = None
    """Runs before the first step of a fresh (not resumed) run, e.g. statistics the model needs."""
    finish: Callable[[], None] | None = None


def fit_steps(run: StepRun, show_progress: bool = True) -> StageRecord:
    """Train (or resume) the stage to its last step and return its completion record."""
    optimizer = torch.optim.Adam(run.parameters, lr=run.lr, weight_decay=run.weight_decay)
    milestones = [] if run.lr_drop_at is None else [max(1, round(run.lr_drop_at * run.steps))]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    scaler = grad_scaler(run.device, run.precision)
    step, history, elapsed, resumed = 0, [], 0.0, []
    last = run.folder / LAST_CHECKPOINT
    state = resume_training_state(last, run.key, run.model, optimizer, scheduler, scaler, run.device)
    if state is not None:
        step, history, elapsed = state["step"], state["history"], state["elapsed"]
        resumed = [*state["resumed_at_steps"], step]
    elif run.prepare is not None:
        run.prepare()

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    sums: dict[str, torch.Tensor] = {}
    started = time.monotonic()
    with reused_memory(), Progress(*columns, disable=not show_progress) as progress:
        task = progress.add_task(f"{run.category} {run.stage} steps", total=run.steps, completed=step)
        while step < run.steps:
            run.model.train()
            with autocast(run.device, run.precision):
                losses = run.losses(step, seeded_generator(run.seed, run.stage, "step", step))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["total"]).backward()
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]  # the rate this step used
            scheduler.step()
            step += 1
            for name, value in losses.items():  # on the device: no wait for the GPU at every step
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            progress.advance(task)
            if step % run.checkpoint_every == 0 or step == run.steps:
                steps_in_row = step - (history[-1]["step"] if history else 0)
                row = {"step": step, "lr": lr}
                row |= {f"train_{name}": float(value) / steps_in_row for name, value in sums.items()}
                if not math.isfinite(row["train_total"]):  # before these steps are checkpointed
                    raise TrainingError(f"{run.stage} ({run.category}): the training loss became "
                                        f"{row['train_total']} by step {step}; try a lower learning rate (the "
                                        f"checkpoint of step {step - steps_in_row} is kept)")
                if run.validate is not None:
                    run.model.eval()
                    row["validation"] = run.validate()
                    done, total = rounds(step, run.steps, run.checkpoint_every)
                    announce(Validated(run.stage, run.category, done, total, row, run.model, run.finish))
                now = time.monotonic()
                row["seconds"] = now - started
                elapsed += row["seconds"]
                started, sums = now, {}
                history.append(row)
                write_log(run.folder, history)
                save_training_state(last, run.key, run.model, optimizer, scheduler, scaler, run.device,
                                    {"step": step, "history": history, "elapsed": elapsed,
                                     "resumed_at_steps": resumed})

    run.model.eval()
    if run.finish is not None:
        run.finish()
    save_state(run.model.state_dict(), run.folder / BEST_MODEL)
    validation = history[-1].get("validation", math.nan) if history else math.nan
    return complete_stage(run.folder, stage=run.stage, category=run.category, key=run.key, best_epoch=step,
                          final_epoch=step, best_validation=validation, stopped_early=False,
                          train_seconds=round(elapsed, 3), resumed_at_epochs=resumed)
