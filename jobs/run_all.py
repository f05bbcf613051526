#!/usr/bin/env python3
"""Run the pipeline for every category of a config, in this process.

    python jobs/run_all.py --config configs/demo.yaml [--quiet] [KEY.SUB=VALUE ...]

Stages so far: the data set (generated first when the config names a synthetic one) -> backbone
features in the sharded HDF5 store -> the training stages of every model in the config's
``models`` -> evaluation on the test split. Complete stages are skipped, interrupted ones resume. Outputs land under the
config's ``run.out_dir``.
"""

from __future__ import annotations

import sys

from effad_hpc.cli import main

if __name__ == "__main__":
    code = 0
    for command in ("extract", "train", "evaluate"):
        code = code or main([command, *sys.argv[1:]])
    sys.exit(code)
