"""Synthetic data sets in the exact MVTec AD and MVTec LOCO AD layouts, for demos and tests.

Deterministic for a seed: every image draws from its own generator seeded by (seed, category,
split, index), so a category's images do not change when other categories or counts change.
Each category is written to a temporary folder and renamed into place when complete.
"""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from effad_hpc.config import SyntheticConfig
from effad_hpc.data.synthetic import ad, loco
from effad_hpc.errors import ConfigError, DataError
from effad_hpc.utils.atomic import TEMP_MARK

AD_CATEGORIES = tuple(ad.AD_CATEGORIES)
LOCO_CATEGORIES = tuple(loco.LOCO_CATEGORIES)


def _rng_factory(seed: int, category: str):
    def rng_for(split: str, index: int) -> np.random.Generator:
        return np.random.default_rng([seed, zlib.crc32(category.encode()), zlib.crc32(split.encode()), index])
    return rng_for


class Generated(NamedTuple):
    """What :func:`generate` did with each category it was asked for."""

    written: list[str]
    present: list[str]
    """Already complete under ``out``, or finished first by a concurrent job: left unchanged."""


def generate(layout: Literal["ad", "loco"], out: Path, categories: list[str] | None = None,
             options: SyntheticConfig = SyntheticConfig()) -> Generated:
    """Write the categories (default: all of the layout) under ``out``.

    Categories already complete under ``out`` are left as they are; the result says which.
    """
    known = AD_CATEGORIES if layout == "ad" else LOCO_CATEGORIES
    names = list(dict.fromkeys(categories)) if categories else list(known)  # each once, in the order given
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ConfigError(f"unknown synthetic {layout} categories {unknown}; choose from {list(known)}")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        # mkdir's error names only ``out``; name what is in the way, which may be a folder above it
        blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
        if blocker is None:
            reason = exc.strerror
        else:
            reason = "it is not a folder" if blocker == out else f"{blocker} is not a folder"
        raise DataError(f"{out}: cannot create the data set folder ({reason})") from None
    written, present = [], []
    for name in names:
        final = out / name
        if final.is_dir():
            present.append(name)
            continue
        if final.exists():
            raise DataError(f"{final}: not a folder, in the way of synthetic category {name!r}")
        staging = out / f".{name}{TEMP_MARK}{np.random.default_rng().integers(1 << 30)}"
        try:
            rng_for = _rng_factory(options.seed, name)
            if layout == "ad":
                ad.write_category(staging, name, rng_for, options.size, options.num_train,
                                  options.num_test_good, options.num_test_per_defect)
            else:
                loco.write_category(staging, name, rng_for, options.size, options.num_train,
                                    options.num_validation, options.num_test_good, options.num_test_per_defect)
            try:
                staging.rename(final)
            except OSError:
                if not final.is_dir():  # else a concurrent job finished the same category first
                    raise
                present.append(name)
            else:
                written.append(name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return Generated(written, present)
