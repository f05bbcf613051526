#!/usr/bin/env python3
"""Run a Ray Tune sweep of a config (the same as ``effad-hpc sweep``).

    python jobs/sweep.py --config configs/demo.yaml --space configs/sweeps/efficientad_ast.yaml
        [--executor local|slurm] [--address HOST:PORT] [--profile slurm/profiles/dgx_v100.yaml]
        [--resume] [KEY.SUB=VALUE ...]

Trials train label-free (no test file is read) and are ranked by their score on synthetic
anomalies made from the validation images; the best ``top_k`` are then evaluated on the test
split. Outputs land under ``<run.out_dir>/sweeps/<sweep file name>/``.
"""

from __future__ import annotations

import sys

from effad_hpc.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
