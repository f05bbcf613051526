"""A sweep on Slurm: one allocation that runs a Ray cluster and the sweep's driver inside it.

What runs where (``effad-hpc sweep --executor slurm``)::

    login node     effad-hpc sweep ...  -> writes <sweep>/ray_auth_token (mode 0600), submits ONE
                   job through submitit: --nodes=<profile.sweep_nodes> --ntasks-per-node=1 with
                   the profile's ``stages.sweep`` resources (cpus, gres=gpu:G, memory, time);
                   then follows its state
    node 0 (task 0)  ray start --head (port from the job id), then the sweep's driver
                   (run_sweep, address = this node) whose trials Ray places on every node; at the
                   end it writes <sweep>/ray_done and stops Ray
    node i (task i)  ray start --address=<node 0>, waits for ray_done, stops Ray

Every Ray process runs with ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` = the token file,
which only the user can read: no other user of the nodes can join or drive the cluster. On
preemption or at the time limit submitit requeues the allocation (``max_requeues``); the new
driver finds the experiment and continues it as ``--resume`` does (finished trials stay done).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

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
    ray = Path(sys.executable).with_name("ray")
    return subprocess.run([str(ray), *args], env=_ray_environment(token), capture_output=True, text=True,
                          check=check)


class RaySweepJob(Checkpointable):
    """One task per node of the allocation: the head (task 0) runs the driver, the others join."""

    def __call__(self, config_path: str, overrides: list[str], space_path: str, resume: bool) -> str:
        environment = submitit.JobEnvironment()
        config = load_config(Path(config_path), overrides)
        folder = sweep_dir(config, Path(space_path))
        token, done = folder / TOKEN_FILE, folder / DONE_FILE
        head = environment.hostnames[0]
        port = 6379 + int(str(environment.job_id).split("_")[0]) % 1000
        resources = ["--num-cpus", str(len(os.sched_getaffinity(0)))]
        if environment.global_rank != 0:
            return self._worker(f"{head}:{port}", token, done, resources)
        done.unlink(missing_ok=True)
        _ray(["start", "--head", f"--port={port}", f"--node-ip-address={socket.gethostbyname(head)}",
              "--include-dashboard=false", *resources], token)
        os.environ.update(_ray_environment(token))  # read when Ray is imported: the driver's token
        from effad_hpc.tune.space import load_spec
        from effad_hpc.tune.sweep import run_sweep

        try:
            # A requeued allocation finds its experiment and continues it.
            resume = resume or (folder / "ray").is_dir()
            result = run_sweep(config, load_spec(Path(space_path)), Path(space_path),
                               address=f"{socket.gethostbyname(head)}:{port}", resume=resume)
        finally:
            done.write_text("done\n")
            _ray(["stop"], token, check=False)
        return str(result.folder)

    def _worker(self, address: str, token: Path, done: Path, resources: list[str]) -> str:
        deadline = time.monotonic() + HEAD_START_SECONDS
        while (joined := _ray(["start", f"--address={address}", *resources], token, check=False)).returncode:
            if time.monotonic() > deadline:
                raise EffadError(f"could not join the Ray head at {address}: {joined.stderr.strip()[-500:]}")
            time.sleep(5)
        while not done.exists():
            time.sleep(5)
        _ray(["stop"], token, check=False)
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
