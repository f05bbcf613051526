"""The job graph through submitit: real sbatch, dependencies, sacct, scancel and requeue on the
one-node Slurm cluster, and the same pipeline through the local executor. Nothing is mocked."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import pytest
import submitit
import yaml

from effad_hpc.config import load_config
from effad_hpc.errors import ConfigError
from effad_hpc.hpc.graph import Node, category_graph, is_complete
from effad_hpc.hpc.jobs import StageJob
from effad_hpc.hpc.profiles import load_profile
from effad_hpc.hpc.status import run_states
from effad_hpc.hpc.submit import read_submissions
from effad_hpc.training import read_log, read_record, stage_dir, train

from tests.conftest import REPO

PIPELINE = {
    "teacher": {"hidden_channels": 16, "epochs": 2, "batch_size": 4},
    "student": {"hidden_channels": 16, "residual_blocks": 1, "epochs": 2, "batch_size": 4},
    "evaluation": {"latency_repeats": 2},
}


def _write_config(tmp_path, synthetic_ad, out: str, categories=("fabric", "washer"), **sections) -> str:
    raw = {
        "name": "pipeline", "data": {"layout": "mvtec_ad", "root": str(synthetic_ad), "categories": list(categories),
                                     "image_size": 64, "validation_fraction": 0.25},
        "backbone": {"layers": ["blocks.4"]}, "features": {"dtype": "float32", "shards": 2, "batch_size": 4},
        **PIPELINE, "run": {"out_dir": str(tmp_path / out), "device": "cpu"}, **sections,
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _run(*args, timeout=900):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _stuck_report(states) -> str:
    """What a pipeline that did not finish in time was waiting for, with Slurm's own view."""
    active = [(s.node.category, s.node.name, s.state, s.job_id) for s in states if s.state != "DONE"]
    ids = ",".join(sorted({str(s.job_id).split("_")[0] for s in states if s.job_id}))
    views = [subprocess.run(command, capture_output=True, text=True).stdout for command in (
        ["sacct", "-n", "-P", "-X", "-j", ids, "-o", "JobID,State,Elapsed,Reason"],
        ["squeue", "-h", "-r", "-t", "all", "-j", ids, "-o", "%i|%T|%M|%r"])]
    return f"not done: {active}\nsacct:\n{views[0]}\nsqueue:\n{views[1]}"


def _wait_until_idle(config, timeout=840, unknown_grace=120):  # the whole pipeline of two categories on 2 cores
    """The run's states once no job is active. The test cluster keeps ended jobs for an hour
    (MinJobAge), so UNKNOWN (neither sacct nor squeue lists a job) can only be a moment when
    neither had it: once in CI a cancelled job read UNKNOWN at the last poll. Such a state is
    polled again for up to ``unknown_grace`` seconds before it is returned."""
    deadline = time.monotonic() + timeout
    states = run_states(config)
    while any(s.active for s in states):
        assert time.monotonic() < deadline, _stuck_report(states)
        time.sleep(2)
        states = run_states(config)
    grace = time.monotonic() + unknown_grace
    while any(s.state == "UNKNOWN" for s in states) and time.monotonic() < grace:
        time.sleep(2)
        states = run_states(config)
    return {(s.node.category, s.node.name): s.state for s in states}


def _sacct_states(job_ids: list[str]) -> dict[str, str]:
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(job_ids), "-o", "JobID,State"],
                         capture_output=True, text=True, check=True)
    return dict(line.split("|") for line in out.stdout.splitlines())


def _settled_sacct_states(job_ids: list[str], timeout=120) -> dict[str, str]:
    """Accounting once every job has ended (a job finishes a moment after its last marker)."""
    deadline = time.monotonic() + timeout
    states = _sacct_states(job_ids)
    while {"PENDING", "RUNNING", "COMPLETING"} & set(states.values()):
        assert time.monotonic() < deadline, states
        time.sleep(1)
        states = _sacct_states(job_ids)
    return states


