"""Atomic artifacts: write to a temporary name in the same folder, then rename.

A killed process therefore never leaves a file under its final name that looks complete, and a
rerun can trust that every final name it sees was written to the end.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from effad_hpc.errors import EffadError, StorageError

TEMP_MARK = ".tmp-"
NEARLY_FULL_BYTES = 16 << 20
"""Free space below which a write failure that names no cause is taken for a full disk."""


def write_failure(path: Path, exc: BaseException) -> StorageError | None:
    """A file-system failure while writing ``path`` as a named error, or None for any other error.

    torch.save reports a full disk as a RuntimeError ("unexpected pos") raised while handling the
    OSError of the write, and some writers (tifffile) raise an OSError without an errno. A named
    error (an unreadable input image) or one raised ``from None`` is no write failure."""
    if isinstance(exc, EffadError) or (not isinstance(exc, OSError) and exc.__suppress_context__):
        return None
    cause = exc if isinstance(exc, OSError) else exc.__context__
    if not isinstance(cause, OSError):
        return None
    reason = cause.strerror
    if reason is None:
        folder = next((p for p in Path(path).parents if p.is_dir()), Path("/"))
        reason = "No space left on device" if shutil.disk_usage(folder).free < NEARLY_FULL_BYTES else str(cause)
    return StorageError(f"{path}: cannot write: {reason}")


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
    try:
        tmp = new_temp_path(final)
    except OSError as exc:  # a read-only folder, or a path below a regular file
        raise write_failure(final, exc) from None
    try:
        yield tmp
        publish(tmp, Path(final))
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if (failure := write_failure(final, exc)) is not None:
            raise failure from None
        raise


def atomic_write_text(final: Path, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text)


def atomic_write_json(final: Path, obj: Any) -> None:
    atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def remove_stale_temps(folder: Path, stem: str) -> list[Path]:
    """Delete temporaries of ``folder/stem`` (a glob: ``*`` for every file) left by killed
    writers; return what was removed. Only call it holding the lock that every writer of those
    files holds, so that no live writer's temporary is taken for a dead one's."""
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


@functools.lru_cache(maxsize=64)
def _sha256_of_version(path: Path, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def input_sha256(path: Path) -> str:
    """sha256 of an input file that completion keys name (a weights file), computed once per
    process for each version of the file (size and modification time)."""
    stat = Path(path).stat()
    return _sha256_of_version(Path(path), stat.st_size, stat.st_mtime_ns)


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
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:  # e.g. a Lustre or NFS mount without lock support
            raise StorageError(f"{path}: cannot take a file lock ({exc.strerror}); mount the run folder's file "
                               "system with locking (Lustre: -o flock) or choose run.out_dir elsewhere") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
