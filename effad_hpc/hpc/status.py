"""The state of every node of a run, from the markers on disk and the jobs that were submitted.

Works from any process (``effad-hpc status RUN_DIR``): completion comes from the markers, the
state of the rest from Slurm (the controller's ``squeue`` while it knows a job, the accounting's
``sacct`` after) or, for local jobs, from submitit's result files and the job's process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table
from submitit.core.utils import JobPaths

from effad_hpc.config import CONFIG_FILENAME, ExperimentConfig, load_resolved_config
from effad_hpc.data import categories_of
from effad_hpc.data.fingerprint import reused_fingerprints
from effad_hpc.evaluation import read_metrics, results_dir
from effad_hpc.hpc.graph import Node, is_complete, run_graph
from effad_hpc.hpc.submit import node_id, read_submissions

DONE, RUNNING, PENDING, FAILED, BLOCKED, MISSING = "DONE", "RUNNING", "PENDING", "FAILED", "BLOCKED", "NOT SUBMITTED"
UNKNOWN = "UNKNOWN"  # ended, with no record left in Slurm
ACTIVE = {RUNNING, PENDING, "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "PREEMPTED"}
STYLE = {DONE: "green", RUNNING: "cyan", PENDING: "yellow", "REQUEUED": "cyan"}


@dataclass
class NodeState:
    node: Node
    state: str
    job_id: str | None = None
    elapsed: str = ""
    log: str | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def _query(command: list[str]) -> list[str] | None:
    """Output lines of a Slurm client, or None when it could not answer (not installed, hung, or
    an error such as a busy controller's socket timeout, where it prints nothing and exits 1)."""
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.splitlines() if out.returncode == 0 else None


@dataclass
class SlurmStates:
    """What Slurm said of a run's jobs: job or array task id -> (state, elapsed)."""

    states: dict[str, tuple[str, str]]
    both_answered: bool  # a job neither client lists is known to be gone only when both answered

    def of(self, task: str) -> tuple[str, str]:
        found = self.states.get(task) or self.states.get(task.split("_")[0])
        if found:
            return found
        # Not listed while a client failed to answer: the job may only be out of the answering
        # client's view for now (accounting lags behind the controller), so keep waiting.
        return (UNKNOWN, "") if self.both_answered else (PENDING, "")


def _slurm_states(job_ids: list[str]) -> SlurmStates:
    """The accounting's (``sacct``) and the controller's (``squeue``) view of the jobs.

    The controller is asked after the accounting and wins: accounting lags behind it (a running
    array task still shows as pending there) and may miss a job for a while, and the controller
    forgets a job a while after it ended (MinJobAge)."""
    if not job_ids:
        return SlurmStates({}, both_answered=True)
    jobs = ",".join(sorted({j.split("_")[0] for j in job_ids}))
    accounting = _query(["sacct", "-n", "-P", "-X", "-j", jobs, "-o", "JobID,State,Elapsed"])
    controller = _query(["squeue", "-h", "-r", "-t", "all", "-j", jobs, "-o", "%i|%T|%M"])
    states: dict[str, tuple[str, str]] = {}
    for line in (accounting or []) + (controller or []):
        job, state, elapsed = (line.split("|") + ["", ""])[:3]
        key = job.split("_[")[0]  # "123_[4-7]": tasks not started yet
        states[key] = (state.split()[0] if state else PENDING, elapsed)
    return SlurmStates(states, both_answered=accounting is not None and controller is not None)


def _combined_state(states: list[tuple[str, str]]) -> tuple[str, str]:
    """The state of several array tasks that run one node together (extraction shards)."""
    names = [state for state, _ in states]
    elapsed = max((e for _, e in states), default="")
    for worst in ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "CANCELLED", "BOOT_FAIL", "DEADLINE"):
        if worst in names:
            return worst, elapsed
    for state in (RUNNING, "REQUEUED", PENDING):
        if state in names:
            return state, elapsed
    return names[0], elapsed


def _local_running(log_folder: str, job_id: str) -> bool:
    """Whether a local job (its id is the process id) still runs: no result file yet and alive.

    Success or failure is not read from the result: the stages' markers say what was done."""
    if JobPaths(Path(log_folder) / "%j", job_id).result_pickle.exists():
        return False
    try:
        os.kill(int(job_id), 0)
    except (ProcessLookupError, ValueError):
        return False  # gone without a result: killed
    except PermissionError:
        pass
    return True


def _log_path(log_folder: str, job_id: str) -> str:
    return str(JobPaths(Path(log_folder) / "%j", job_id).stderr)