@pytest.mark.slurm
def test_pipeline_on_slurm_cancel_and_rerun_only_what_is_missing(slurm_cluster, synthetic_ad, tmp_path):
    path = _write_config(tmp_path, synthetic_ad, "slurm_run")
    config = load_config(path)
    submitted = _run("-m", "effad_hpc", "run", "--config", path, "--executor", "slurm", "--profile",
                     "slurm/profiles/local.yaml", "--no-wait")
    assert submitted.returncode == 0, submitted.stderr
    jobs = {job["nodes"][0]: job["job_id"] for job in read_submissions(config.run.out_dir)[0]["jobs"]}
    assert len(jobs) == 8 and all(job_id in submitted.stdout for job_id in jobs.values())
    # Cancel one category's student while it waits on its dependencies: Slurm cancels its
    # dependent evaluation too, and the other category is not affected.
    subprocess.run(["scancel", jobs["washer/student_ae"]], check=True)

    states = _wait_until_idle(config)
    stages = ("extract", "teacher", "student_ae", "evaluate:efficientad_ast")
    assert all(states[("fabric", n)] == "DONE" for n in stages)
    assert states[("washer", "teacher")] == "DONE"
    assert states[("washer", "student_ae")] == states[("washer", "evaluate:efficientad_ast")] == "CANCELLED"
    accounting = _settled_sacct_states(list(jobs.values()))
    assert accounting[jobs["fabric/evaluate:efficientad_ast"]] == "COMPLETED"
    assert accounting[jobs["fabric/extract"] + "_1"] == "COMPLETED"  # an extraction array task
    assert accounting[jobs["washer/student_ae"]].startswith("CANCELLED")

    status = _run("-m", "effad_hpc", "status", str(config.run.out_dir))
    assert status.returncode == 0 and "CANCELLED" in status.stdout and "fabric" in status.stdout

    rerun = _run("jobs/run_all.py", "--config", path, "--executor", "slurm", "--profile",
                 "slurm/profiles/local.yaml", "--poll", "2")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    second = read_submissions(config.run.out_dir)[-1]
    assert sorted(node for job in second["jobs"] for node in job["nodes"]) == [
        "washer/evaluate:efficientad_ast", "washer/student_ae"]
    assert len(second["complete"]) == 6
    for category in ("fabric", "washer"):
        results = config.run.out_dir / "efficientad_ast" / "results" / category
        metrics = json.loads((results / "metrics.json").read_text())
        assert 0 <= metrics["metrics"]["image_auroc"] <= 1


@pytest.mark.slurm
def test_shared_distillation_is_one_slurm_job_that_every_category_waits_for(slurm_cluster, synthetic_ad, tmp_path):
    path = _write_config(tmp_path, synthetic_ad, "shared_run", models=["efficientad_s", "patchcore"],
                         efficientad={"image_size": 64, "steps": 4, "checkpoint_every": 2},
                         distillation={"images": str(synthetic_ad), "pattern": "*/train/good/*", "steps": 2,
                                       "batch_size": 2, "normalization_images": 4, "backbone_image_size": 128,
                                       "backbone": {"name": "tf_efficientnet_lite0", "layers": ["blocks.2"]}})
    config = load_config(path)
    submitted = _run("-m", "effad_hpc", "run", "--config", path, "--executor", "slurm", "--profile",
                     "slurm/profiles/local.yaml", "--no-wait")
    assert submitted.returncode == 0, submitted.stderr
    jobs = {job["nodes"][0]: job["job_id"] for job in read_submissions(config.run.out_dir)[0]["jobs"]}
    assert [node for node in jobs if "distill" in node] == ["_shared/distill_s"]
    waits = subprocess.run(["squeue", "-h", "-j", jobs["fabric/efficientad_s"].split("_")[0], "-o", "%E"],
                           capture_output=True, text=True, check=True).stdout
    assert f"afterok:{jobs['_shared/distill_s']}" in waits  # still waiting: distillation takes a while
    states = _wait_until_idle(config)
    assert set(states.values()) == {"DONE"} and ("_shared", "distill_s") in states and len(states) == 11
    for model in ("efficientad_s", "patchcore"):
        for category in ("fabric", "washer"):
            assert (config.run.out_dir / model / "results" / category / "metrics.json").is_file()


