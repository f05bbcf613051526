"""Where a training stage keeps its files, and how they are written and read back.

``<run.out_dir>/train/<category>/<stage>/`` holds

- ``last.pt``: the full training state after the last finished epoch (model, optimizer,
  scheduler, loss scaler, RNG, early-stopping state, log history), for resuming; removed when
  the stage completes;
- ``model.pt``: the state dict of the best model on the validation split;
- ``log.csv``: one row per epoch (training losses, validation value, learning rate, time);
- ``stage.json``: the completion record, written last, with the stage key (a hash of every
  input that changes the result), best/final epoch, training time, and the size and sha256 of
  ``model.pt``: a stage whose model was truncated or replaced is not complete.

Everything is written atomically, and checkpoints hold only tensors and plain values so that
they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from effad_hpc.config import ExperimentConfig
from effad_hpc.errors import CheckpointError
from effad_hpc.utils.atomic import atomic_path, atomic_write_json, atomic_write_text, sha256_file

LAST_CHECKPOINT = "last.pt"
BEST_MODEL = "model.pt"
LOG = "log.csv"
RECORD = "stage.json"
SHARED = "_shared"
"""The folder (in place of a category) of stages that run once for every category."""


def stage_dir(config: ExperimentConfig, category: str, stage: str) -> Path:
    return config.run.out_dir / "train" / category / stage


def save_state(state: dict, path: Path) -> None:
    # Through a file object, a failed write raises the OSError that names its cause (a full disk)
    # as the context of torch's RuntimeError; atomic_path turns it into a named error.
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        try:
            torch.save(state, handle)
        except RuntimeError as exc:
            # Ctrl-C, or submitit's preemption handler (requeue, then sys.exit), inside torch.save:
            # its zip writer's cleanup raises "unexpected pos" over the KeyboardInterrupt or
            # SystemExit, which must stay what it is (Ctrl-C: one line, status 130; preemption: the
            # requeued job resumes, where the RuntimeError failed it). The old file is untouched.
            if isinstance(exc.__context__, (KeyboardInterrupt, SystemExit)):
                raise exc.__context__ from None
            raise


def load_state(path: Path) -> dict:
    """A checkpoint as plain tensors and values (``weights_only=True``: no code is unpickled)."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc}); "
                              "delete it to train this stage again") from None


@dataclass(frozen=True)
class StageRecord:
    """What a completed stage reports; ``stage.json`` on disk."""

    stage: str
    category: str
    key: str
    best_epoch: int
    final_epoch: int
    """Epochs; steps for the step-based stages (EfficientAD, distillation); 1 for fitted baselines."""
    best_validation: float
    """The validation loss of the chosen model (for a fitted baseline, its mean validation score)."""
    stopped_early: bool
    train_seconds: float
    finished_at: str
    resumed_at_epochs: list[int] = field(default_factory=list)
    """Epochs from which an interrupted run (killed, preempted, requeued) was resumed."""
    selected_by: str = "validation_loss"
    """What chose the model (a stage's ``select_by``)."""
    best_selected: float | None = None
    """The chosen model's value of ``selected_by`` (None where nothing was chosen among passes)."""
    artifacts: dict[str, dict] = field(default_factory=dict)
    """``{file name: {"bytes": size, "sha256": checksum}}`` of what the record vouches for."""


def read_record(folder: Path) -> StageRecord | None:
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        return StageRecord(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{path}: malformed stage record ({exc}); delete it to train this stage again") from None


def artifact_entry(path: Path) -> dict:
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def intact(path: Path, entry: dict | None, verify: bool) -> bool:
    """Whether ``path`` is the file ``entry`` describes: same size, and with ``verify`` the same
    checksum (sizes are what status checks cost; the checksum reads the whole file)."""
    path = Path(path)
    if entry is None or not path.is_file() or path.stat().st_size != entry.get("bytes"):
        return False
    return not verify or sha256_file(path) == entry.get("sha256")


def completed_record(folder: Path, key: str, verify: bool = False) -> StageRecord | None:
    """The record of a stage that finished with these inputs and whose model is intact, else None."""
    record = read_record(folder)
    if record is None or record.key != key or not intact(Path(folder) / BEST_MODEL,
                                                          record.artifacts.get(BEST_MODEL), verify):
        return None
    return record


def write_record(folder: Path, record: StageRecord) -> None:
    atomic_write_json(Path(folder) / RECORD, asdict(record))


def complete_stage(folder: Path, **fields) -> StageRecord:
    """Write the completion record (``fields`` of :class:`StageRecord` but the time, which is now)
    and drop ``last.pt``: the full training state is large and no longer needed."""
    record = StageRecord(**fields, finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         artifacts={BEST_MODEL: artifact_entry(Path(folder) / BEST_MODEL)})
    write_record(folder, record)
    (Path(folder) / LAST_CHECKPOINT).unlink(missing_ok=True)
    return record


def write_log(folder: Path, history: list[dict]) -> None:
    """Rewrite the per-epoch CSV from the history kept in the checkpoint, so a resumed run never
    repeats or loses a row."""
    columns: list[str] = []
    for row in history:
        columns += [name for name in row if name not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(Path(folder) / LOG, buffer.getvalue())


def read_log(folder: Path) -> list[dict]:
    """The stage's log rows; none for a stage without a training loop (a fitted baseline)."""
    path = Path(folder) / LOG
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
