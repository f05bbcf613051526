"""Submitting a run's job graph with submitit, and the record of what was submitted.

Slurm: one job array per stage, one task per category (the same category order in every array),
so that a stage's task i depends on task i of the stage it reads (``aftercorr``, with
``kill-on-invalid-dep``): a failing category cancels only its own downstream tasks. Extraction is
one array over every (category, shard); the first stages after it wait for all of it to end
(``afterany``) and a category whose store is incomplete then fails alone. A stage shared by every
category (teacher distillation) is one job that the arrays reading it wait for (``afterok``). A
task whose stage is already complete for its category returns at once.
Local and debug: categories are dealt round-robin to chain jobs, each running its incomplete
nodes in order; a shared node heads every chain, and the first to reach it trains it while the
others wait on its lock. Local runs one chain per GPU where there are GPUs, each seeing only its
own (``CUDA_VISIBLE_DEVICES``), else as many as the machine has cores for (``cpus // cpus_per_task``).

Every submission is appended to ``<run.out_dir>/jobs.json`` (job ids, nodes, log folders), which
``effad-hpc status`` reads, also from another process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import submitit
import torch

from effad_hpc.config import ExperimentConfig, config_hash, write_resolved_config
from effad_hpc.data.fingerprint import reused_fingerprints
from effad_hpc.errors import ConfigError
from effad_hpc.hpc.graph import EXTRACT, Node, category_graph, is_complete
from effad_hpc.hpc.jobs import ChainJob, StageJob
from effad_hpc.hpc.profiles import ClusterProfile
from effad_hpc.training.artifacts import SHARED
from effad_hpc.utils.atomic import atomic_write_json, exclusive_lock

JOBS_FILE = "jobs.json"
Executor = Literal["slurm", "local", "debug"]


def slurm_answers() -> bool:
    """Whether a Slurm controller is reachable from here (``scontrol ping`` says UP)."""
    if shutil.which("scontrol") is None or shutil.which("sbatch") is None:
        return False
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return ping.returncode == 0 and "UP" in ping.stdout


def resolve_executor(name: str) -> Executor:
    if name == "auto":
        return "slurm" if slurm_answers() else "local"
    if name == "slurm" and not slurm_answers():
        raise ConfigError("run.executor: slurm was asked for, but no Slurm controller answers `scontrol ping` "
                          "(set SLURM_CONF, or use --executor local)")
    return name  # type: ignore[return-value]


@dataclass
class SubmittedJob:
    job_id: str
    """The job, or the array task (``123_4``) that runs these nodes."""
    nodes: list[str]
    """``<category>/<node name>`` of every node the job runs."""
    log_folder: str
    tasks: list[str] = field(default_factory=list)
    """Array tasks that together run the nodes (extraction shards), when there are several."""


@dataclass
class Submission:
    executor: Executor
    submitted_at: str
    config_hash: str
    jobs: list[SubmittedJob] = field(default_factory=list)
    complete: list[str] = field(default_factory=list)
    """Nodes that were already complete and were not submitted."""
    handles: list = field(default_factory=list, repr=False)
    """The submitit job objects (this process only; not saved)."""


@dataclass(frozen=True)
class Pending:
    """A category with work to do: its graph and its incomplete nodes (in graph order)."""

    category: str
    graph: dict[Node, tuple[Node, ...]]
    todo: list[Node]


def node_id(node: Node) -> str:
    return f"{node.category}/{node.name}"


def executor_for(kind: Executor, folder: Path, profile: ClusterProfile, stage: str,
              dependency: list[str]) -> submitit.AutoExecutor:
    requeues = {f"{kind}_max_num_timeout": profile.max_requeues} if kind != "debug" else {}
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=kind, **requeues)
    resources = profile.for_stage(stage)
    executor.update_parameters(name=f"effad-{stage}", timeout_min=resources.timeout_min,
                               cpus_per_task=resources.cpus_per_task, mem_gb=resources.mem_gb)
    if kind == "slurm":
        extra = {"kill_on_invalid_dep": "yes"} if dependency else {}
        optional = {"slurm_partition": resources.partition, "slurm_account": resources.account,
                    "slurm_qos": resources.qos, "slurm_constraint": resources.constraint,
                    "slurm_gres": resources.gres, "slurm_dependency": ",".join(dependency) or None}
        executor.update_parameters(slurm_array_parallelism=profile.array_parallelism, slurm_setup=list(profile.setup),
                                   slurm_additional_parameters=extra,
                                   **{key: value for key, value in optional.items() if value is not None})
    return executor


def _base_id(job) -> str:
    """An array task id ``123_4`` -> ``123`` (a dependency on the array waits for all its tasks)."""
    return str(job.job_id).split("_")[0]


@reused_fingerprints()
def submit_run(config: ExperimentConfig, categories: list[str], models: list[str], executor: Executor,
               profile: ClusterProfile) -> Submission:
    """Submit every incomplete node of every category; return (and record) what was submitted."""
    out = config.run.out_dir
    out.mkdir(parents=True, exist_ok=True)
    write_resolved_config(config, out)
    logs = out / "logs"
    raw = config.model_dump(mode="json")
    submission = Submission(executor, datetime.now(timezone.utc).isoformat(timespec="seconds"), config_hash(config))
    pending: list[Pending] = []
    for category in categories:
        graph = category_graph(config, category, models)
        todo = [node for node in graph if not is_complete(config, node)]
        submission.complete += [node_id(node) for node in graph
                                if node not in todo and node_id(node) not in submission.complete]
        if todo:
            pending.append(Pending(category, graph, todo))
    if executor == "slurm" and pending:
        _submit_slurm(config, raw, pending, profile, logs, submission)
    elif pending:
        cpus = profile.for_stage("chain").cpus_per_task
        gpus = local_chain_gpus(executor, len(pending), len(os.sched_getaffinity(0)) // cpus, visible_gpus())
        workers = len(gpus)
        for worker, gpu in enumerate(gpus):
            nodes = list(dict.fromkeys(node for entry in pending[worker::workers] for node in entry.todo))
            upstream = {node: ups for entry in pending for node, ups in entry.graph.items() if node in nodes}
            job = executor_for(executor, logs, profile, "chain", []).submit(ChainJob(), raw, nodes, cpus, upstream,
                                                                            gpu)
            submission.handles.append(job)
            submission.jobs.append(SubmittedJob(str(job.job_id), [node_id(n) for n in nodes], str(logs)))
    record_submission(out, submission)
    return submission


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (indices or UUIDs)."""
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(index) for index in range(count)]
    return [entry.strip() for entry in listed.split(",") if entry.strip()][:count]