@pytest.mark.slurm
def test_rerun_after_a_failed_distillation_trains_efficientad_s_for_every_category(slurm_cluster, synthetic_ad,
                                                                                   tmp_path):
    """The distillation (the `_shared` node) fails, its dependents are cancelled; the rerun, whose
    first pending node is the shared one, must still build every array for the real categories."""
    images = tmp_path / "distillation_images"
    images.mkdir()
    sources = sorted(synthetic_ad.glob("*/train/good/*.png"))[:4]
    for index, source in enumerate(sources):
        shutil.copy(source, images / f"{index}.png")
    broken = images / "3.png"
    broken.write_bytes(b"not a png")
    path = _write_config(tmp_path, synthetic_ad, "distill_fails", models=["efficientad_s"],
                         efficientad={"image_size": 64, "steps": 2, "checkpoint_every": 2},
                         distillation={"images": str(images), "pattern": "*.png", "steps": 2, "batch_size": 2,
                                       "normalization_images": 4, "backbone_image_size": 128,
                                       "backbone": {"name": "tf_efficientnet_lite0", "layers": ["blocks.2"]}})
    config = load_config(path)
    command = ("jobs/run_all.py", "--config", path, "--executor", "slurm", "--profile", "slurm/profiles/local.yaml",
               "--poll", "2")
    first = _run(*command)
    assert first.returncode == 1, first.stdout + first.stderr
    states = {(s.node.category, s.node.name): s.state for s in run_states(config)}
    assert states[("_shared", "distill_s")] == "FAILED"
    assert all(state != "DONE" for node, state in states.items())

    shutil.copy(sources[3], broken)
    rerun = _run(*command)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    second = read_submissions(config.run.out_dir)[-1]
    submitted = sorted(node for job in second["jobs"] for node in job["nodes"])
    assert submitted == ["_shared/distill_s", "fabric/efficientad_s", "fabric/evaluate:efficientad_s",
                         "washer/efficientad_s", "washer/evaluate:efficientad_s"]
    assert set(_wait_until_idle(config).values()) == {"DONE"}
    for category in ("fabric", "washer"):
        assert (config.run.out_dir / "efficientad_s" / "results" / category / "metrics.json").is_file()


@pytest.mark.slurm
def test_requeued_stage_resumes_from_its_checkpoint(slurm_cluster, synthetic_ad, tmp_path):
    path = _write_config(tmp_path, synthetic_ad, "requeue", categories=("fabric",))
    config = load_config(path, ["student.epochs=40", "student.hidden_channels=64", "student.residual_blocks=2",
                                "data.image_size=128"])
    train(config, "efficientad_ast", "fabric", ["teacher"], show_progress=False)
    executor = submitit.AutoExecutor(folder=tmp_path / "logs" / "%j", cluster="slurm", slurm_max_num_timeout=3)
    executor.update_parameters(timeout_min=10, slurm_partition="debug", cpus_per_task=1, mem_gb=2)
    job = executor.submit(StageJob(), config.model_dump(mode="json"), Node("fabric", "student_ae"))
    folder = stage_dir(config, "fabric", "student_ae")
    deadline = time.monotonic() + 300
    while not ((folder / "log.csv").exists() and len(read_log(folder)) >= 3):
        assert time.monotonic() < deadline and not job.done()
        time.sleep(0.2)
    job._interrupt()  # what a preemption does: SIGTERM, then submitit's USR2 -> checkpoint -> requeue
    # A requeued job waits for its begin time (about two minutes); let it start now.
    deadline = time.monotonic() + 60
    while _sacct_states([job.job_id]).get(job.job_id) != "PENDING":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"JobId={job.job_id}", "StartTime=now"], check=True)
    assert job.result().endswith("of 40")
    record = read_record(folder)
    assert record.final_epoch == 40 and record.resumed_at_epochs and 3 <= record.resumed_at_epochs[0] < 40
    assert [int(row["epoch"]) for row in read_log(folder)] == list(range(1, 41))
    assert "requeue" in job.paths.stderr.read_text().lower()


