"""Cheap fingerprints of the files a stage reads, for completion keys.

A fingerprint hashes the sorted list of (relative path, size, modification time) of the image
files (and masks, ``defects_config.json``) that make up a split: no pixel is read, so computing
one for every stage of a run costs a directory walk. Adding, removing, replacing or editing a
file changes it; moving or copying the data set with its times kept (``mv``, ``cp -p``,
``rsync -a``) does not change the relative paths, sizes or times.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from effad_hpc.config import stable_hash
from effad_hpc.data.images import IMAGE_SUFFIXES

DEFECTS_CONFIG = "defects_config.json"


def _entries(root: Path, paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    entries = []
    for path in paths:
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue  # removed while we looked: the listing without it is what a reader now sees
        entries.append((path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    return sorted(entries)


def _image_files(folder: Path, pattern: str = "**/*") -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]


def files_fingerprint(root: Path, paths: Iterable[Path]) -> str:
    """Hash of (path relative to ``root``, size, mtime) of each existing file in ``paths``."""
    root = Path(root)
    return stable_hash(_entries(root, (Path(p) for p in paths)))


_reused: dict[tuple, str] | None = None
"""Fingerprints computed inside :func:`reused_fingerprints`, by arguments; None outside it."""


@contextmanager
def reused_fingerprints() -> Iterator[None]:
    """Walk each folder once inside this block. One status table or one submission computes the key
    of every node of every category, and each names the same folders (the penalty folder may be
    ImageNet's 1.3 million files); outside the block every call walks again, so a process that
    polls (``status --watch``, a waiting ``run``) sees files that changed since its last look."""
    global _reused
    outer = _reused
    _reused = {} if outer is None else outer
    try:
        yield
    finally:
        _reused = outer


def _reusable(compute: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(compute)
    def fingerprint(*args: Any) -> Any:
        if _reused is None:
            return compute(*args)
        key = (compute.__name__, *(Path(a).absolute() if isinstance(a, Path) else a for a in args))
        if key not in _reused:
            _reused[key] = compute(*args)
        return _reused[key]
    return fingerprint


@_reusable
def folder_fingerprint(folder: Path, pattern: str = "**/*") -> str:
    """Fingerprint of the image files under ``folder`` that match ``pattern`` (penalty and
    distillation images: any folder of images)."""
    return files_fingerprint(folder, _image_files(Path(folder), pattern))


@_reusable
def split_fingerprints(category_root: Path, layout: str) -> dict[str, str]:
    """``{part: fingerprint}`` of one category folder in the MVTec AD or LOCO layout: the images
    of each split (``train``, ``validation``, ``test``: what features are computed from) and the
    ``ground_truth`` (every mask file and LOCO's ``defects_config.json``: what scoring reads).

    MVTec AD draws its validation split from ``train/good``, so train and validation share the
    fingerprint of that folder (the seeded split itself is keyed by the fraction and seed).
    """
    root = Path(category_root)
    train = files_fingerprint(root, _image_files(root / "train"))
    validation = train if layout == "mvtec_ad" else files_fingerprint(root, _image_files(root / "validation"))
    truth = _image_files(root / "ground_truth")
    if (root / DEFECTS_CONFIG).is_file():
        truth.append(root / DEFECTS_CONFIG)
    return {"train": train, "validation": validation, "test": files_fingerprint(root, _image_files(root / "test")),
            "ground_truth": files_fingerprint(root, truth)}

