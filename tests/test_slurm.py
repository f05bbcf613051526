"""Real jobs on the one-node Slurm cluster of slurm/cluster.sh, submitted through submitit."""

import subprocess
import time

import pytest
import submitit

from effad_hpc.features import FeatureDataset, extract_category, read_manifest

pytestmark = pytest.mark.slurm


def _executor(folder, **parameters):
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(timeout_min=10, slurm_partition="debug", cpus_per_task=1, **parameters)
    return executor


def _sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-j", job_id, "-o", "State"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _node_name() -> str:
    import socket
    return socket.gethostname()


def test_submitit_job_runs_on_slurm_and_returns_its_result(slurm_cluster, tmp_path):
    job = _executor(tmp_path / "logs").submit(_node_name)
    assert job.result() == _node_name()
    # Accounting works (submitit polls sacct). The result file is written just before the job
    # ends, so give the state a moment to settle.
    deadline = time.monotonic() + 60
    while (state := _sacct_state(job.job_id)) != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert state == "COMPLETED"


def test_extraction_shards_as_a_slurm_job_array(slurm_cluster, make_config, tmp_path):
    """Each array task writes one shard; the last one to finish writes the manifest."""
    _, config = make_config({"features.shards": 2})
    executor = _executor(tmp_path / "logs", slurm_array_parallelism=2)
    jobs = executor.map_array(extract_category, [config] * 2, ["grid"] * 2, [(0, 2), (1, 2)], [False] * 2)
    results = [job.result() for job in jobs]
    assert sorted(len(r.written) for r in results) == [3, 3]
    assert any(r.manifest_written for r in results)
    manifest = read_manifest(results[0].store)
    assert {split: entry["num_samples"] for split, entry in manifest["splits"].items()} == {
        split: len(FeatureDataset(results[0].store, split)) for split in ("train", "validation", "test")}
