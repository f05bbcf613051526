#!/usr/bin/env python3
"""Detection quality on real photographs: train and evaluate models on one MVTec-layout category.

    python benchmarks/quality.py [--data DIR] [--category X] [--config configs/real_cpu.yaml]
        [--models M ...] [--variant "NAME=KEY=VALUE [KEY=VALUE ...]" ...] [--out DIR] [KEY.SUB=VALUE ...]

Default: the real cookie photographs in ``../shared/data/l4v_cookie`` (CC BY-SA 4.0, see its
PROVENANCE.txt) with ``configs/real_cpu.yaml``. Every model is trained and evaluated through the
pipeline's own stages (``effad-hpc train`` / ``evaluate``), so the numbers are the ones a user
gets. Per model: image AUROC, pixel AUROC, AU-PRO, image and pixel F1 at the thresholds chosen on
the good validation images, the label-free synthetic-anomaly validation scores (what a choice
between settings must be made on), training seconds, latency (ms per image at batch 1) and each
metric's difference to PatchCore in the same run (PatchCore is always run); for a model whose
map combines parts (EfficientAD-AST's ``st`` and ``ae``), each part's validation scores.

``--variant`` adds rows of ``--variant-model`` (default: efficientad_ast) trained with the given
overrides (an ablation); the variants share one feature store and, where their settings allow,
one teacher (``run.shared_dir``). The variant the validation score ranks first is named at the
end: test metrics are printed as they come and never used to choose.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

from effad_hpc.config import load_config, parse_config
from effad_hpc.errors import EffadError
from effad_hpc.evaluation import evaluate_category
from effad_hpc.evaluation.synthetic_validation import objective_value, selecting
from effad_hpc.training import train
from effad_hpc.utils.atomic import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "l4v_cookie"
REFERENCE = "patchcore"
COLUMNS = [  # (metrics.json name, header, compared with PatchCore)
    ("image_auroc", "img AUROC", True), ("pixel_auroc", "px AUROC", True), ("au_pro", "AU-PRO", True),
    ("image_f1", "img F1", True), ("pixel_f1", "px F1", True),
    ("val_synthetic_image_auroc", "val img", False), ("val_synthetic_au_pro", "val PRO", False),
]
PART_PREFIX = "val_synthetic_au_pro_"
"""metrics.json names each part of a combined map (``st``, ``ae``, ...) with this prefix."""
VALIDATION_SCORE = "val_synthetic_mean"
"""What the variants are ranked on, as sweeps rank trials: the mean of the synthetic-anomaly
validation set's image AUROC and AU-PRO."""


def _variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected \"NAME=KEY=VALUE [KEY=VALUE ...]\"")
    return name, overrides.split()


def _row(config, model: str, category: str, variant: str) -> dict:
    started = time.monotonic()
    with selecting(config):
        train(config, model, category, show_progress=False)
    result = evaluate_category(config, model, category, show_progress=False)
    metrics = result["metrics"]
    return {"model": model, "variant": variant, **{name: metrics.get(name) for name, _, _ in COLUMNS},
            "train_s": metrics.get("train_seconds_total"), "latency_ms": metrics.get("latency_ms"),
            "parts": {part: {metric: metrics.get(f"val_synthetic_{metric}_{part}")
                             for metric in ("image_auroc", "au_pro")}
                      for part in (name.removeprefix(PART_PREFIX) for name in metrics if name.startswith(PART_PREFIX))},
            "wall_s": time.monotonic() - started, "device": result["compute"]["device_name"]}


def _cell(value, width: int, signed: bool = False) -> str:
    if value is None:
        return f"{'-':>{width}}"
    return f"{value:>+{width}.3f}" if signed else f"{value:>{width}.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="an MVTec AD layout folder")
    parser.add_argument("--category", default="cookie")
    parser.add_argument("--config", default=str(REPO / "configs" / "real_cpu.yaml"))
    parser.add_argument("--models", nargs="+", help="default: the config's models")
    parser.add_argument("--variant", type=_variant, action="append", default=[],
                        help='"NAME=KEY=VALUE [KEY=VALUE ...]": an extra row of --variant-model with these overrides')
    parser.add_argument("--variant-model", default="efficientad_ast")
    parser.add_argument("--out", type=Path, help="run folders (default: a new temporary folder)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="effad-bench-quality-"))
    fixed = [f"data.root={args.data}", f"data.categories=[{args.category}]", "data.synthetic=null",
             f"run.shared_dir={out / 'shared'}"]

    # Read once: every variant applies its overrides to this document, so editing the YAML while
    # the benchmark runs cannot change the variants that follow.
    document = load_config(args.config, [*args.overrides, *fixed]).model_dump(mode="json")

    def config_for(variant: str, overrides: list[str]):
        return parse_config(copy.deepcopy(document), args.config, [*overrides, f"run.out_dir={out / variant}"])

    base = config_for("base", [])
    models = list(dict.fromkeys([REFERENCE, *(args.models or base.models)]))
    rows = [_row(base, model, args.category, "") for model in models]
    for name, overrides in args.variant:
        rows.append(_row(config_for(name, overrides), args.variant_model, args.category, name))
    atomic_write_json(out / "quality.json", {"data": str(args.data), "category": args.category,
                                             "config": args.config, "overrides": args.overrides, "rows": rows})

    reference = next(row for row in rows if row["model"] == REFERENCE)
    print(f"\n{args.data.name}/{args.category}, {args.config} {' '.join(args.overrides)}; device {rows[0]['device']}; "
          f"run folders {out}")
    compared = [(name, title) for name, title, versus in COLUMNS if versus]
    header = (f"{'model':<17}{'variant':<18}" + "".join(f"{title:>10}" for _, title, _ in COLUMNS)
              + f"{'train s':>9}{'ms/img':>8}" + "".join(f"{'Δ ' + title:>13}" for _, title in compared)
              + f"{'ms/PatchCore':>13}")
    print(header)
    print("-" * len(header))
    for row in rows:
        deltas = "".join(_cell(None if row[name] is None or reference[name] is None else row[name] - reference[name],
                               13, signed=True) for name, _ in compared)
        ratio = row["latency_ms"] / reference["latency_ms"] if row["latency_ms"] and reference["latency_ms"] else None
        print(f"{row['model']:<17}{row['variant'] or '(config)':<18}"
              + "".join(_cell(row[name], 10) for name, _, _ in COLUMNS)
              + f"{row['train_s'] or 0:>9.1f}{row['latency_ms'] or 0:>8.1f}" + deltas + _cell(ratio, 13))
    parted = [row for row in rows if row["parts"]]
    if parted:
        print("\nvalidation image AUROC / AU-PRO of each part of the combined map (which part finds and localises):")
        for row in parted:
            print(f"{row['model']:<17}{row['variant'] or '(config)':<18}" + "".join(
                f"  {part} {_cell(scores['image_auroc'], 5)} / {_cell(scores['au_pro'], 5)}"
                for part, scores in row["parts"].items()))
    candidates = [row for row in rows if row["model"] == args.variant_model]
    if len(candidates) > 1:
        best = max(candidates, key=lambda row: objective_value(row, VALIDATION_SCORE))
        print(f"\nchosen on the synthetic-anomaly validation score ({VALIDATION_SCORE}): "
              f"{args.variant_model} {best['variant'] or '(config)'}")


if __name__ == "__main__":
    try:
        main()
    except EffadError as exc:  # a missing folder or category, a bad override: one line, as the CLI says it
        sys.exit(f"quality.py: error: {exc}")
