"""The fault suite: data that changes under a run, damaged artifacts, moved runs, concurrent
writers, file-system faults and interrupted processes, each through the CLI or the stage
functions, each with the named error or the correct result it must give."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from effad_hpc.config import load_config
from effad_hpc.evaluation import evaluate_category, read_metrics, results_dir
from effad_hpc.features import FeatureDataset, store_dir
from effad_hpc.features.extract import split_keys
from effad_hpc.hpc.graph import Node, is_complete
from effad_hpc.hpc.status import run_states
from effad_hpc.training import read_record, stage_dir, train
from effad_hpc.training.artifacts import BEST_MODEL

from tests.conftest import REPO, apply_changes, tiny_config_dict

PADIM = {"models": ["padim"], "padim.dims": 8, "evaluation.latency_repeats": 2}
"""PaDiM on the stored features: the quickest model that exercises store, stage and evaluation."""


def cli(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "effad_hpc", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(out: subprocess.CompletedProcess, *parts: str) -> str:
    """The process failed with exit status 2 and a single stderr line that names every part."""
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def own_data(tmp_path, synthetic_ad) -> Path:
    """A copy of one synthetic category that a test may change."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_ad / "grid", root / "grid")
    return root


def write_config(tmp_path: Path, data_root: Path, out: str, changes: dict | None = None) -> tuple[Path, object]:
    raw = apply_changes(tiny_config_dict(data_root, tmp_path / out), {"data.categories": ["grid"], **PADIM,
                                                                      **(changes or {})})
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, load_config(path)


