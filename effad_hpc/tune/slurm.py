"""A sweep on Slurm: one allocation that runs a Ray cluster and the sweep's driver inside it.

What runs where (``effad-hpc sweep --executor slurm``)::

    login node     effad-hpc sweep ...  -> writes <sweep>/ray_auth_token (mode 0600), submits ONE
                   job through submitit: --nodes=<profile.sweep_nodes> --ntasks-per-node=1 with
                   the profile's ``stages.sweep`` resources (cpus, gres=gpu:G, memory, time);
                   then follows its state
    node 0 (task 0)  ray start --head (port from the job id, temp dir /tmp/ray_effad_<job>), then
                   the sweep's driver (run_sweep, address = this node) whose trials Ray places on
                   every node; at the end it writes <sweep>/ray_done.<job>.<start> and stops Ray
    node i (task i)  ray start --address=<node 0>, waits for that file, stops Ray

Every Ray process runs with ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` = the token file,
which only the user can read: no other user of the nodes can join or drive the cluster. On
preemption or at the time limit submitit requeues the allocation (``max_requeues``); the new
driver finds the experiment and continues it as ``--resume`` does (finished trials stay done);
every task first stops what an earlier start of the allocation left of its Ray on the node.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import submitit
from submitit.helpers import Checkpointable

from effad_hpc.config import ExperimentConfig, load_config
from effad_hpc.errors import EffadError
from effad_hpc.hpc.profiles import ClusterProfile
from effad_hpc.hpc.submit import executor_for
from effad_hpc.tune import sweep_dir

TOKEN_FILE = "ray_auth_token"
DONE_FILE = "ray_done"
HEAD_START_SECONDS = 120
"""How long a worker node retries joining the head (it may start before the head is up)."""


def write_token(path: Path) -> Path:
    """A fresh token in a file only the user can read (created 0600, never widened)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))
    return path


def _ray_environment(token: Path) -> dict[str, str]:
    return os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}


def _ray(args: list[str], token: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``ray <args>`` with the job's token; a failure names the command and Ray's own message."""
    ray = Path(sys.executable).with_name("ray")
    done = subprocess.run([str(ray), *args], env=_ray_environment(token), capture_output=True, text=True)
    if check and done.returncode:
        raise EffadError(f"ray {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()[-1500:]}")
    return done


def stop_ray_processes(temp_dir: Path, timeout: float = 15) -> int:
    """Stop the Ray processes started with ``temp_dir`` on this node; return how many there were.

    Not ``ray stop``, which stops every Ray of the user on the node (another sweep's too). And not
    left to Slurm: Ray's daemons detach from the job's process tree, so where Slurm tracks a job by
    parent ids (proctrack/linuxproc) a preempted allocation's Ray outlives it and holds its port."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if process.pid != os.getpid() and str(temp_dir) in " ".join(process.info["cmdline"] or []):
                found.append(process)
        except psutil.Error:
            continue
    for process in found:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(found, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    return len(found)


class RaySweepJob(Checkpointable):
    """One task per node of the allocation: the head (task 0) runs the driver, the others join."""

    def __call__(self, config_path: str, overrides: list[str], space_path: str, resume: bool) -> str:
        environment = submitit.JobEnvironment()
        config = load_config(Path(config_path), overrides)
        folder = sweep_dir(config, Path(space_path))
        token = folder / TOKEN_FILE
        job = str(environment.job_id).split("_")[0]
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))  # > 0 once requeued
        # One done file per start of the allocation: a requeued worker never sees the last one's.
        done = folder / f"{DONE_FILE}.{job}.{restarts}"
        # Per job, so that Ray processes left by an earlier start of this allocation are found.
        temp_dir = Path(tempfile.gettempdir()) / f"ray_effad_{job}"
        if stopped := stop_ray_processes(temp_dir):
            print(f"sweep {folder.name}: stopped {stopped} Ray process(es) left by an earlier start of "
                  f"allocation {job}", file=sys.stderr, flush=True)
        head = environment.hostnames[0]
        port = 6379 + int(job) % 1000
        node = ["--temp-dir", str(temp_dir), "--num-cpus", str(len(os.sched_getaffinity(0)))]
        try:
            if environment.global_rank != 0:
                return self._worker(f"{head}:{port}", token, done, node)
            _ray(["start", "--head", f"--port={port}", f"--node-ip-address={socket.gethostbyname(head)}",
                  "--include-dashboard=false", *node], token)
            os.environ.update(_ray_environment(token))  # read when Ray is imported: the driver's token
            from effad_hpc.tune.space import load_spec
            from effad_hpc.tune.sweep import run_sweep

            if restarts:
                print(f"sweep {folder.name}: requeued; continuing the experiment in {folder / 'ray'}",
                      file=sys.stderr, flush=True)
            try:
                result = run_sweep(config, load_spec(Path(space_path)), Path(space_path),
                                   address=f"{socket.gethostbyname(head)}:{port}", resume=resume or restarts > 0)
            finally:
                done.write_text("done\n")
            return str(result.folder)
        finally:
            stop_ray_processes(temp_dir)

    def _worker(self, address: str, token: Path, done: Path, node: list[str]) -> str:
        deadline = time.monotonic() + HEAD_START_SECONDS
        while (joined := _ray(["start", f"--address={address}", *node], token, check=False)).returncode:
            if time.monotonic() > deadline:
                raise EffadError(f"could not join the Ray head at {address}: {joined.stderr.strip()[-500:]}")
            time.sleep(5)
        while not done.exists():
            time.sleep(5)
        return "worker done"


def submit_sweep(config: ExperimentConfig, config_path: Path, overrides: list[str], space_path: Path,
                 profile: ClusterProfile, resume: bool, poll: float) -> int:
    """Submit the sweep's allocation, follow it to the end and return 0 when it succeeded."""
    folder = sweep_dir(config, space_path)
    write_token(folder / TOKEN_FILE)
    executor = executor_for("slurm", folder / "logs", profile, "sweep", [])
    executor.update_parameters(name=f"effad-sweep-{folder.name}", nodes=profile.sweep_nodes, tasks_per_node=1)
    job = executor.submit(RaySweepJob(), str(Path(config_path).absolute()), list(overrides),
                          str(Path(space_path).absolute()), resume)
    print(f"sweep {folder.name}: allocation {job.job_id} submitted ({profile.sweep_nodes} node(s)); "
          f"logs {folder / 'logs' / str(job.job_id)}", flush=True)
    state = None
    while not job.done():
        if job.state != state:
            state = job.state
            print(f"sweep {folder.name}: allocation {job.job_id} {state}", flush=True)
        time.sleep(poll)
    try:
        job.results()
    except Exception as exc:  # the job's own traceback is in its log
        print(f"sweep {folder.name}: allocation {job.job_id} failed: {str(exc).strip().splitlines()[-1]}; "
              f"log {job.paths.stderr}", file=sys.stderr)
        return 1
    print(f"sweep {folder.name}: done; summary {folder / 'sweep_summary.csv'}")
    return 0
