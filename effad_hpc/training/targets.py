"""The frozen teacher's outputs, computed once per sample for the students that regress them.

The AST teacher is trained in its own stage and frozen while a student trains; the features it
reads do not change between epochs (stored, or computed by a frozen backbone without
augmentation). Its z for every train and validation sample is therefore computed once into an
HDF5 file in the student's stage folder (float32, one chunk per sample, so memory does not
grow with the category) and read beside the features, instead of a flow forward pass per
sample per epoch and per validation pass. The file is keyed by the student stage's key, written
atomically, and removed once the stage is complete.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from effad_hpc.models import ASTTeacher
from effad_hpc.training.sources import FeatureSource
from effad_hpc.utils.atomic import atomic_path
from effad_hpc.utils.device import random_state_kept

TARGETS_FILE = "teacher_targets.h5"
SPLITS = ("train", "validation")


@dataclass
class TargetedBatch:
    """A batch of features with the teacher's z for each of them."""

    features: torch.Tensor
    teacher_z: torch.Tensor

    def __len__(self) -> int:
        return len(self.features)

    @property
    def device(self) -> torch.device:
        return self.features.device


def _complete(path: Path, key: str) -> bool:
    try:
        with h5py.File(path, "r", locking=False) as handle:
            return handle.attrs.get("key") == key
    except OSError:  # absent, or not a finished HDF5 file
        return False


@torch.no_grad()
def _write(path: Path, key: str, source: FeatureSource, teacher: ASTTeacher, batch_size: int) -> None:
    teacher.eval()
    # No HDF5 file locks: the feature source's persistent loader workers are forked while this file
    # is open and keep the inherited lock; the stage's own lock already makes this file private.
    with atomic_path(path) as tmp, h5py.File(tmp, "w", locking=False) as handle:
        for split in SPLITS:
            if (count := source.size(split)) == 0:
                continue  # the stage names the empty split
            shape = (source.channels, source.map_size, source.map_size)
            data = handle.create_dataset(split, (count, *shape), dtype="float32", chunks=(1, *shape))
            for lo, features in zip(range(0, count, batch_size), source.batches(split, range(count), batch_size)):
                data[lo:lo + len(features)] = teacher(features)[0].float().cpu().numpy()
        handle.attrs["key"] = key


class TeacherTargets(FeatureSource):
    """``source`` with the teacher's z: ``batches`` yields :class:`TargetedBatch` in the same order."""

    def __init__(self, folder: Path, key: str, source: FeatureSource, teacher: ASTTeacher, batch_size: int):
        self.source, self.path = source, Path(folder) / TARGETS_FILE
        self.device, self.channels, self.map_size = source.device, source.channels, source.map_size
        if not _complete(self.path, key):
            # Each pass over a DataLoader draws its base seed from the global generator: forked, so
            # that a run which finds the targets written (a rerun) draws the same dropout masks.
            with random_state_kept():
                _write(self.path, key, source, teacher, batch_size)
        self._handle: h5py.File | None = None

    def size(self, split: str) -> int:
        return self.source.size(split)

    def _read(self, split: str, indices: Sequence[int]) -> torch.Tensor:
        if self._handle is None:
            self._handle = h5py.File(self.path, "r", locking=False)
        order = np.argsort(indices)
        rows = self._handle[split][np.asarray(indices)[order]]  # h5py reads increasing indices
        return torch.from_numpy(rows[np.argsort(order)]).to(self.device, non_blocking=True)

    def batches(self, split: str, order: Sequence[int], batch_size: int) -> Iterator[TargetedBatch]:
        order = [int(i) for i in order]
        for lo, features in zip(range(0, len(order), batch_size), self.source.batches(split, order, batch_size)):
            yield TargetedBatch(features, self._read(split, order[lo:lo + batch_size]))

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self.path.unlink(missing_ok=True)
