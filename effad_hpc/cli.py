"""The ``effad-hpc`` command: a thin layer over the stage functions.

Every subcommand that takes ``--config`` also takes trailing ``KEY.SUB=VALUE`` overrides, which
pass the same validation as the file. Bad input exits with status 2 and one message naming the
file, key or value; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effad_hpc.errors import EffadError


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, type=Path, help="experiment YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY.SUB=VALUE", help="override a config value")


def _add_selection(parser: argparse.ArgumentParser) -> None:
    """``--model`` and ``--category``, read by :func:`_models_and_categories`."""
    parser.add_argument("--model", action="append",
                        help="registered model name, repeatable (default: the config's models)")
    parser.add_argument("--category", help="default: every category of the config")


def _load(args: argparse.Namespace):
    from effad_hpc.config import load_config

    return load_config(args.config, args.overrides)


def cmd_config(args: argparse.Namespace) -> int:
    from effad_hpc.config import config_hash, to_yaml
    from effad_hpc.training import recipe

    config = _load(args)
    for model in config.models:  # as `train` would: a config that prints must also run
        recipe(model)
    print(f"# config hash: {config_hash(config)}")
    print(to_yaml(config), end="")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from effad_hpc.config import SyntheticConfig
    from effad_hpc.data.synthetic import generate
    from effad_hpc.errors import ConfigError

    try:
        options = SyntheticConfig(seed=args.seed, size=args.size, num_train=args.num_train,
                                  num_validation=args.num_validation, num_test_good=args.num_test_good,
                                  num_test_per_defect=args.num_test_per_defect)
    except ValidationError as exc:  # each field is an option of the same name: name it as the user typed it
        raise ConfigError("; ".join(f"--{item['loc'][0].replace('_', '-')} {item['input']}: "
                                    f"{item['msg'].replace('Input should be', 'must be')}"
                                    for item in exc.errors())) from None
    result = generate(args.layout, args.out, args.categories, options)
    out = args.out.resolve()
    for name in result.present:
        print(f"{name}: already present, left unchanged: {out / name}")
    if result.written:
        layout = "MVTec AD" if args.layout == "ad" else "MVTec LOCO AD"
        print(f"{layout} layout, wrote categories {', '.join(result.written)}: {out}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from effad_hpc.data import categories_of
    from effad_hpc.features.extract import extract_category, parse_shard

    config = _load(args)
    shard = parse_shard(args.shard) if args.shard else None
    for category in [args.category] if args.category else categories_of(config):
        result = extract_category(config, category, shard, show_progress=not args.quiet)
        state = "complete" if result.manifest_written else "waiting for other shards"
        print(f"{category}: wrote {len(result.written)}, skipped {len(result.skipped)} complete shard(s); "
              f"store {state}: {result.store}")
    return 0


def _models_and_categories(args: argparse.Namespace, config) -> tuple[list[str], list[str]]:
    """``--model`` (default: the config's models, each checked before any work starts) and
    ``--category`` (default: every category of the config)."""
    from effad_hpc.data import categories_of
    from effad_hpc.errors import ConfigError
    from effad_hpc.training import recipe

    models = args.model or list(config.models)
    for model in models:
        recipe(model)
    categories = categories_of(config)
    if args.category is None:
        return models, categories
    if args.category not in categories:
        raise ConfigError(f"--category {args.category!r}: not a category of {config.data.root} "
                          f"(the config's: {', '.join(categories)})")
    return models, [args.category]


def cmd_train(args: argparse.Namespace) -> int:
    from effad_hpc.evaluation.synthetic_validation import selecting
    from effad_hpc.training import stage_folder, train

    config = _load(args)
    models, categories = _models_and_categories(args, config)
    for category in categories:
        for model in models:
            with selecting(config):
                records = train(config, model, category, args.stage, show_progress=not args.quiet)
            for record in records:
                state = ", stopped early" if record.stopped_early else ""
                print(f"{category} {model} {record.stage}: best {record.best_epoch} of {record.final_epoch} "
                      f"epochs/steps{state}, validation {record.best_validation:.5g}, {record.train_seconds:.1f} s: "
                      f"{stage_folder(config, category, record.stage)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from effad_hpc.evaluation import evaluate_category, results_dir

    config = _load(args)
    models, categories = _models_and_categories(args, config)
    for category in categories:
        for model in models:
            metrics = evaluate_category(config, model, category, show_progress=not args.quiet)["metrics"]
            shown = ", ".join(f"{name} {metrics[name]:.4f}" for name in ("image_auroc", "pixel_auroc", "au_pro",
                                                                         "auroc_loco_mean", "au_spro_0.05_mean")
                              if metrics.get(name) is not None)
            print(f"{category} {model}: {shown}: {results_dir(config, model, category)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from effad_hpc.hpc.profiles import load_profile
    from effad_hpc.hpc.status import DONE, make_console, run_states, summary, watch
    from effad_hpc.hpc.submit import resolve_executor, submit_run

    config = _load(args)
    models, categories = _models_and_categories(args, config)
    executor = resolve_executor(args.executor or config.run.executor)
    profile = load_profile(args.profile or config.run.profile)
    submission = submit_run(config, categories, models, executor, profile)
    console = make_console()
    console.print(f"{config.name}: {len(submission.jobs)} job(s) submitted to {executor}, "
                  f"{len(submission.complete)} complete node(s) skipped; run folder {config.run.out_dir}")
    for job in submission.jobs:
        tasks = f" (array tasks {', '.join(job.tasks)})" if job.tasks else ""
        console.print(f"  {job.job_id}{tasks}: {', '.join(job.nodes)}")
    if executor == "debug":  # in-process: the jobs run when their results are asked for
        for handle in submission.handles:
            try:
                handle.result()
            except Exception as exc:  # a failing category must not stop the others
                console.print(f"[red]job {handle.job_id} failed: {exc}")
    elif args.no_wait:
        console.print(f"follow with: effad-hpc status {config.run.out_dir}")
        return 0
    states = (run_states(config, models) if executor == "debug"
              else watch(config, models, args.poll, console))
    summary(config, states, models, console)
    _write_run_leaderboard(config.run.out_dir, console)
    return 0 if all(s.state == DONE for s in states) else 1


def cmd_sweep(args: argparse.Namespace) -> int:
    from effad_hpc.tune.space import check_space, load_spec

    config = _load(args)
    spec = load_spec(args.space)
    check_space(config.model_dump(mode="json"), spec, args.space)  # before any job or Ray process starts
    if args.executor == "slurm":
        if args.address:
            raise EffadError("--address names a running Ray cluster; --executor slurm starts its own: give one")
        from effad_hpc.hpc.profiles import load_profile
        from effad_hpc.tune.slurm import submit_sweep

        profile = load_profile(args.profile or config.run.profile)
        return submit_sweep(config, args.config, args.overrides, args.space, profile, args.resume, args.poll)
    from effad_hpc.tune.sweep import run_sweep

    result = run_sweep(config, spec, args.space, address=args.address, resume=args.resume)
    counts = {status: sum(row["status"] == status for row in result.trials) for status in ("done", "stopped", "failed")}
    print(f"sweep {result.folder.name}: {len(result.trials)} trials ("
          + ", ".join(f"{n} {status}" for status, n in counts.items()) + f"); summary {result.folder}/sweep_summary.csv"
          + (f"; best config {result.best_config}" if result.best_config else "; no trial finished"))
    return 0 if result.best_config else 1


def _write_run_leaderboard(run_dir: Path, console) -> None:
    from effad_hpc.leaderboard import LeaderboardError, build_leaderboard, write_leaderboard

    try:
        written = write_leaderboard(build_leaderboard([run_dir], compare=True), run_dir / "leaderboard")
    except LeaderboardError as exc:  # nothing evaluated yet
        console.print(f"no leaderboard: {exc}")
        return
    console.print(f"leaderboard: {written[2]}")


def cmd_status(args: argparse.Namespace) -> int:
    from effad_hpc.hpc.status import load_run_config, make_console, run_states, state_table, summary, watch

    config, note = load_run_config(args.run_dir)
    models = list(config.models)
    console = make_console()
    if note:
        console.print(f"note: {note}")
    if args.watch:
        states = watch(config, models, args.poll, console)
    else:
        states = run_states(config, models)
        console.print(state_table(states, f"{config.name}: {config.run.out_dir}"))
    summary(config, states, models, console)
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    import warnings

    from effad_hpc.leaderboard import MetricsWarning, build_leaderboard, write_leaderboard

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricsWarning)
        board = build_leaderboard(args.run_dirs, args.merge, args.compare)
    for warning in caught:
        print(f"effad-hpc: warning: {warning.message}", file=sys.stderr)
    for note in board.merged:
        print(f"merged: {note}")
    out = args.out or args.run_dirs[0] / "leaderboard"
    written = write_leaderboard(board, out)
    print((out / "leaderboard.md").read_text().split("## Per category")[0].rstrip())
    print(f"{len(board.rows)} rows; wrote {', '.join(p.name for p in written)} to {out}")
    return 0


def cmd_prefetch(args: argparse.Namespace) -> int:
    from effad_hpc.features.backbones import create_model
    from effad_hpc.features.weights import prefetch

    config = _load(args)
    backbones = [config.backbone]
    if config.distillation is not None and config.distillation.teacher_weights is None:
        backbones.append(config.backbone_or_main(config.distillation.backbone))  # EfficientAD's teacher's source
    baselines = (config.patchcore, config.padim, config.spade)
    backbones += [config.backbone_or_main(section.backbone) for section in baselines]
    for backbone in {b.model_dump_json(): b for b in backbones}.values():
        print(prefetch(create_model(backbone), backbone))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from effad_hpc.errors import ConfigError
    from effad_hpc.export import TOLERANCE, export_detector

    config = _load(args)
    models, (category,) = _models_and_categories(args, config)
    if len(models) != 1:
        raise ConfigError(f"--model: export writes one model's artifact at a time, got {', '.join(models)}")
    model = models[0]
    if args.batch < 1:
        raise ConfigError(f"--batch {args.batch}: must be at least 1")
    result = export_detector(config, model, category, args.format, args.out, args.batch)
    shape = result.metadata["input"]["shape"]
    print(f"{category} {model}: {args.format} artifact for images {tuple(shape)} (RGB in [0, 1]) -> anomaly_map, "
          f"score; agrees with PyTorch within {result.max_difference:.2g} (tolerance {TOLERANCE:g} relative): "
          f"{result.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="effad-hpc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved, validated config and its hash")
    _add_config(p)
    p.set_defaults(run=cmd_config)

    p = sub.add_parser("synth", help="write a synthetic data set in the MVTec AD or LOCO layout")
    p.add_argument("--layout", choices=["ad", "loco"], required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--categories", nargs="+", default=None, help="default: every category of the layout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128, help="image height in pixels")
    p.add_argument("--num-train", type=int, default=40)
    p.add_argument("--num-validation", type=int, default=10, help="LOCO validation/good images")
    p.add_argument("--num-test-good", type=int, default=10)
    p.add_argument("--num-test-per-defect", type=int, default=4)
    p.set_defaults(run=cmd_synth)

    p = sub.add_parser("extract", help="extract backbone features into the sharded HDF5 store")
    _add_config(p)
    p.add_argument("--category", help="default: every category of the config")
    p.add_argument("--shard", help="write only shard I of N (I/N), e.g. from a job array")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=cmd_extract)

    p = sub.add_parser("train", help="train a model's stages for one or every category (resumes, skips what is done)")
    _add_config(p)
    _add_selection(p)
    p.add_argument("--stage", action="append", help="run only this stage of the model, repeatable")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate trained models on the test split: metrics.json, maps, plots")
    _add_config(p)
    _add_selection(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("run", help="submit the whole pipeline (extract, train, evaluate) as jobs and follow it")
    _add_config(p)
    p.add_argument("--executor", choices=["auto", "slurm", "local", "debug"],
                   help="default: run.executor of the config (auto: Slurm when a controller answers)")
    p.add_argument("--profile", type=Path, help="cluster profile YAML (default: run.profile; see slurm/profiles/)")
    _add_selection(p)
    p.add_argument("--no-wait", action="store_true", help="return after submitting; follow with `effad-hpc status`")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between state updates")
    p.set_defaults(run=cmd_run)

    p = sub.add_parser("sweep", help="Ray Tune search over a sweep file's space on label-free validation data")
    _add_config(p)
    p.add_argument("--space", required=True, type=Path, help="sweep file (see configs/sweeps/)")
    p.add_argument("--executor", choices=["local", "slurm"], default="local",
                   help="local: Ray on this machine (or --address); slurm: one allocation running a Ray cluster")
    p.add_argument("--address",
                   help="HOST:PORT of a running Ray cluster (default: a private Ray here; RAY_ADDRESS is not used)")
    p.add_argument("--profile", type=Path, help="cluster profile YAML for --executor slurm (default: run.profile)")
    p.add_argument("--resume", action="store_true", help="finish a sweep whose driver was stopped")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between state updates (--executor slurm)")
    p.set_defaults(run=cmd_sweep)

    p = sub.add_parser("status", help="state of every stage of a run folder, also for jobs submitted elsewhere")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--watch", action="store_true", help="follow until nothing is pending or running")
    p.add_argument("--poll", type=float, default=5.0)
    p.set_defaults(run=cmd_status)

    p = sub.add_parser("leaderboard", help="leaderboard CSV/Markdown/plots from the metrics.json of one or more runs")
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", type=Path, help="default: RUN_DIR/leaderboard of the first run")
    p.add_argument("--merge", choices=["latest", "best"], default="latest",
                   help="which result to keep when a dataset/model/category appears more than once "
                        "(best: lowest validation loss of the final training stage)")
    p.add_argument("--compare", action="store_true",
                   help="add the thesis's published rows and per-category deltas measured - published")
    p.set_defaults(run=cmd_leaderboard)

    p = sub.add_parser("export", help="write a trained detector as one TorchScript or ONNX file for inference")
    _add_config(p)
    p.add_argument("--model", required=True, action="append", help="registered model name (one)")
    p.add_argument("--category", required=True)
    p.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript")
    p.add_argument("--out", type=Path, help="default: <run>/<model>/export/<category>.pt|.onnx")
    p.add_argument("--batch", type=int, default=1, help="the artifact's fixed batch size")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("prefetch", help="download the weights a config needs (on a login node with internet)")
    _add_config(p)
    p.set_defaults(run=cmd_prefetch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except EffadError as exc:
        print(f"effad-hpc: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused (a read-only folder, a path below a file, a full disk)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"effad-hpc: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # checkpoints are written atomically: a rerun resumes from the last one
        print("effad-hpc: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