def local_chain_gpus(executor: Executor, chains: int, core_slots: int, gpus: list[str]) -> list[str | None]:
    """One entry per chain job of a local or debug run: the GPU it sees, or None (the CPU).

    With GPUs, one chain per GPU: two stage processes on one GPU contend for its memory, and one
    process per GPU is what the Slurm profile asks for too. Without, as many chains as there are
    ``cpus_per_task`` slots of cores. Debug runs every chain in this process, on its own devices."""
    if executor == "debug":
        return [None] * chains
    if gpus:
        return list(gpus[:chains])
    return [None] * max(1, min(chains, core_slots))


def _submit_slurm(config: ExperimentConfig, raw: dict, pending: list[Pending], profile: ClusterProfile, logs: Path,
                  submission: Submission) -> None:
    """One array per stage over the categories with work to do, chained task by task."""
    # The category of an entry, not of its first pending node: that is the shared `_shared` node
    # whenever the distillation is incomplete, and every array would be built for `_shared`.
    categories = [entry.category for entry in pending]
    todo = {node for entry in pending for node in entry.todo}
    # Every category of a run has the same stages; take their order and dependencies from one graph.
    graph = pending[0].graph
    stages = {(node.stage, node.model): [(up.stage, up.model) for up in ups] for node, ups in graph.items()}
    shared = {(node.stage, node.model) for node in graph if node.shared}
    array_of: dict[tuple[str, str | None], str] = {}
    for stage, upstream in stages.items():
        dependency = ",".join(f"{'afterany' if up[0] == EXTRACT else 'afterok' if up in shared else 'aftercorr'}:"
                              f"{array_of[up]}" for up in upstream if up in array_of)
        runner = executor_for("slurm", logs, profile, stage[0], [dependency] if dependency else [])
        if stage in shared:
            node = Node(SHARED, *stage)
            if node in todo:
                job = runner.submit(StageJob(), raw, node)
                array_of[stage] = str(job.job_id)
                submission.handles.append(job)
                submission.jobs.append(SubmittedJob(str(job.job_id), [node_id(node)], str(logs)))
            continue
        nodes = [Node(category, *stage) for category in categories]
        if not any(node in todo for node in nodes):
            continue
        with runner.batch():
            if stage[0] == EXTRACT:
                shards = config.features.shards
                work = [(node, (i, shards)) for node in nodes if node in todo for i in range(shards)]
                jobs = [runner.submit(StageJob(), raw, node, shard) for node, shard in work]
            else:
                work = [(node, None) for node in nodes]  # aligned with the upstream arrays
                jobs = [runner.submit(StageJob(), raw, node) for node, _ in work]
        array_of[stage] = _base_id(jobs[0])
        submission.handles += jobs
        for node in dict.fromkeys(node for node, _ in work):
            if node not in todo:
                continue
            tasks = [str(job.job_id) for job, (other, _) in zip(jobs, work) if other == node]
            submission.jobs.append(SubmittedJob(tasks[0] if len(tasks) == 1 else array_of[stage], [node_id(node)],
                                                str(logs), tasks if len(tasks) > 1 else []))


def read_submissions(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / JOBS_FILE
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text())["submissions"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a record of submissions ({exc}); move it away to start a new one") from None


def record_submission(run_dir: Path, submission: Submission) -> None:
    """Append the submission to jobs.json, under a lock: two ``run`` commands on one folder keep both."""
    entry = {"executor": submission.executor, "submitted_at": submission.submitted_at,
             "config_hash": submission.config_hash, "jobs": [asdict(job) for job in submission.jobs],
             "complete": submission.complete}
    with exclusive_lock(Path(run_dir) / f".{JOBS_FILE}.lock"):
        atomic_write_json(Path(run_dir) / JOBS_FILE, {"submissions": [*read_submissions(run_dir), entry]})
