#!/usr/bin/env python3
"""The cost of the sweep machinery: the same trials through Ray Tune and one after another.

    python benchmarks/sweep.py [--config configs/demo.yaml] [--category fabric] [--trials 4]
        [--concurrent 2] [--rounds 1] [KEY.SUB=VALUE ...]

The trials differ in ``student.hidden_channels`` (the teacher and the features are prepared once
and copied into each measurement's cache, so both paths train exactly the students). Each round
measures, in alternating order, (a) ``effad-hpc train`` for every trial in turn, each with all
cores, and (b) ``effad-hpc sweep`` of the same trials, ``--concurrent`` at a time with one core
each (FIFO, no early stopping, no test evaluation). The sweep also scores every validation pass
on the synthetic-anomaly set: that is part of what it costs. Printed: wall seconds of both, their
ratio per round and the median ratio (sweep / sequential; below 1.0 the sweep is faster).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from effad_hpc.config import load_config, to_yaml

REPO = Path(__file__).resolve().parents[1]
WIDTHS = [64, 96, 128, 160, 192, 224, 256, 288]


def _cli(*args: str) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "effad_hpc", *args], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--category", default="fabric")
    parser.add_argument("--trials", type=int, default=4, choices=range(1, len(WIDTHS) + 1))
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="e.g. student.epochs=40 so that a trial trains a minute")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="effad-bench-sweep-"))
    base = load_config(args.config, [*args.overrides, f"run.out_dir={work / 'prepare'}",
                                     f"run.shared_dir={work / 'prepared'}", "models=[efficientad_ast]",
                                     f"data.categories=[{args.category}]"])
    config_path = work / "config.yaml"
    config_path.write_text(to_yaml(base))
    print(f"preparing features and teacher in {work / 'prepared'} ...", flush=True)
    _cli("train", "--config", str(config_path), "--model", "efficientad_ast", "--category", args.category,
         "--stage", "teacher")
    widths = WIDTHS[:args.trials]
    spec = work / "bench.yaml"
    spec.write_text(yaml.safe_dump({
        "models": ["efficientad_ast"], "categories": [args.category], "scheduler": {"kind": "fifo"},
        "search": "grid", "num_samples": 1, "max_concurrent": args.concurrent, "resources": {"cpu": 1},
        "top_k": 0, "space": {"student.hidden_channels": {"grid": widths}}}))

    def cache(name: str) -> Path:
        target = work / name
        shutil.copytree(work / "prepared", target)
        return target

    def sequential(index: int) -> float:
        shared, out = cache(f"seq{index}"), work / f"seq{index}-run"
        return sum(_cli("train", "--config", str(config_path), "--model", "efficientad_ast", "--category",
                        args.category, "--quiet", f"student.hidden_channels={width}", f"run.shared_dir={shared}",
                        f"run.out_dir={out / str(width)}") for width in widths)

    def sweep(index: int) -> float:
        shared = cache(f"sweep{index}")
        return _cli("sweep", "--config", str(config_path), "--space", str(spec), f"run.shared_dir={shared}",
                    f"run.out_dir={work / f'sweep{index}-run'}")

    rows = []
    for index in range(args.rounds):
        order = [("sequential", sequential), ("sweep", sweep)]
        if index % 2:
            order.reverse()
        seconds = {name: measure(index) for name, measure in order}
        rows.append(seconds)
        print(f"round {index + 1}: sequential {seconds['sequential']:.1f} s, sweep {seconds['sweep']:.1f} s",
              flush=True)
    ratios = [row["sweep"] / row["sequential"] for row in rows]
    print(f"\n{'round':>5} | {'sequential train (s)':>20} | {'sweep (s)':>9} | sweep / sequential")
    for index, (row, ratio) in enumerate(zip(rows, ratios), 1):
        print(f"{index:>5} | {row['sequential']:>20.1f} | {row['sweep']:>9.1f} | {ratio:.3f}")
    print(f"median sweep / sequential over {args.rounds} round(s), {args.trials} trials, {args.concurrent} "
          f"concurrent: {statistics.median(ratios):.3f} (overhead {100 * (statistics.median(ratios) - 1):+.1f} %)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
