#!/usr/bin/env python3
"""Greedy coreset selection for PatchCore memory banks: time, selections/s and peak memory.

    python benchmarks/coreset.py [--sizes 200 800] [--fraction 0.1] [--image-size 256]

For each size, N synthetic images at 256 px go through the offline Lite0 backbone; PatchCore's
patch features (blocks.2 at stride 8 with blocks.3 upsampled onto it, 3x3 neighbourhood average:
120 dimensions, 1,024 patches per image) form the bank: 200 images -> about 205,000 patches,
800 images -> about 820,000. Each selection of ``fraction`` of the bank runs in its own process,
so its peak resident memory is measured on its own. The naive greedy (one pass over the whole
bank per selection, same projection) is timed on its first selections in the same run and
extrapolated to the same k, which gives the speed-up column.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

NAIVE_STEPS = 200


def build_bank(images: int, image_size: int, out: Path) -> None:
    from torch.utils.data import DataLoader

    from effad_hpc.config import BackboneConfig, SyntheticConfig
    from effad_hpc.data import ImageDataset, read_category
    from effad_hpc.data.synthetic import generate
    from effad_hpc.features import build_backbone
    from effad_hpc.models.feature_maps import patch_features

    root = out.parent / f"images-{images}"
    generate("ad", root, ["washer"], SyntheticConfig(size=image_size, num_train=images, num_test_good=1,
                                                     num_test_per_defect=1))
    samples = read_category(root / "washer", "mvtec_ad", validation_fraction=0.01).samples("train")
    layers = ["blocks.2", "blocks.3"]
    extractor = build_backbone(BackboneConfig(layers=layers)).extractor
    chunks = []
    with torch.no_grad():
        for batch in DataLoader(ImageDataset(samples, image_size), batch_size=16):
            patches = patch_features(extractor(batch["image"]), layers)
            chunks.append(patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1]).half())
    torch.save(torch.cat(chunks), out)


def naive_seconds_per_step(bank: torch.Tensor, projection_dim: int) -> float:
    from effad_hpc.models.coreset import project

    points = project(bank, projection_dim, torch.Generator().manual_seed(0))
    norms = points.pow(2).sum(1)
    to_coreset = torch.full((len(points),), float("inf"))
    index, start = 0, time.perf_counter()
    for _ in range(NAIVE_STEPS):
        center = points[index]
        distance = (norms - 2 * (points @ center) + center.dot(center)).clamp_(min=0).sqrt_()
        torch.minimum(to_coreset, distance, out=to_coreset)
        index = int(to_coreset.argmax())
    return (time.perf_counter() - start) / NAIVE_STEPS


def worker(bank_path: Path, fraction: float, projection_dim: int) -> None:
    """Runs in a child process: select, then print 'n k seconds peak_MiB naive_seconds_per_step'."""
    from effad_hpc.models.coreset import greedy_coreset

    bank = torch.load(bank_path, weights_only=True)
    k = int(fraction * len(bank))
    start = time.perf_counter()
    chosen = greedy_coreset(bank, k, projection_dim=projection_dim)
    seconds = time.perf_counter() - start
    assert len(set(chosen.tolist())) == k
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the naive timing
    print(len(bank), k, seconds, peak_mib, naive_seconds_per_step(bank, projection_dim))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 800], help="numbers of images")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--projection-dim", type=int, default=128)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.fraction, args.projection_dim)
        return

    work = Path(tempfile.mkdtemp(prefix="effad-bench-coreset-"))
    rows = []
    for images in args.sizes:
        bank = work / f"bank-{images}.pt"
        build_bank(images, args.image_size, bank)
        out = subprocess.run([sys.executable, __file__, "--worker", str(bank), "--fraction", str(args.fraction),
                              "--projection-dim", str(args.projection_dim)], capture_output=True, text=True, check=True)
        n, k, seconds, peak_mib, naive = out.stdout.split()
        rows.append((images, int(n), int(k), float(seconds), float(naive) * int(k), float(peak_mib)))

    print(f"\ngreedy coreset, {args.fraction:.0%} of the bank, projection to {args.projection_dim} dims, "
          f"{torch.get_num_threads()} threads")
    header = (f"{'images':>7}{'patches':>10}{'selected':>10}{'seconds':>9}{'selections/s':>14}{'naive s (est.)':>16}"
              f"{'speed-up':>10}{'peak MiB':>10}")
    print(header)
    print("-" * len(header))
    for images, n, k, seconds, naive, peak in rows:
        print(f"{images:>7}{n:>10}{k:>10}{seconds:>9.1f}{k / seconds:>14.0f}{naive:>16.0f}{naive / seconds:>10.1f}"
              f"{peak:>10.0f}")
    print(f"naive: {NAIVE_STEPS} full passes timed, extrapolated to k; peak: resident memory of the selecting process")


if __name__ == "__main__":
    main()
