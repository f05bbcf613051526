"""Ray Tune sweeps for real: local Ray, tiny trials, the label-free objective, ASHA, shared
artifacts, failures, a killed driver, and the Slurm allocation on the one-node cluster."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from effad_hpc.config import load_config
from tests.conftest import REPO, apply_changes, tiny_config_dict

pytestmark = pytest.mark.timeout(1200)

TINY_AST = {
    "models": ["efficientad_ast"], "data.categories": ["fabric"],
    "backbone.layers": ["blocks.4"],
    "teacher.hidden_channels": 16, "teacher.epochs": 2,
    "student.hidden_channels": 16, "student.epochs": 6, "student.patience_fraction": None,
    "student.penalty": False, "validation_anomalies.count": 4,
    "evaluation.latency_repeats": 1, "evaluation.bins": 200,
    "evaluation.write_overlays": False, "evaluation.write_masks": False,
}


def _cli(*args, timeout=1100, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "effad_hpc", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def _files(tmp_path: Path, data: Path, space: dict, changes: dict | None = None) -> tuple[Path, Path]:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(apply_changes(tiny_config_dict(data, tmp_path / "run"),
                                                   {**TINY_AST, **(changes or {})})))
    spec = tmp_path / f"{space.pop('name', 'sweep')}.yaml"
    spec.write_text(yaml.safe_dump({"models": ["efficientad_ast"], "resources": {"cpu": 1}, **space}))
    return config, spec


def _summary(folder: Path) -> list[dict]:
    with open(folder / "sweep_summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _record(folder: Path, trial: str) -> dict:
    return json.loads((folder / "trials" / trial / "trial.json").read_text())


def test_asha_sweep_stops_weak_trials_shares_the_teacher_and_evaluates_the_best(tmp_path, synthetic_ad):
    config_path, spec = _files(tmp_path, synthetic_ad, {
        "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
        "num_samples": 5, "max_concurrent": 2, "top_k": 1, "seed": 1,
        "space": {"student.hidden_channels": {"choice": [8, 16, 32]}, "student.lr": {"loguniform": [1e-6, 1e-2]}}})
    out = _cli("sweep", "--config", config_path, "--space", spec)
    assert out.returncode == 0, out.stdout + out.stderr
    folder = tmp_path / "run" / "sweeps" / "sweep"
    rows = _summary(folder)
    assert len(rows) == 5 and {row["status"] for row in rows} <= {"done", "stopped"}
    assert any(row["status"] == "stopped" and row["stopped_early"] == "True" for row in rows), rows
    # the summary says what each trial itself recorded, report by report
    for row in rows:
        reports = _record(folder, row["trial"])["reports"]
        assert row["objective_by_round"] == ";".join(f"{r['validation_round']}:{r['objective']:.6g}" for r in reports)
        assert float(row["objective_last"]) == pytest.approx(reports[-1]["objective"])
        assert int(row["rounds"]) == reports[-1]["validation_round"]
        assert (row["status"] == "done") == reports[-1]["final"]
    # trials that differ only in student settings: one feature store, one teacher, trained once
    cache = tmp_path / "run" / "sweeps" / "cache"
    assert len(list((cache / "features" / "fabric").iterdir())) == 1
    teachers = list((cache / "train" / "fabric" / "teacher").glob("*/stage.json"))
    assert len(teachers) == 1
    assert json.loads(teachers[0].read_text())["resumed_at_epochs"] == []
    assert len(list((cache / "train" / "fabric" / "student_ae").glob("*/"))) == len(
        {(row["param:student.hidden_channels"], row["param:student.lr"]) for row in rows})
    # only the best trial was evaluated on test, and only after the search
    best = max((row for row in rows if row["status"] == "done"), key=lambda row: float(row["objective_last"]))
    evaluated = [row for row in rows if row.get("test_image_auroc")]
    assert [row["trial"] for row in evaluated] == [best["trial"]]
    metrics = json.loads((folder / "trials" / best["trial"] / "efficientad_ast" / "results" / "fabric" /
                          "metrics.json").read_text())
    assert metrics["trial"] == f"sweep/{best['trial']}"
    assert float(best["test_image_auroc"]) == pytest.approx(metrics["metrics"]["image_auroc"])
    assert 0 <= metrics["metrics"]["val_synthetic_image_auroc"] <= 1
    with open(folder / "leaderboard" / "leaderboard.csv", newline="") as handle:
        assert [row["trial"] for row in csv.DictReader(handle)] == [f"sweep/{best['trial']}"]
    # the best config is a normal run's config, with the trial's values
    best_config = load_config(folder / "best_config.yaml")
    assert best_config.student.hidden_channels == int(best["param:student.hidden_channels"])
    assert best_config.student.lr == pytest.approx(float(best["param:student.lr"]))
    assert _cli("config", "--config", folder / "best_config.yaml").returncode == 0
    plots = {path.name for path in (folder / "plots").glob("*.png")}
    assert plots == {"objective_vs_student.hidden_channels.png", "objective_vs_student.lr.png",
                     "objective_over_time.png"}
    assert "best objective" in out.stderr  # the progress lines


def test_a_failing_trial_is_retried_then_recorded_and_no_test_file_is_read(tmp_path, synthetic_ad):
    data = tmp_path / "data"
    shutil.copytree(synthetic_ad / "fabric", data / "fabric")
    test_files = [p for part in ("test", "ground_truth") for p in (data / "fabric" / part).rglob("*") if p.is_file()]
    for path in test_files:  # any read of a test file or mask sets its access time (relatime)
        os.utime(path, (0, path.stat().st_mtime))
    config_path, spec = _files(tmp_path, data, {
        "scheduler": {"kind": "fifo"}, "search": "grid", "num_samples": 1, "max_concurrent": 2,
        "max_failures": 1, "top_k": 0,
        "space": {"student.penalty_images": {"grid": [None, str(tmp_path / "no_such_folder")]}}},
        {"student.penalty": True})
    out = _cli("sweep", "--config", config_path, "--space", spec)
    assert out.returncode == 0, out.stdout + out.stderr
    folder = tmp_path / "run" / "sweeps" / "sweep"
    rows = {row["param:student.penalty_images"] or "": row for row in _summary(folder)}
    failed, done = rows[str(tmp_path / "no_such_folder")], rows[""]
    assert failed["status"] == "failed" and failed["tries"] == "2" and "no_such_folder" in failed["error"]
    assert done["status"] == "done" and done["tries"] == "1" and float(done["objective_last"]) >= 0
    assert [path for path in test_files if path.stat().st_atime != 0] == []
    # the synthetic-anomaly set: made once, from validation images, shared by every trial
    sets = list((tmp_path / "run" / "sweeps" / "cache").rglob("validation_anomalies/fabric/*/manifest.json"))
    assert len(sets) == 1


def test_a_space_key_or_value_the_schema_rejects_stops_before_ray_starts(tmp_path, synthetic_ad):
    for space, key in (({"student.hiden_channels": {"choice": [8]}}, "student.hiden_channels"),
                       ({"student.hidden_channels": {"choice": [8, "wide"]}}, "student.hidden_channels"),
                       ({"student.lr": {"uniform": [-1.0, 1.0]}}, "student.lr")):
        config_path, spec = _files(tmp_path, synthetic_ad, {"space": space})
        started = time.monotonic()
        out = _cli("sweep", "--config", config_path, "--space", spec)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, out.stderr
        assert str(spec) in lines[0] and key in lines[0]
        assert not (tmp_path / "run" / "sweeps").exists()
        assert time.monotonic() - started < 60


def test_a_killed_driver_resumes_without_redoing_a_finished_trial(tmp_path, synthetic_ad):
    config_path, spec = _files(tmp_path, synthetic_ad, {
        "scheduler": {"kind": "fifo"}, "num_samples": 3, "max_concurrent": 1, "top_k": 0,
        "space": {"student.hidden_channels": {"choice": [8, 16, 32]}}})
    folder = tmp_path / "run" / "sweeps" / "sweep"
    driver = subprocess.Popen([sys.executable, "-m", "effad_hpc", "sweep", "--config", str(config_path), "--space",
                               str(spec)], cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    finished = None
    while finished is None:
        assert time.monotonic() < deadline and driver.poll() is None
        time.sleep(1)
        for record in folder.glob("trials/*/trial.json"):
            reports = json.loads(record.read_text())["reports"]
            if reports and reports[-1]["final"]:
                finished = record
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    before = (finished.read_text(), finished.stat().st_mtime_ns)
    out = _cli("sweep", "--config", config_path, "--space", spec, "--resume")
    assert out.returncode == 0, out.stdout + out.stderr
    rows = _summary(folder)
    assert len(rows) == 3 and {row["status"] for row in rows} == {"done"}
    assert (finished.read_text(), finished.stat().st_mtime_ns) == before
    # starting it again without --resume is refused with what to do
    again = _cli("sweep", "--config", config_path, "--space", spec)
    assert again.returncode == 2 and "--resume" in again.stderr


def test_a_baseline_sweep_with_optuna_search(tmp_path, synthetic_ad):
    config_path, spec = _files(tmp_path, synthetic_ad, {
        "models": ["patchcore"], "scheduler": {"kind": "fifo"}, "search": "optuna", "num_samples": 2,
        "max_concurrent": 2, "top_k": 1,
        "space": {"patchcore.coreset_ratio": {"uniform": [0.05, 0.5]}, "patchcore.num_neighbors": {"choice": [1, 3]}}},
        {"models": ["patchcore"], "backbone.layers": ["blocks.2", "blocks.4"]})
    out = _cli("sweep", "--config", config_path, "--space", spec)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = _summary(tmp_path / "run" / "sweeps" / "sweep")
    assert len(rows) == 2 and {row["status"] for row in rows} == {"done"}
    assert all(0.05 <= float(row["param:patchcore.coreset_ratio"]) <= 0.5 for row in rows)
    assert sum(bool(row["test_image_auroc"]) for row in rows) == 1


@pytest.mark.slurm
def test_sweep_in_a_slurm_allocation_runs_a_ray_cluster_and_writes_its_summary(slurm_cluster, tmp_path,
                                                                               synthetic_ad):
    config_path, spec = _files(tmp_path, synthetic_ad, {
        "scheduler": {"kind": "fifo"}, "num_samples": 2, "max_concurrent": 1, "top_k": 1,
        "space": {"student.hidden_channels": {"choice": [8, 16]}}})
    out = _cli("sweep", "--config", config_path, "--space", spec, "--executor", "slurm", "--profile",
               REPO / "slurm" / "profiles" / "local.yaml", "--poll", "2")
    folder = tmp_path / "run" / "sweeps" / "sweep"
    logs = "\n".join(p.read_text()[-3000:] for p in folder.glob("logs/*/*.err"))
    assert out.returncode == 0, out.stdout + out.stderr + logs
    assert "allocation" in out.stdout
    rows = _summary(folder)
    assert len(rows) == 2 and {row["status"] for row in rows} == {"done"}
    assert (folder / "best_config.yaml").is_file()
    token = folder / "ray_auth_token"
    assert token.stat().st_mode & 0o777 == 0o600


def _finished_trial(folder: Path) -> Path | None:
    for record in folder.glob("trials/*/trial.json"):
        reports = json.loads(record.read_text())["reports"]
        if reports and reports[-1]["final"]:
            return record
    return None


@pytest.mark.slurm
def test_a_preempted_sweep_allocation_is_requeued_and_finishes_without_redoing_a_trial(slurm_cluster, tmp_path,
                                                                                        synthetic_ad):
    config_path, spec = _files(tmp_path, synthetic_ad, {
        "scheduler": {"kind": "fifo"}, "num_samples": 2, "max_concurrent": 1, "top_k": 1,
        "space": {"student.hidden_channels": {"choice": [8, 16]}}}, {"student.epochs": 30})
    folder = tmp_path / "run" / "sweeps" / "sweep"
    driver = subprocess.Popen([sys.executable, "-m", "effad_hpc", "sweep", "--config", str(config_path), "--space",
                               str(spec), "--executor", "slurm", "--profile",
                               str(REPO / "slurm" / "profiles" / "local.yaml"), "--poll", "2"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job_id = None
    try:
        deadline = time.monotonic() + 600
        while (finished := _finished_trial(folder)) is None:
            assert time.monotonic() < deadline and driver.poll() is None, driver.communicate()[0]
            time.sleep(1)
        before = (finished.read_text(), finished.stat().st_mtime_ns)
        [job_id] = [p.name for p in (folder / "logs").iterdir() if p.name.isdigit()]
        # What a preemption does (submitit's own test hook): SIGTERM, then USR2 -> requeue.
        for signal_name in ("SIGTERM", "USR2"):
            subprocess.run(["scancel", job_id, "--signal", signal_name], check=True)
        # A requeued job waits for its begin time (about two minutes); let it start now.
        deadline = time.monotonic() + 120
        while "PENDING" not in subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                                              text=True).stdout:
            assert time.monotonic() < deadline and driver.poll() is None, driver.communicate()[0]
            time.sleep(0.5)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
        output, _ = driver.communicate(timeout=900)
    finally:
        if driver.poll() is None:
            driver.kill()
        if job_id and driver.returncode:
            subprocess.run(["scancel", "--full", job_id], check=False)
    logs = "\n".join(p.read_text()[-3000:] for p in folder.glob("logs/*/*.err"))
    assert driver.returncode == 0, output + logs
    assert "this job is preempted" in logs and "requeued; continuing the experiment" in logs, logs
    rows = _summary(folder)
    assert len(rows) == 2 and {row["status"] for row in rows} == {"done"}
    assert sum(bool(row["test_image_auroc"]) for row in rows) == 1
    assert (finished.read_text(), finished.stat().st_mtime_ns) == before  # not trained again


@pytest.mark.parametrize("grace_period, reduction_factor", [(1, 2.0), (2, 3.0), (1, 2.5), (3, 1.5)])
def test_trials_score_exactly_the_rounds_where_ashas_own_brackets_decide(grace_period, reduction_factor):
    """Scoring only at ASHA's milestones (and at category ends) must hit every milestone Ray's
    scheduler has, at the first round at or past it, and nothing in between."""
    import math

    from ray.tune.schedulers import ASHAScheduler

    from effad_hpc.tune.trial import TrialSetup

    scheduler = ASHAScheduler(time_attr="round", max_t=200, grace_period=grace_period,
                              reduction_factor=reduction_factor)
    milestones = {math.ceil(milestone) for milestone, _ in scheduler._brackets[0]._rungs}
    setup = TrialSetup({}, "efficientad_ast", ["fabric"], "/tmp", "sweep", "val_synthetic_mean",
                       (grace_period, reduction_factor))
    assert {r for r in range(1, 201) if setup.scores_round(r)} == milestones
    fifo = TrialSetup({}, "efficientad_ast", ["fabric"], "/tmp", "sweep", "val_synthetic_mean")
    assert not any(fifo.scores_round(r) for r in range(1, 50))
