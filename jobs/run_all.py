#!/usr/bin/env python3
"""Run the pipeline for every category of a config.

    python jobs/run_all.py --config configs/demo.yaml [KEY.SUB=VALUE ...]

Stages so far: the data set (generated first when the config names a synthetic one) -> backbone
features in the sharded HDF5 store. Outputs land under the config's ``run.out_dir``.
"""

from __future__ import annotations

import sys

from effad_hpc.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
