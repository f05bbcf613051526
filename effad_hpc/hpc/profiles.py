"""Cluster profiles: the resources each job asks for (``slurm/profiles/*.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from pydantic import Field, ValidationError

from effad_hpc.config import DuplicateKeyError, Section, YamlLoader, format_errors, yaml_error_line
from effad_hpc.errors import ConfigError

PositiveInt = Annotated[int, Field(gt=0)]


class Resources(Section):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gres: str | None = None
    """e.g. ``gpu:1``."""
    cpus_per_task: PositiveInt | None = None
    mem_gb: Annotated[float, Field(gt=0)] | None = None
    timeout_min: PositiveInt | None = None


class ClusterProfile(Resources):
    """Defaults for every job, with per-stage overrides (``stages: {extract: {timeout_min: 30}}``)."""

    cpus_per_task: PositiveInt = 2
    mem_gb: Annotated[float, Field(gt=0)] = 8
    timeout_min: PositiveInt = 240
    array_parallelism: PositiveInt = 16
    """Tasks of one job array (a stage over the categories, or the extraction shards) running at once."""
    max_requeues: Annotated[int, Field(ge=0)] = 3
    """How often a job that hits its time limit is requeued (it resumes from its checkpoint)."""
    setup: list[str] = []
    """Shell lines run at the start of every Slurm job (``module load ...``)."""
    stages: dict[str, Resources] = {}
    """Keyed by stage name (``extract``, ``teacher``, ..., ``evaluate``), or ``sweep`` for the
    allocation of ``effad-hpc sweep --executor slurm`` (per node: its CPUs, GPUs, memory)."""
    sweep_nodes: PositiveInt = 1
    """Nodes of a sweep's allocation: a Ray head on the first, a Ray worker on each other."""

    def for_stage(self, stage: str) -> Resources:
        values = Resources.model_validate(self.model_dump(include=set(Resources.model_fields))).model_dump()
        if stage in self.stages:
            values |= self.stages[stage].model_dump(exclude_none=True)
        return Resources.model_validate(values)


def load_profile(path: Path | None) -> ClusterProfile:
    if path is None:
        return ClusterProfile()
    try:
        raw = yaml.load(Path(path).read_text(), Loader=YamlLoader) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read cluster profile ({exc.strerror})") from None
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_error_line(exc)}") from None
    try:
        return ClusterProfile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_errors(str(path), exc)) from None
