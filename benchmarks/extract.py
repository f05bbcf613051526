#!/usr/bin/env python3
"""Extraction throughput (images/s into HDF5 shards) beside the bare backbone forward.

    python benchmarks/extract.py [--images 120] [--image-size 256] [--batch-size 8]

Both are measured in this run on the same synthetic images: the bare forward on images already
decoded in memory, the extraction end to end (decode, resize, forward, write shards, checksums)
for several storage settings. The ratio says how much of the backbone's speed the store keeps.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from effad_hpc.config import parse_config
from effad_hpc.data import ImageDataset, load_category
from effad_hpc.features import build_backbone, extract_category
from effad_hpc.utils.device import autocast, resolve_device

VARIANTS = [("float16", "lzf"), ("float16", "gzip"), ("float32", "none")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120, help="training images (plus validation/test)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layer", default="blocks.4")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the generated images and stores")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="effad-bench-"))
    raw = {
        "name": "bench",
        "data": {"layout": "mvtec_ad", "root": str(work / "data"), "categories": ["washer"],
                 "image_size": args.image_size,
                 "synthetic": {"size": args.image_size, "num_train": args.images, "num_test_good": 10,
                               "num_test_per_defect": 5}},
        "backbone": {"name": args.backbone, "layers": [args.layer]},
        "features": {"batch_size": args.batch_size, "shards": args.shards},
        "run": {"out_dir": str(work / "run")},
    }
    config = parse_config(raw, "benchmark")
    data = load_category(config, "washer")  # generates the images once
    samples = [s for split in ("train", "validation", "test") for s in data.samples(split)]
    device = resolve_device(config.run.device, config.run.precision)

    # Bare forward: decoded images already in memory, nothing written.
    dataset = ImageDataset(samples, args.image_size)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    extractor = build_backbone(config.backbone).extractor.to(device)
    with torch.no_grad(), autocast(device, config.run.precision):
        extractor(images[: args.batch_size].to(device))  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for lo in range(0, len(images), args.batch_size):
            extractor(images[lo: lo + args.batch_size].to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
    bare = len(images) / (time.perf_counter() - start)

    rows = [("bare backbone forward", "-", "-", bare, 1.0, "-")]
    for dtype, compression in VARIANTS:
        variant = parse_config(raw, "benchmark", [f"features.dtype={dtype}", f"features.compression={compression}",
                                                  f"run.out_dir={work / f'run-{dtype}-{compression}'}"])
        start = time.perf_counter()
        result = extract_category(variant, "washer", show_progress=False)
        rate = len(samples) / (time.perf_counter() - start)
        size_mb = sum(p.stat().st_size for p in result.store.glob("*.h5")) / 2**20
        rows.append(("extract into shards", dtype, compression, rate, rate / bare, f"{size_mb:.1f}"))

    print(f"\n{len(samples)} images at {args.image_size} px, {args.backbone} {args.layer}, batch {args.batch_size}, "
          f"device {device}, {torch.get_num_threads()} threads")
    header = f"{'what':<24}{'dtype':<9}{'compress':<10}{'images/s':>10}{'ratio':>8}{'MiB':>8}"
    print(header)
    print("-" * len(header))
    for what, dtype, compression, rate, ratio, size in rows:
        print(f"{what:<24}{dtype:<9}{compression:<10}{rate:>10.1f}{ratio:>8.2f}{size:>8}")
    if args.keep:
        print(f"kept: {work}")
    else:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
