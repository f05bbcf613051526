"""The job graph of a run: per category, extract -> training stages -> evaluate, with completion checks.

A stage shared by every category (EfficientAD's teacher distillation) is one node of the
category ``_shared``, upstream of the stages of every category that read it.

A node is complete when its marker on disk carries the key of its current inputs: the store's
manifest (feature key), a stage's ``stage.json`` (stage key, which chains the keys of the stages it
reads) or an evaluation's ``metrics.json`` (evaluation key). A changed input therefore makes the
node and everything downstream incomplete, and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from effad_hpc.config import ExperimentConfig
from effad_hpc.evaluation import evaluate_category
from effad_hpc.evaluation.evaluate import completed_metrics
from effad_hpc.evaluation.synthetic_validation import selecting
from effad_hpc.features.extract import extract_category, store_incomplete_reason
from effad_hpc.training import STAGES, recipe, run_stage
from effad_hpc.training.artifacts import SHARED
from effad_hpc.training.registry import completed_stage

EXTRACT, EVALUATE = "extract", "evaluate"


@dataclass(frozen=True, order=True)
class Node:
    category: str
    stage: str
    """``extract``, a training stage (``teacher``, ``student_ae``, ...), or ``evaluate``."""
    model: str | None = None
    """The model an ``evaluate`` node scores."""

    @property
    def name(self) -> str:
        return self.stage if self.model is None else f"{self.stage}:{self.model}"

    @property
    def shared(self) -> bool:
        return self.category == SHARED


def _stage_node(category: str, stage: str) -> Node:
    return Node(SHARED if STAGES[stage].shared else category, stage)


def category_graph(config: ExperimentConfig, category: str, models: list[str]) -> dict[Node, tuple[Node, ...]]:
    """Nodes of one category in a valid execution order, each with the nodes it depends on.
    A stage shared by several models (the AST teacher) appears once; a stage shared by every
    category appears as the ``_shared`` node."""
    extract = Node(category, EXTRACT)
    training: dict[Node, tuple[Node, ...]] = {}
    evaluations: dict[Node, tuple[Node, ...]] = {}
    for model in models:
        stages = recipe(model).stages
        for name in stages:
            node = _stage_node(category, name)
            if node not in training:
                upstream = [_stage_node(category, need) for need in STAGES[name].needs]
                if STAGES[name].uses_store(config):
                    upstream.insert(0, extract)
                training[node] = tuple(upstream)
        evaluations[Node(category, EVALUATE, model)] = (_stage_node(category, stages[-1]),)
    needs_store = any(extract in upstream for upstream in training.values())
    return ({extract: ()} if needs_store else {}) | training | evaluations


def run_graph(config: ExperimentConfig, categories: list[str], models: list[str]) -> dict[Node, tuple[Node, ...]]:
    """The nodes of every category (shared nodes once), in a valid execution order."""
    graph: dict[Node, tuple[Node, ...]] = {}
    for category in categories:
        graph |= {node: upstream for node, upstream in category_graph(config, category, models).items()
                  if node not in graph}
    return graph


def is_complete(config: ExperimentConfig, node: Node) -> bool:
    if node.stage == EXTRACT:
        return store_incomplete_reason(config, node.category) is None
    if node.stage == EVALUATE:
        return completed_metrics(config, node.model, node.category) is not None
    return completed_stage(config, node.stage, node.category) is not None


def run_node(config: ExperimentConfig, node: Node, shard: tuple[int, int] | None = None) -> str:
    """Run one node (or one extraction shard) to completion; a complete node returns at once."""
    if node.stage == EXTRACT:
        result = extract_category(config, node.category, shard, show_progress=False)
        return f"{node.category} extract: wrote {len(result.written)}, skipped {len(result.skipped)} shard(s)"
    if node.stage == EVALUATE:
        metrics = evaluate_category(config, node.model, node.category, show_progress=False)["metrics"]
        return f"{node.category} evaluate {node.model}: image AUROC {metrics['image_auroc']}"
    with selecting(config):  # a stage that selects its model by a synthetic-anomaly score
        record = run_stage(config, node.stage, node.category, show_progress=False)
    return f"{node.category} {node.stage}: best epoch {record.best_epoch} of {record.final_epoch}"
