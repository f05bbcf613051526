#!/usr/bin/env python3
"""Train the models of a config on its categories; print detection quality and training time.

    python benchmarks/train.py [--config configs/demo.yaml] [--models M ...] [--out DIR] [KEY.SUB=VALUE ...]

For each category and model (default: the config's ``models``): image AUROC (the model's image
score) and pixel AUROC on the test split, training seconds per stage, best/final epoch (steps for
EfficientAD, 1 for fitted baselines), and inference ms per image (batch 1, after warm-up). Shared
stages (the AST teacher, EfficientAD's distillation) are trained once and counted where they
ran. The last column is each model's total training time relative to the first model's in this
run. Synthetic data only says that the pipeline works; it is not a measure of a method (judge
that on MVTec).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from effad_hpc.config import Precision, load_config
from effad_hpc.data import ImageDataset, categories_of, ensure_dataset, load_category
from effad_hpc.evaluation.synthetic_validation import selecting
from effad_hpc.training import load_detector, predict, train
from effad_hpc.utils.device import autocast, device_record, resolve_device


def _mask(data, sample, size: int) -> np.ndarray:
    mask = Image.fromarray(data.union_mask(sample)).resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(mask, dtype=bool)


def _latency_ms(detector, samples, size: int, device, precision: Precision, repeats: int = 10) -> float:
    image = ImageDataset(samples[:1], size)[0]["image"][None].to(device)
    with autocast(device, precision):
        for _ in range(3):
            detector(image)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            detector(image)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--models", nargs="+", help="default: the config's models")
    parser.add_argument("--out", type=Path, help="run folder (default: a new temporary folder)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="effad-bench-train-"))
    config = load_config(args.config, [*args.overrides, f"run.out_dir={out}"])
    device = resolve_device(config.run.device, config.run.precision)
    models = args.models or list(config.models)
    ensure_dataset(config)  # a synthetic set is generated on first use, as `effad-hpc run` does

    rows = []
    for category in categories_of(config):
        data = load_category(config, category)
        samples = data.samples("test")
        labels = np.array([s.label for s in samples])
        for model in models:
            started = time.perf_counter()
            with selecting(config):  # as `effad-hpc train`: a stage may select by a synthetic-anomaly score
                records = train(config, model, category, show_progress=False)
            wall = time.perf_counter() - started
            detector = load_detector(config, model, category, device)
            size = detector.image_size  # the model's input side; its maps come at that size
            masks = np.stack([_mask(data, s, size) for s in samples])
            scores, maps = np.zeros(len(samples)), np.zeros((len(samples), size, size), dtype=np.float32)
            for indices, output in predict(detector, samples, config, device):
                scores[indices] = output["score"].numpy()
                maps[indices] = output["maps"]["combined"].numpy()
            rows.append({
                "category": category, "model": model,
                "image_auroc": roc_auc_score(labels, scores),
                "pixel_auroc": roc_auc_score(masks.ravel(), maps.ravel()),
                "stages": {r.stage: (r.train_seconds, r.best_epoch, r.final_epoch) for r in records},
                "train_s": sum(r.train_seconds for r in records), "wall_s": wall,
                "ms": _latency_ms(detector, samples, size, device, config.run.precision),
            })

    compute = device_record(device, config.run.precision)
    print(f"\n{config.name}: {', '.join(categories_of(config))}, device {device} ({compute['device_name']}, "
          f"{compute['precision']}), {torch.get_num_threads()} threads; run folder {out}")
    header = (f"{'category':<10}{'model':<17}{'img AUROC':>10}{'px AUROC':>10}  "
              f"{'stage: train s (best/final epoch)':<52}{'ms/img':>8}{f'train vs {models[0]}':>26}")
    print(header)
    print("-" * len(header))
    reference = {r["category"]: r["train_s"] for r in rows if r["model"] == models[0]}
    for r in rows:
        stages = ", ".join(f"{name} {s:.1f} ({best}/{final})" for name, (s, best, final) in r["stages"].items())
        print(f"{r['category']:<10}{r['model']:<17}{r['image_auroc']:>10.3f}{r['pixel_auroc']:>10.3f}  {stages:<52}"
              f"{r['ms']:>8.1f}{r['train_s'] / max(reference[r['category']], 1e-9):>26.2f}")
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        print(f"{'mean':<10}{model:<17}{np.mean([r['image_auroc'] for r in mine]):>10.3f}"
              f"{np.mean([r['pixel_auroc'] for r in mine]):>10.3f}")


if __name__ == "__main__":
    main()