def model_state(config, category: str, stage: str) -> dict:
    return torch.load(stage_dir(config, category, stage) / BEST_MODEL, weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- results follow their inputs ------------------------------------------------------------


def test_changed_data_recomputes_exactly_what_reads_it(tmp_path, own_data):
    _, config = write_config(tmp_path, own_data, "run")
    fitted = train(config, "padim", "grid", show_progress=False)[0]
    first = evaluate_category(config, "padim", "grid", show_progress=False)
    store = store_dir(config, "grid")
    test_shards = {p.name: p.stat().st_mtime_ns for p in store.glob("test-*.h5")}

    # A test mask changes: evaluation is redone, the store and the model are kept.
    mask_path = sorted((own_data / "grid" / "ground_truth").glob("*/*_mask.png"))[0]
    mask = np.asarray(Image.open(mask_path)) > 0
    Image.fromarray(np.roll(mask, mask.shape[0] // 2, axis=0).astype(np.uint8) * 255).save(mask_path)
    assert is_complete(config, Node("grid", "extract")) and is_complete(config, Node("grid", "padim"))
    assert not is_complete(config, Node("grid", "evaluate", "padim"))
    second = evaluate_category(config, "padim", "grid", show_progress=False)
    assert second["key"] != first["key"] and second["metrics"]["pixel_auroc"] != first["metrics"]["pixel_auroc"]
    assert read_record(stage_dir(config, "grid", "padim")).finished_at == fitted.finished_at

    # A training image goes: train and validation are extracted again (the test shards are kept),
    # the model is fitted again and evaluated again.
    removed = sorted((own_data / "grid" / "train" / "good").glob("*.png"))[-1]
    removed.unlink()
    assert not is_complete(config, Node("grid", "extract")) and not is_complete(config, Node("grid", "padim"))
    refitted = train(config, "padim", "grid", show_progress=False)[0]
    assert refitted.key != fitted.key
    keys = split_keys(config, "grid")
    served = [path for split in ("train", "validation")
              for path in FeatureDataset(store, split, expected_key=keys[split]).paths]
    assert str(removed) not in served and len(served) == len(list(removed.parent.glob("*.png")))
    assert {p.name: p.stat().st_mtime_ns for p in store.glob("test-*.h5")} == test_shards
    assert not is_complete(config, Node("grid", "evaluate", "padim"))


def test_a_data_set_moved_with_its_file_times_keeps_every_key(tmp_path, own_data):
    from effad_hpc.evaluation.evaluate import evaluation_key
    from effad_hpc.training.registry import stage_key

    moved = tmp_path / "moved"
    shutil.copytree(own_data, moved)  # copy2: times kept, as mv, cp -p and rsync -a keep them
    _, here = write_config(tmp_path, own_data, "run")
    _, there = write_config(tmp_path, moved, "run")

    def keys(config) -> tuple:
        return (split_keys(config, "grid"), stage_key(config, "padim", "grid"),
                evaluation_key(config, "padim", "grid"))

    assert keys(here) == keys(there)


def test_an_unreadable_image_is_named_not_taken_for_a_write_failure(tmp_path, own_data):
    path, _ = write_config(tmp_path, own_data, "run")
    image = sorted((own_data / "grid" / "train" / "good").glob("*.png"))[0]
    image.write_bytes(image.read_bytes()[:200])
    line = one_line_error(cli("extract", "--config", path, "--quiet"), str(image), "truncated")
    assert "cannot write" not in line


def test_a_model_trained_again_to_another_file_is_evaluated_again(tmp_path, own_data):
    from dataclasses import replace

    from effad_hpc.training.artifacts import artifact_entry, write_record

    _, config = write_config(tmp_path, own_data, "run")
    train(config, "padim", "grid", show_progress=False)
    evaluate_category(config, "padim", "grid", show_progress=False)
    assert is_complete(config, Node("grid", "evaluate", "padim"))
    folder = stage_dir(config, "grid", "padim")
    state = model_state(config, "grid", "padim")
    torch.save({name: value * 2 for name, value in state.items()}, folder / BEST_MODEL)
    write_record(folder, replace(read_record(folder), artifacts={BEST_MODEL: artifact_entry(folder / BEST_MODEL)}))
    assert is_complete(config, Node("grid", "padim"))
    assert not is_complete(config, Node("grid", "evaluate", "padim"))


# --- integrity on every skip ------------------------------------------------------------------


def test_truncated_model_and_shard_are_incomplete_for_run_train_evaluate_and_status(tmp_path, own_data):
    path, config = write_config(tmp_path, own_data, "run")
    assert cli("run", "--config", path, "--executor", "debug").returncode == 0
    reference = model_state(config, "grid", "padim")
    model = stage_dir(config, "grid", "padim") / BEST_MODEL
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    assert not is_complete(config, Node("grid", "padim"))
    states = {s.node.name: s.state for s in run_states(config)}
    assert states["padim"] != "DONE"
    status = cli("status", config.run.out_dir)
    assert status.returncode == 0 and ("FAILED" in status.stdout or "NOT SUBMITTED" in status.stdout)

    shard = store_dir(config, "grid") / "train-00000-of-00002.h5"
    shard.write_bytes(shard.read_bytes()[:1000])
    assert not is_complete(config, Node("grid", "extract"))
    rerun = cli("run", "--config", path, "--executor", "debug")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert all(s.state == "DONE" for s in run_states(config))
    assert_same_state(model_state(config, "grid", "padim"), reference)


def test_train_retrains_a_stage_whose_model_was_replaced(tmp_path, own_data):
    path, config = write_config(tmp_path, own_data, "run")
    fitted = train(config, "padim", "grid", show_progress=False)[0]
    reference = model_state(config, "grid", "padim")
    model = stage_dir(config, "grid", "padim") / BEST_MODEL
    torch.save({name: torch.zeros_like(value) for name, value in reference.items()}, model)
    out = cli("train", "--config", path, "--quiet")
    assert out.returncode == 0, out.stderr
    assert read_record(stage_dir(config, "grid", "padim")).finished_at >= fitted.finished_at
    assert_same_state(model_state(config, "grid", "padim"), reference)


def test_empty_mask_and_unknown_category_are_named_errors(tmp_path, own_data):
    path, _ = write_config(tmp_path, own_data, "run")
    one_line_error(cli("evaluate", "--config", path, "--category", "carpet"), "--category 'carpet'", "grid")
    mask = sorted((own_data / "grid" / "ground_truth").glob("*/*_mask.png"))[0]
    Image.fromarray(np.zeros_like(np.asarray(Image.open(mask)))).save(mask)
    one_line_error(cli("evaluate", "--config", path), str(mask), "marks no pixel")


def test_evaluation_with_a_lost_map_is_redone(tmp_path, own_data):
    _, config = write_config(tmp_path, own_data, "run")
    train(config, "padim", "grid", show_progress=False)
    first = evaluate_category(config, "padim", "grid", show_progress=False)
    lost = next((config.run.out_dir / "padim" / "maps" / "grid").rglob("*.tiff"))
    lost.unlink()
    assert not is_complete(config, Node("grid", "evaluate", "padim"))
    again = evaluate_category(config, "padim", "grid", show_progress=False)
    assert lost.is_file() and again["created_at"] >= first["created_at"]
    assert again["metrics"]["image_auroc"] == first["metrics"]["image_auroc"]


# --- run folders are what they say -------------------------------------------------------------


def test_status_of_a_copied_run_shows_the_copy_and_a_truncated_config_is_refused(tmp_path, own_data):
    path, config = write_config(tmp_path, own_data, "run")
    assert cli("run", "--config", path, "--executor", "debug").returncode == 0
    copy = tmp_path / "copy"
    shutil.copytree(config.run.out_dir, copy)
    shutil.rmtree(copy / "train")
    status = cli("status", copy)
    assert status.returncode == 0, status.stderr
    assert f"written for the run folder {config.run.out_dir}" in status.stdout
    table = status.stdout.split("metrics (test split)")[0]
    assert "NOT SUBMITTED" in table or "FAILED" in table
    assert cli("status", config.run.out_dir).stdout.count("NOT SUBMITTED") == 0

    written = (copy / "config.yaml").read_text()
    for fraction in (0.3, 0.5, 0.8):  # cuts that leave bad YAML, a wrong value or a valid config of defaults
        (copy / "config.yaml").write_text(written[: int(len(written) * fraction)])
        one_line_error(cli("status", copy), str(copy / "config.yaml"), "does not match the hash")
    (copy / "config.yaml").write_text(written.split("\n", 1)[1])
    one_line_error(cli("status", copy), "first line")


# --- concurrent writers ---------------------------------------------------------------------------


def test_two_train_processes_into_a_fresh_folder_both_finish_with_one_result(tmp_path, own_data):
    path, config = write_config(tmp_path, own_data, "run", {"features.shards": 1})
    command = [sys.executable, "-m", "effad_hpc", "train", "--config", str(path), "--quiet"]
    processes = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr
    assert outputs[0][0] == outputs[1][0]  # the same record: one trained it, the other found it complete
    store = store_dir(config, "grid")
    assert not [p for p in store.iterdir() if ".tmp-" in p.name]
    assert is_complete(config, Node("grid", "extract")) and is_complete(config, Node("grid", "padim"))


def test_two_runs_of_one_config_keep_both_submissions_and_finish_every_stage(tmp_path, own_data):
    path, config = write_config(tmp_path, own_data, "run")
    command = [sys.executable, "-m", "effad_hpc", "run", "--config", str(path), "--executor", "local", "--poll", "1"]
    processes = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stdout + stderr
    submissions = json.loads((config.run.out_dir / "jobs.json").read_text())["submissions"]
    assert len(submissions) == 2
    assert {s.state for s in run_states(config)} == {"DONE"}


# --- file-system faults as named errors -----------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    """Mount a tmpfs of a given size (``mount(size_bytes, read_only=False)``): a file system that
    really fills up or refuses writes, also for root. Unmounted at the end."""
    mounts: list[Path] = []

    def mount(size_bytes: int, read_only: bool = False) -> Path:
        point = tmp_path / f"fs{len(mounts)}"
        point.mkdir()
        options = f"size={size_bytes}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            if os.environ.get("CI") == "true":
                pytest.fail(f"cannot mount a tmpfs in CI: {done.stderr}")
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fill(folder: Path, leave_bytes: int) -> Path:
    """Take all but ``leave_bytes`` of the file system's free space with one file."""
    stat = os.statvfs(folder)
    filler = folder / "filler"
    with open(filler, "wb") as handle:
        handle.truncate(0)
        handle.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave_bytes))
    return filler


def test_read_only_and_file_paths_are_named_errors(tmp_path, own_data, small_fs):
    read_only = small_fs(1 << 20, read_only=True)
    path, _ = write_config(tmp_path, own_data, "run", {"run.out_dir": str(read_only / "run")})
    one_line_error(cli("extract", "--config", path, "--quiet"), str(read_only / "run"), "Read-only file system")

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    path, _ = write_config(tmp_path, own_data, "run2", {"run.out_dir": str(blocker / "run")})
    one_line_error(cli("train", "--config", path, "--quiet"), str(blocker), "Not a directory")
    path, _ = write_config(tmp_path, own_data, "run3", {"run.out_dir": str(blocker)})
    one_line_error(cli("train", "--config", path, "--quiet"), str(blocker))

    run_path, config = write_config(tmp_path, own_data, "ok")
    assert cli("run", "--config", run_path, "--executor", "debug").returncode == 0
    one_line_error(cli("leaderboard", config.run.out_dir, "--out", read_only / "board"), str(read_only),
                   "Read-only file system")


def test_full_disk_in_extraction_training_and_evaluation_then_a_rerun_finishes(tmp_path, own_data, small_fs):
    changes = {"models": ["ast"], "teacher.hidden_channels": 32, "teacher.epochs": 2, "teacher.batch_size": 4,
               "ast_student.hidden_channels": 32, "ast_student.residual_blocks": 1, "ast_student.epochs": 2,
               "ast_student.batch_size": 4, "evaluation.latency_repeats": 2}
    reference_path, reference = write_config(tmp_path, own_data, "reference", changes)
    assert cli("run", "--config", reference_path, "--executor", "debug").returncode == 0

    disk = small_fs(64 << 20)
    path, config = write_config(tmp_path, own_data, "full", changes | {"run.out_dir": str(disk / "run")})
    filler = fill(disk, 32 << 10)
    one_line_error(cli("extract", "--config", path, "--quiet"), "No space left on device", str(disk / "run"))
    filler.unlink()
    assert cli("extract", "--config", path, "--quiet").returncode == 0

    filler = fill(disk, 8 << 10)
    one_line_error(cli("train", "--config", path, "--quiet"), "No space left on device", str(disk / "run"))
    filler.unlink()
    assert cli("train", "--config", path, "--quiet").returncode == 0
    for stage in ("teacher", "student"):
        assert_same_state(model_state(config, "grid", stage), model_state(reference, "grid", stage))

    filler = fill(disk, 8 << 10)
    one_line_error(cli("evaluate", "--config", path, "--quiet"), "No space left on device", str(disk / "run"))
    filler.unlink()
    assert cli("evaluate", "--config", path, "--quiet").returncode == 0
    timing = ("latency_ms", "throughput_ips")
    measured = {k: v for k, v in read_metrics(results_dir(config, "ast", "grid"))["metrics"].items()
                if k not in timing and not k.startswith("train_seconds")}
    expected = {k: v for k, v in read_metrics(results_dir(reference, "ast", "grid"))["metrics"].items()
                if k not in timing and not k.startswith("train_seconds")}
    assert measured == expected


# --- interrupted processes ----------------------------------------------------------------------


def test_ctrl_c_is_one_line_with_status_130_and_the_checkpoint_resumes(tmp_path, own_data):
    path, config = write_config(tmp_path, own_data, "run", {
        "models": ["ast"], "teacher.hidden_channels": 32, "teacher.epochs": 200, "teacher.batch_size": 4})
    command = [sys.executable, "-m", "effad_hpc", "train", "--config", str(path), "--stage", "teacher", "--quiet"]
    checkpoint = stage_dir(config, "grid", "teacher") / "last.pt"

    def saved_epoch() -> tuple[int, int] | None:
        if not checkpoint.is_file():
            return None
        return checkpoint.stat().st_mtime_ns, torch.load(checkpoint, weights_only=True)["epoch"]

    def first_new_checkpoint_then_ctrl_c() -> tuple[int, int]:
        """Start the command, Ctrl-C it once it saved a checkpoint of epoch 2 or later; return the
        epoch of the first checkpoint it saved and of the one it left."""
        before = saved_epoch()
        # A terminal's Ctrl-C reaches a command whose SIGINT is at its default. A test run started in
        # the background (`.ci/run &`) ignores SIGINT, children inherit that, and Python then keeps
        # ignoring it (the convention for background jobs): the training would run to its end.
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline, first_saved = time.monotonic() + 300, None
        while first_saved is None or saved_epoch()[1] < 2:
            assert time.monotonic() < deadline and process.poll() is None
            if (now := saved_epoch()) is not None and (before is None or now[0] != before[0]):
                first_saved = first_saved or now[1]
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 130, stderr
        assert stderr.strip().splitlines() == ["effad-hpc: interrupted; run the same command again to resume"]
        return first_saved, saved_epoch()[1]

    _, left = first_new_checkpoint_then_ctrl_c()
    assert 2 <= left < 200
    # The rerun continues from that checkpoint: a restart from epoch 0 would save epoch 1 first.
    resumed_first, _ = first_new_checkpoint_then_ctrl_c()
    assert left + 1 <= resumed_first <= left + 2  # one more if a save landed between two looks


STAGE_KINDS = {
    # kind: (extra config, the command that is killed and rerun, what is compared)
    "extract": ({}, ["extract"], "features"),
    "teacher": ({"models": ["ast"]}, ["train", "--stage", "teacher"], "teacher"),
    "student": ({"models": ["efficientad_ast"]}, ["train", "--stage", "student_ae"], "student_ae"),
    "step_loop": ({"models": ["efficientad_s"]}, ["train"], "efficientad_s"),
    "baseline_fit": ({"models": ["padim"], "padim.dims": 64}, ["train"], "padim"),
    "evaluate": ({"models": ["padim"]}, ["evaluate"], "metrics"),
}
NETS = {"teacher.hidden_channels": 32, "teacher.epochs": 12, "teacher.batch_size": 2,
        "student.hidden_channels": 32, "student.residual_blocks": 1, "student.epochs": 12, "student.batch_size": 2,
        "student.patience_fraction": None, "evaluation.latency_repeats": 2, "data.image_size": 128}


def _efficientad(data_root: Path) -> dict:
    return {"efficientad": {"image_size": 64, "steps": 40, "checkpoint_every": 5},
            "distillation": {"images": str(data_root), "pattern": "*/train/good/*", "steps": 20, "batch_size": 2,
                             "normalization_images": 4, "checkpoint_every": 5, "backbone_image_size": 128,
                             "backbone": {"name": "tf_efficientnet_lite0", "layers": ["blocks.2", "blocks.3"]}}}


def _prepare(kind: str, config, path: Path) -> None:
    """What the killed command reads, made beforehand (the same in both folders)."""
    if kind == "student":
        assert cli("train", "--config", path, "--stage", "teacher", "--quiet").returncode == 0
    if kind == "evaluate":
        assert cli("train", "--config", path, "--quiet").returncode == 0


def _result(config, compared: str):
    if compared == "features":
        keys = split_keys(config, "fabric")
        return {split: np.stack([item["features"]["blocks.4"].numpy()
                                 for item in FeatureDataset(store_dir(config, "fabric"), split,
                                                            expected_key=keys[split])])
                for split in keys}
    if compared == "metrics":
        metrics = read_metrics(results_dir(config, "padim", "fabric"))["metrics"]
        return {k: v for k, v in metrics.items()  # not the times, which the two folders measured
                if k not in ("latency_ms", "throughput_ips") and not k.startswith("train_seconds")}
    return model_state(config, "fabric", compared)


@pytest.mark.parametrize("kind", list(STAGE_KINDS))
def test_kill_9_at_a_random_point_then_rerun_gives_the_uninterrupted_result(kind, tmp_path, synthetic_fabric):
    extra, command, compared = STAGE_KINDS[kind]
    changes = NETS | extra | {"data.categories": ["fabric"]}
    if kind == "step_loop":
        changes |= _efficientad(synthetic_fabric)
    results, seconds = {}, None
    for out in ("reference", "killed"):
        raw = apply_changes(tiny_config_dict(synthetic_fabric, tmp_path / out), changes)
        raw["data"]["categories"] = ["fabric"]
        path = tmp_path / f"{out}.yaml"
        path.write_text(yaml.safe_dump(raw))
        config = load_config(path)
        _prepare(kind, config, path)
        argv = [sys.executable, "-m", "effad_hpc", *command, "--config", str(path), "--quiet"]
        if out == "reference":
            started = time.monotonic()
            assert subprocess.run(argv, cwd=REPO, capture_output=True, timeout=600).returncode == 0
            seconds = time.monotonic() - started
        else:
            # A seeded random point in the second half of the reference's time (the first is mostly
            # the interpreter and torch starting up). A second run can be faster than the reference
            # (warm file caches: an 8-second evaluation once ended before its kill at 7.1 s); such
            # a run killed nothing, so its folder is made again and the point moved earlier.
            fraction = np.random.default_rng(list(STAGE_KINDS).index(kind)).uniform(0.5, 0.9)
            for attempt in range(3):
                delay = seconds * fraction * 0.7 ** attempt
                process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(delay)
                if process.poll() is None:
                    break
                shutil.rmtree(config.run.out_dir)
                _prepare(kind, config, path)
            else:
                pytest.fail(f"{kind}: every run finished before its kill (the last at {delay:.1f} s)")
            process.kill()
            process.wait()
            rerun = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
            assert rerun.returncode == 0, rerun.stderr
        results[out] = _result(config, compared)
    if compared == "metrics":
        assert results["killed"] == results["reference"]
    elif compared == "features":
        for split in results["reference"]:
            np.testing.assert_array_equal(results["killed"][split], results["reference"][split])
    else:
        assert_same_state(results["killed"], results["reference"])