def test_pipeline_through_the_local_executor_and_idempotent_reruns(synthetic_ad, tmp_path):
    path = _write_config(tmp_path, synthetic_ad, "local_run")
    config = load_config(path)
    first = _run("jobs/run_all.py", "--config", path, "--executor", "local", "--poll", "1")
    assert first.returncode == 0, first.stdout + first.stderr
    # As many chain jobs as the cores allow (cores // cpus_per_task), each running whole categories.
    assert re.search(r"[12] job\(s\) submitted to local", first.stdout) and "metrics (test split)" in first.stdout
    states = run_states(config)
    assert {s.state for s in states} == {"DONE"} and len(states) == 8

    again = _run("jobs/run_all.py", "--config", path, "--executor", "local", "--no-wait")
    assert "0 job(s) submitted to local, 8 complete node(s) skipped" in again.stdout

    # A changed student input makes the student and its evaluation incomplete, nothing else.
    changed = load_config(path, ["student.lr=1e-3"])
    incomplete = {node.name for category in ("fabric", "washer")
                  for node in category_graph(changed, category, ["efficientad_ast"]) if not is_complete(changed, node)}
    assert incomplete == {"student_ae", "evaluate:efficientad_ast"}


def test_profiles_load_and_name_bad_keys(tmp_path):
    profile = load_profile(REPO / "slurm" / "profiles" / "dgx_v100.yaml")
    assert profile.gres == "gpu:1" and profile.for_stage("extract").timeout_min == 60
    assert profile.for_stage("teacher").timeout_min == profile.timeout_min
    bad = tmp_path / "bad.yaml"
    bad.write_text("partition: gpu\ngpus: 2\n")
    with pytest.raises(ConfigError, match=f"{bad}: gpus: unknown key"):
        load_profile(bad)


def test_a_failing_category_does_not_stop_the_others(synthetic_ad, tmp_path):
    data = tmp_path / "data"
    for category in ("fabric", "washer"):
        shutil.copytree(synthetic_ad / category, data / category)
    broken = sorted((data / "washer" / "test").glob("*/*.png"))[0]
    broken.write_bytes(b"not a png")
    path = _write_config(tmp_path, data, "failing_run")
    config = load_config(path)
    out = _run("jobs/run_all.py", "--config", path, "--executor", "local", "--poll", "1")
    assert out.returncode == 1, out.stdout + out.stderr
    states = {(s.node.category, s.node.name): s for s in run_states(config)}
    assert all(s.state == "DONE" for (category, _), s in states.items() if category == "fabric")
    assert states[("washer", "extract")].state == "FAILED"
    assert {s.state for (category, name), s in states.items() if category == "washer" and name != "extract"} == {
        "BLOCKED"}
    log = states[("washer", "extract")].log
    assert f"washer extract: FAILED: log {log}" in " ".join(out.stdout.split())
    assert str(broken) in open(log).read()  # the log names the file at fault


def _slurm_clients(folder, squeue: str, sacct: str) -> str:
    """A PATH whose squeue and sacct print the given lines and exit as given ("lines|code")."""
    folder.mkdir(exist_ok=True)
    for name, answer in (("squeue", squeue), ("sacct", sacct)):
        lines, code = answer.rsplit("|", 1)
        script = folder / name
        script.write_text(f"#!/bin/sh\nprintf '{lines}'\nexit {code}\n")
        script.chmod(0o755)
    return f"{folder}:/usr/bin:/bin"


def test_a_job_missing_while_a_slurm_client_fails_is_waited_for_not_taken_as_gone(tmp_path, monkeypatch):
    # A busy controller answers squeue with a socket timeout (exit 1, nothing on stdout) while the
    # accounting has not recorded a just-cancelled job yet. Once happened in CI: the job was taken
    # for gone (UNKNOWN) and the waiting ended early.
    from effad_hpc.hpc.status import _slurm_states

    monkeypatch.setenv("PATH", _slurm_clients(tmp_path / "busy", squeue="|1", sacct="41|COMPLETED|00:01:02\\n|0"))
    busy = _slurm_states(["41", "42_0"])
    assert busy.of("41") == ("COMPLETED", "00:01:02") and busy.of("42_0") == ("PENDING", "")
    monkeypatch.setenv("PATH", _slurm_clients(tmp_path / "both", squeue="42_0|CANCELLED|0:00\\n|0", sacct="|0"))
    assert _slurm_states(["41", "42_0"]).of("42_0") == ("CANCELLED", "0:00")
    monkeypatch.setenv("PATH", _slurm_clients(tmp_path / "gone", squeue="|0", sacct="|0"))
    assert _slurm_states(["41", "42_0"]).of("42_0") == ("UNKNOWN", "")
