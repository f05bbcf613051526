"""Atomic artifacts: write to a temporary name in the same folder, then rename.

A killed process therefore never leaves a file under its final name that looks complete, and a
rerun can trust that every final name it sees was written to the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMP_MARK = ".tmp-"


def new_temp_path(final: Path) -> Path:
    """An empty temporary file beside ``final``, named with ``TEMP_MARK`` so that leftovers of
    killed processes can be recognised and cleaned (see ``remove_stale_temps``)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}{TEMP_MARK}", dir=final.parent)
    os.close(fd)
    return Path(tmp_name)


def publish(tmp: Path, final: Path) -> None:
    """Flush ``tmp`` to disk, then rename it to ``final``: the name says "done" only after the data."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; publish it as ``final`` if the block succeeds,
    remove it if the block raises."""
    tmp = new_temp_path(final)
    try:
        yield tmp
        publish(tmp, Path(final))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(final: Path, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text)


def atomic_write_json(final: Path, obj: Any) -> None:
    atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def remove_stale_temps(folder: Path, stem: str) -> list[Path]:
    """Delete temporaries of ``folder/stem`` left by killed writers; return what was removed."""
    removed = []
    for tmp in Path(folder).glob(f".{stem}{TEMP_MARK}*"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if needed) for the block, waiting for it.

    Used where jobs that run at the same time may start the same work (a stage shared by every
    category): the first does it, the others wait and then find it complete. The kernel releases
    the lock when a holder dies, so a killed job never blocks the others.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
