"""Anomaly models registered by name, built from explicit sizes (as timm builds backbones).

``build_model("efficientad_ast", feature_channels=304, map_size=24, ...)`` returns a pure torch
module; the training layer maps a config onto these keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from effad_hpc.errors import ConfigError

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is registered twice")
        _BUILDERS[name] = builder
        return builder

    return decorate


def list_models() -> list[str]:
    return sorted(_BUILDERS)


def build_model(name: str, **kwargs) -> nn.Module:
    if name not in _BUILDERS:
        raise ConfigError(f"model {name!r} is not known; known models: {', '.join(list_models())}")
    return _BUILDERS[name](**kwargs)
