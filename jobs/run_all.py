#!/usr/bin/env python3
"""Submit the whole pipeline of a config as jobs and follow it (the same as ``effad-hpc run``).

    python jobs/run_all.py --config configs/demo.yaml [--executor auto|slurm|local|debug]
        [--profile slurm/profiles/dgx_v100.yaml] [--no-wait] [KEY.SUB=VALUE ...]

Per category: data (generated first when the config names a synthetic set) -> features (a job
array over shards on Slurm) -> the training stages of every model in ``models`` -> evaluation,
chained by Slurm dependencies. Complete stages are skipped, interrupted ones resume; the live
table follows every stage until the run is done, then the failures (with their logs) and the
metrics are printed. Outputs land under the config's ``run.out_dir``.
"""

from __future__ import annotations

import sys

from effad_hpc.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
