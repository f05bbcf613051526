"""The callables submitit runs on the nodes. Both are ``Checkpointable``: on preemption or a time
limit submitit requeues them with the same arguments, and the stage resumes from its last
checkpoint (the training stages checkpoint every epoch; extraction keeps finished shards)."""

from __future__ import annotations

import os
import traceback

import torch
from submitit.helpers import Checkpointable

from effad_hpc.config import parse_config
from effad_hpc.hpc.graph import Node, is_complete, run_node


def _use_allocated_cpus() -> None:
    """torch would start one thread per core of the machine; use the cores this job was given."""
    torch.set_num_threads(len(os.sched_getaffinity(0)))


class StageJob(Checkpointable):
    """One node of the graph (Slurm: one job per node, chained by ``afterok`` dependencies)."""

    def __call__(self, raw_config: dict, node: Node, shard: tuple[int, int] | None = None) -> str:
        _use_allocated_cpus()
        config = parse_config(raw_config, f"config of job {node.category}/{node.name}")
        return run_node(config, node, shard)


class ChainJob(Checkpointable):
    """The listed nodes in order, for executors without dependencies between jobs (local, debug).

    A node that fails blocks only the nodes that depend on it (``upstream``: each node's direct
    dependencies); the others still run, and the job fails at the end if any node did. Complete
    nodes are skipped, so a requeue continues where the job was. ``gpu``: the one GPU this chain
    sees (submitit's local executor hides every GPU from a job that asks for none)."""

    def __call__(self, raw_config: dict, nodes: list[Node], threads: int | None = None,
                 upstream: dict[Node, tuple[Node, ...]] | None = None, gpu: str | None = None) -> list[str]:
        if gpu is not None:  # before anything initialises CUDA, which reads it once
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        if threads:
            torch.set_num_threads(threads)
        config = parse_config(raw_config, "config of a chain job")
        upstream = upstream or {}
        done, failed, blocked = [], {}, set()
        for node in nodes:
            if any(up in failed or up in blocked for up in upstream.get(node, ())):
                blocked.add(node)
                continue
            if is_complete(config, node):
                continue
            try:
                done.append(run_node(config, node))
            except Exception:  # the nodes that do not depend on it still run
                failed[node] = f"{node.category}/{node.name}:\n{traceback.format_exc()}"
        if failed:
            raise RuntimeError("failed stages:\n" + "\n".join(failed.values()))
        return done
