"""Sweep files: a search space over dotted config keys plus the sweep's own settings.

A sweep file (``configs/sweeps/*.yaml``) names the models and categories to tune, the objective
and its mode, the scheduler, the search algorithm, trial counts and resources, and ``space``: one
entry per dotted config key with exactly one distribution, e.g. ::

    space:
      student.hidden_channels: {choice: [64, 128, 256]}
      student.lr: {loguniform: [1.0e-4, 1.0e-3]}
      teacher: {choice: [{coupling_blocks: 2, kernel_sizes: [3, 5]}, {coupling_blocks: 4}]}

(a mapping value sets several keys of a section together, for keys that must agree). Every key
and every value a distribution can produce is checked against the config schema here, before
Ray starts, exactly as a command-line override would be (:func:`~effad_hpc.config.set_key`).
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import Field, PositiveInt, ValidationError, model_validator

from effad_hpc.config import (
    DuplicateKeyError,
    ExperimentConfig,
    Section,
    SyntheticScore,
    YamlLoader,
    format_errors,
    set_key,
    yaml_error_line,
)
from effad_hpc.errors import ConfigError

T = TypeVar("T")
GRID_CHECK_LIMIT = 256
"""A space of discrete distributions only is checked combination by combination up to this many."""


Pair = Annotated[list[T], Field(min_length=2, max_length=2)]
"""[low, high]."""


class Distribution(Section):
    """Exactly one of the fields, as Ray Tune names them."""

    choice: Annotated[list[Any], Field(min_length=1)] | None = None
    grid: Annotated[list[Any], Field(min_length=1)] | None = None
    uniform: Pair[float] | None = None
    loguniform: Pair[float] | None = None
    randint: Pair[int] | None = None
    """[low, high): high is excluded, as in Ray."""
    quniform: Annotated[list[float], Field(min_length=3, max_length=3)] | None = None
    """[low, high, q]: uniform, rounded to a multiple of q."""

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(type(self).model_fields)} (got {given or 'none'})")
        low_high = self.uniform or self.loguniform or self.randint or self.quniform
        if low_high is not None and not low_high[0] < low_high[1]:
            raise ValueError(f"low {low_high[0]} must be below high {low_high[1]}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform needs a positive low")
        if self.quniform is not None and self.quniform[2] <= 0:
            raise ValueError("quniform needs a positive q")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in type(self).model_fields if getattr(self, name) is not None)

    def candidates(self) -> list[Any]:
        """Every value it can produce (discrete) or the values at its ends (ranges)."""
        if self.choice is not None or self.grid is not None:
            return list(self.choice or self.grid)
        if self.randint is not None:
            return [self.randint[0], self.randint[1] - 1]
        if self.quniform is not None:
            low, high, q = self.quniform
            return [round(low / q) * q, round(high / q) * q]
        return list(self.uniform or self.loguniform)

    def to_ray(self):
        from ray import tune

        if self.choice is not None:
            return tune.choice(self.choice)
        if self.grid is not None:
            return tune.grid_search(self.grid)
        if self.randint is not None:
            return tune.randint(*self.randint)
        if self.quniform is not None:
            return tune.quniform(*self.quniform)
        if self.loguniform is not None:
            return tune.loguniform(*self.loguniform)
        return tune.uniform(*self.uniform)


class SchedulerSettings(Section):
    kind: Literal["asha", "fifo"] = "asha"
    grace_period: PositiveInt = 1
    """Validation rounds every trial runs before ASHA may stop it."""
    reduction_factor: Annotated[float, Field(gt=1)] = 2.0
    """1 / the fraction of trials ASHA keeps at each rung."""


class TrialResources(Section):
    cpu: Annotated[float, Field(gt=0)] = 1.0
    gpu: Annotated[float, Field(ge=0)] = 0.0
    """Fractions share a GPU between trials (0.5: two trials per GPU)."""


class SweepSpec(Section):
    models: Annotated[list[str], Field(min_length=1)]
    """One Tune experiment per model, each over the same space."""
    categories: list[str] | None = None
    """Tuned together (the objective is the mean over them); default: the config's categories."""
    objective: SyntheticScore = "val_synthetic_mean"
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerSettings = SchedulerSettings()
    search: Literal["random", "grid", "optuna"] = "random"
    """``random`` (and ``grid`` entries, crossed) through Ray's variant generator; ``optuna``
    through Ray's OptunaSearch (needs ``pip install optuna``; no ``grid`` entries)."""
    num_samples: PositiveInt = 4
    """Trials drawn (with grid entries: repeats of the full grid)."""
    max_concurrent: PositiveInt = 1
    resources: TrialResources = TrialResources()
    max_failures: Annotated[int, Field(ge=0)] = 1
    """Retries of a trial that raised before it is recorded as failed (the sweep goes on)."""
    top_k: Annotated[int, Field(ge=0)] = 1
    """Best trials evaluated on the test split once the search has ended (0: none)."""
    seed: int = 0
    """Seed of the search (which values are drawn)."""
    space: Annotated[dict[str, Distribution], Field(min_length=1)]

    @model_validator(mode="after")
    def _optuna_draws_no_grid(self) -> SweepSpec:
        if self.search == "optuna" and any(d.grid is not None for d in self.space.values()):
            raise ValueError("search optuna: grid entries are Ray's variant generator's; use choice")
        return self


def load_spec(path: Path) -> SweepSpec:
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=YamlLoader)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read sweep file ({exc.strerror})") from None
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_error_line(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping (models, space, ...) at the top level")
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_errors(str(path), exc)) from None


def apply_params(base: dict, params: dict[str, Any], source: str) -> ExperimentConfig:
    """The config ``base`` (a resolved config's JSON dump) with the dotted ``params`` set, validated.
    A mapping value for a section key merges into the section."""
    raw = copy.deepcopy(base)
    for key, value in params.items():
        current = _lookup(raw, key)
        if isinstance(value, dict) and isinstance(current, dict):
            value = current | value
        set_key(raw, key, value, source)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_errors(source, exc)) from None


def _lookup(raw: dict, key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def check_space(base: dict, spec: SweepSpec, path: Path) -> None:
    """Every key of the space and every value it can take, validated as a trial would be: an
    unknown key or a rejected value is a one-line error naming the sweep file and the key."""
    from effad_hpc.training import recipe

    for model in spec.models:
        recipe(model)  # an unknown model is a ConfigError naming the known ones
    for key, distribution in spec.space.items():
        for value in distribution.candidates():
            try:
                apply_params(base, {key: value}, f"{path}: space.{key} = {value!r}")
            except ConfigError as exc:
                raise ConfigError(_one_line(str(exc), key)) from None
    if all(d.kind in ("choice", "grid") for d in spec.space.values()):
        keys = list(spec.space)
        combinations = itertools.product(*(spec.space[key].candidates() for key in keys))
        for values in itertools.islice(combinations, GRID_CHECK_LIMIT):
            params = dict(zip(keys, values))
            try:
                apply_params(base, params, f"{path}: space {params}")
            except ConfigError as exc:
                raise ConfigError(_one_line(str(exc), ", ".join(keys))) from None


def _one_line(message: str, key: str) -> str:
    lines = message.splitlines()
    first = lines[0].replace(": extra_forbidden", "")
    if "unknown key" in first:
        first = first.replace("unknown key", f"unknown config key (space key {key})")
    return first + (f" (and {len(lines) - 1} more)" if len(lines) > 1 else "")


def param_space(spec: SweepSpec) -> dict[str, Any]:
    return {key: distribution.to_ray() for key, distribution in spec.space.items()}
