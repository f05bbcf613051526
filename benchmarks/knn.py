#!/usr/bin/env python3
"""Chunked exact nearest-neighbour search (PatchCore / SPADE scoring): time and peak memory.

    python benchmarks/knn.py [--queries 10240] [--dims 1536] [--banks 20000 80000 320000]

The queries stand for the patches of 10 test images (1,024 each) with WideResNet-like
dimensions; the banks for memory banks of growing size. Each search runs in its own process, so
its extra peak memory (above the inputs) is measured on its own, and is compared with the
distance matrix a one-shot ``torch.cdist`` would allocate. For the first bank the one-shot
search is timed in the same run too (larger ones would not fit in memory).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import torch


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(queries: int, bank_size: int, dims: int, one_shot: bool) -> None:
    """Child process: print 'seconds extra_peak_MiB one_shot_seconds'."""
    from effad_hpc.models.knn import nearest_neighbours

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(queries, dims, generator=generator)
    bank = torch.randn(bank_size, dims, generator=generator)
    before = _peak_mib()
    start = time.perf_counter()
    distances, _ = nearest_neighbours(query, bank, k=1)
    seconds = time.perf_counter() - start
    extra = _peak_mib() - before
    full_seconds = float("nan")
    if one_shot:
        start = time.perf_counter()
        full = torch.cdist(query, bank).amin(1)
        full_seconds = time.perf_counter() - start
        assert torch.allclose(full, distances[:, 0], rtol=1e-3, atol=1e-3)
    print(seconds, extra, full_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=10_240)
    parser.add_argument("--dims", type=int, default=1536)
    parser.add_argument("--banks", type=int, nargs="+", default=[20_000, 80_000, 320_000])
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one-shot", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.queries, args.worker, args.dims, args.one_shot)
        return

    rows = []
    for position, bank in enumerate(args.banks):
        command = [sys.executable, __file__, "--worker", str(bank), "--queries", str(args.queries), "--dims",
                   str(args.dims), *(["--one-shot"] if position == 0 else [])]
        seconds, extra, full_seconds = map(float, subprocess.run(command, capture_output=True, text=True,
                                                                 check=True).stdout.split())
        rows.append((bank, seconds, extra, args.queries * bank * 4 / 2**20, full_seconds))

    print(f"\nexact 1-NN of {args.queries} queries, {args.dims} dims, float32, {torch.get_num_threads()} threads")
    header = (f"{'bank':>9}{'seconds':>9}{'queries/s':>11}{'extra peak MiB':>16}{'cdist matrix MiB':>18}"
              f"{'memory ratio':>14}{'cdist s':>9}")
    print(header)
    print("-" * len(header))
    for bank, seconds, extra, matrix, full_seconds in rows:
        print(f"{bank:>9}{seconds:>9.1f}{args.queries / seconds:>11.0f}{extra:>16.0f}{matrix:>18.0f}"
              f"{matrix / max(extra, 1):>14.1f}{full_seconds:>9.1f}")
    print("extra peak: resident memory above the inputs; cdist matrix: what a one-shot search allocates")


if __name__ == "__main__":
    main()
