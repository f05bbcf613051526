"""Synthetic data sets in the exact MVTec AD and MVTec LOCO AD layouts, for demos and tests.

Deterministic for a seed: every image draws from its own generator seeded by (seed, category,
split, index), so a category's images do not change when other categories or counts change.
Each category is written to a temporary folder and renamed into place when complete.
"""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

from effad_hpc.config import SyntheticConfig
from effad_hpc.data.synthetic import ad, loco
from effad_hpc.errors import ConfigError
from effad_hpc.utils.atomic import TEMP_MARK

AD_CATEGORIES = tuple(ad.AD_CATEGORIES)
LOCO_CATEGORIES = tuple(loco.LOCO_CATEGORIES)


def _rng_factory(seed: int, category: str):
    def rng_for(split: str, index: int) -> np.random.Generator:
        return np.random.default_rng([seed, zlib.crc32(category.encode()), zlib.crc32(split.encode()), index])
    return rng_for


def generate(layout: Literal["ad", "loco"], out: Path, categories: list[str] | None = None,
             options: SyntheticConfig = SyntheticConfig()) -> list[str]:
    """Write the categories (default: all of the layout) under ``out``; return their names.

    Categories already complete under ``out`` are left as they are.
    """
    known = AD_CATEGORIES if layout == "ad" else LOCO_CATEGORIES
    names = list(categories) if categories else list(known)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ConfigError(f"unknown synthetic {layout} categories {unknown}; choose from {list(known)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        final = out / name
        if final.exists():
            continue
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
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return names