@reused_fingerprints()
def run_states(config: ExperimentConfig, models: list[str] | None = None) -> list[NodeState]:
    run_dir = config.run.out_dir
    latest: dict[str, tuple[dict, dict]] = {}  # node id -> (submission, job) of its last submission
    for submission in read_submissions(run_dir):
        for job in submission["jobs"]:
            for nid in job["nodes"]:
                latest[nid] = (submission, job)
    slurm = _slurm_states([job["job_id"] for sub, job in latest.values() if sub["executor"] == "slurm"])
    graph = run_graph(config, categories_of(config), models or list(config.models))
    nodes = list(graph)
    done = {node_id(node) for node in nodes if is_complete(config, node)}
    running: dict[str, bool] = {}  # local job id -> still running, asked once per job
    states: list[NodeState] = []
    for node in nodes:
        nid = node_id(node)
        submission, job = latest.get(nid, ({}, {}))
        if nid in done or not job:
            states.append(NodeState(node, DONE if nid in done else MISSING, job.get("job_id")))
            continue
        job_id, log = job["job_id"], _log_path(job["log_folder"], job["job_id"])
        if submission["executor"] == "slurm":
            tasks = job["tasks"] if isinstance(job.get("tasks"), list) and job["tasks"] else [job_id]
            state, elapsed = _combined_state([slurm.of(task) for task in tasks])
            if state == "COMPLETED":  # the job ended but left no complete marker
                state = FAILED
            states.append(NodeState(node, state, job_id, elapsed, log))
            continue
        # A chain job runs its nodes in order: while it runs, its first incomplete node is the
        # one running and the others wait. Once it ended, an incomplete node whose inputs are all
        # complete failed; one with an incomplete input was blocked by that failure.
        if job_id not in running:  # debug jobs ran inside the submitting process
            running[job_id] = submission["executor"] == "local" and _local_running(job["log_folder"], job_id)
        if running[job_id]:
            waiting = [other for other in job["nodes"] if other not in done]
            state = RUNNING if waiting[0] == nid else PENDING
        else:
            state = BLOCKED if any(node_id(up) not in done for up in graph[node]) else FAILED
        states.append(NodeState(node, state, job_id, "", log))
    return states


def state_table(states: list[NodeState], title: str) -> Table:
    columns = list(dict.fromkeys(s.node.name for s in states))
    table = Table(title=title)
    table.add_column("category")
    for column in columns:
        table.add_column(column)
    for category in dict.fromkeys(s.node.category for s in states):
        cells = {s.node.name: s for s in states if s.node.category == category}
        row = []
        for column in columns:
            s = cells.get(column)
            if s is None:
                row.append("")
                continue
            text = s.state + (f" {s.elapsed}" if s.elapsed and s.state != DONE else "")
            style = STYLE.get(s.state, "red" if s.state != MISSING else "dim")
            row.append(f"[{style}]{text}[/{style}]")
        table.add_row(category, *row)
    return table


def load_run_config(run_dir: Path) -> tuple[ExperimentConfig, str | None]:
    """The config of the run in ``run_dir``, pointed at ``run_dir`` itself (a copied or moved run
    shows its own state, not the original's), and a note when the config names another folder."""
    config = load_resolved_config(run_dir)
    given = Path(run_dir).resolve()
    if config.run.out_dir.resolve() == given:
        return config, None
    note = f"{Path(run_dir) / CONFIG_FILENAME} was written for the run folder {config.run.out_dir}; showing {given}"
    return config.model_copy(update={"run": config.run.model_copy(update={"out_dir": given})}), note


def make_console() -> Console:
    """Rich console; wide enough for the state table when the output is a file (job logs, CI)."""
    return Console() if sys.stdout.isatty() else Console(width=200)


def watch(config: ExperimentConfig, models: list[str], poll_s: float, console: Console) -> list[NodeState]:
    """Redraw the state table until no node is pending or running; return the final states."""
    started = time.monotonic()
    title = lambda: f"{config.name}: {config.run.out_dir} ({time.monotonic() - started:.0f} s)"  # noqa: E731
    states = run_states(config, models)
    with Live(state_table(states, title()), console=console, refresh_per_second=1, transient=False) as live:
        while any(s.active for s in states):
            time.sleep(poll_s)
            states = run_states(config, models)
            live.update(state_table(states, title()))
    console.print()
    return states


def summary(config: ExperimentConfig, states: list[NodeState], models: list[str], console: Console) -> None:
    failed = [s for s in states if s.state not in (DONE, *ACTIVE)]
    for s in failed:
        where = f": log {s.log}" if s.log else ""
        console.print(f"[red]{s.node.category} {s.node.name}: {s.state}{where}")
    table = Table(title="metrics (test split)")
    for column in ("category", "model", "image AUROC", "pixel AUROC", "AU-PRO", "LOCO AUROC", "ms/img"):
        table.add_column(column)
    for category in dict.fromkeys(s.node.category for s in states):
        for model in models:
            metrics = read_metrics(results_dir(config, model, category))
            if not metrics:
                continue
            values = metrics["metrics"]
            cells = [values.get(k) for k in ("image_auroc", "pixel_auroc", "au_pro", "auroc_loco_mean", "latency_ms")]
            table.add_row(category, model, *("-" if v is None else f"{v:.3f}" for v in cells))
    console.print(table)
