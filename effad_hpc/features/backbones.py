"""Frozen timm feature extractors built by name, truncated after the deepest requested layer.

The feature layers are module names of the timm model (``blocks.5`` for the end of
EfficientNet stage 5, ``layer2`` for a ResNet). timm's ``features_only`` exposes only some
stages (not EfficientNet-B5's stage 5 that AST uses), so the extractor runs the model's
children in order and stops after the last layer it needs. That order is checked once, when the
extractor is built, against forward hooks on the complete model; the channel counts and strides
are read off the same probe and cross-checked with timm's ``feature_info`` where it lists a layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import timm
import torch
from torch import nn

from effad_hpc.config import BackboneConfig
from effad_hpc.errors import ConfigError
from effad_hpc.features.weights import LITE0, load_pretrained

PROBE_SIZE = 128  # divisible by every stride of the supported backbones; cheap even for B5


@dataclass(frozen=True)
class FeatureLayer:
    name: str
    channels: int
    stride: int

    def map_size(self, image_size: int) -> int:
        return -(-image_size // self.stride)  # the backbones pad "same": ceil(image / stride)


class FeatureExtractor(nn.Module):
    """``forward(images in [0, 1]) -> {layer name: (B, C, H, W) features}``; always in eval mode."""

    def __init__(self, model: nn.Module, layers: list[str], mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.model = model
        self.layers = list(layers)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.model.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FeatureExtractor:
        # Frozen means frozen: batch-norm statistics must never move, whatever a caller asks.
        return super().train(False)

    def _run(self, module: nn.Module, prefix: str, x: torch.Tensor, wanted: set[str], out: dict) -> torch.Tensor:
        for name, child in module.named_children():
            if not wanted - out.keys():
                break
            path = f"{prefix}{name}"
            if any(layer.startswith(path + ".") for layer in wanted - out.keys()):
                x = self._run(child, path + ".", x, wanted, out)
            else:
                x = child(x)
            if path in wanted:
                out[path] = x
        return x

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (images - self.mean) / self.std
        out: dict[str, torch.Tensor] = {}
        self._run(self.model, "", x, set(self.layers), out)
        return {name: out[name] for name in self.layers}


def _probe(extractor: FeatureExtractor, name: str) -> list[FeatureLayer]:
    """Check the truncated forward against hooks on the full model; measure channels and strides."""
    hooked: dict[str, torch.Tensor] = {}
    modules = dict(extractor.model.named_modules())
    handles = [modules[layer].register_forward_hook(lambda _m, _i, o, layer=layer: hooked.__setitem__(layer, o))
               for layer in extractor.layers]
    images = torch.rand(1, 3, PROBE_SIZE, PROBE_SIZE, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            truncated = extractor(images)
            extractor.model((images - extractor.mean) / extractor.std)
    finally:
        for handle in handles:
            handle.remove()
    listed = {info["module"]: info for info in getattr(extractor.model, "feature_info", [])}
    layers = []
    for layer in extractor.layers:
        if not torch.allclose(truncated[layer], hooked[layer], atol=1e-5):
            raise ConfigError(f"backbone {name}: layer {layer} cannot be reached by running the model's "
                              "modules in order; choose another layer")
        channels, stride = truncated[layer].shape[1], PROBE_SIZE // truncated[layer].shape[-1]
        if layer in listed and (listed[layer]["num_chs"], listed[layer]["reduction"]) != (channels, stride):
            raise RuntimeError(f"{name}.{layer}: probe gives {channels} ch / stride {stride}, timm's feature_info "
                               f"{listed[layer]['num_chs']} / {listed[layer]['reduction']}")
        layers.append(FeatureLayer(layer, channels, stride))
    return layers


MIN_GRID = 3
"""Cells per side the deepest layer must give: a 1x1 or 2x2 grid is no anomaly map."""


def check_input_size(layers: Sequence[FeatureLayer], image_size: int, key: str) -> None:
    """Raise a ConfigError naming ``key`` when ``image_size`` is not a multiple of every layer's stride
    (the backbone would pad the border silently) or leaves the deepest layer a grid under 3x3."""
    deepest = max(layers, key=lambda layer: layer.stride)
    step = math.lcm(*(layer.stride for layer in layers))
    smallest = -(-MIN_GRID * deepest.stride // step) * step  # the smallest size that passes both checks
    if image_size % step:
        layer = max((layer for layer in layers if image_size % layer.stride), key=lambda layer: layer.stride)
        below, above = image_size // step * step, (image_size // step + 1) * step
        use = f"{below} or {above}" if below >= smallest else f"{max(above, smallest)}"
        raise ConfigError(f"{key} {image_size}: not a multiple of {layer.stride}, the stride of layer {layer.name} "
                          f"(use {use})")
    if (grid := deepest.map_size(image_size)) < MIN_GRID:
        raise ConfigError(f"{key} {image_size}: layer {deepest.name} (stride {deepest.stride}) gives a {grid}x{grid} "
                          f"grid; need at least {MIN_GRID}x{MIN_GRID} (use >= {smallest})")


@dataclass
class Backbone:
    """A built extractor with its feature layers and the source of its weights."""

    extractor: FeatureExtractor
    layers: list[FeatureLayer]
    weights_source: str


def create_model(config: BackboneConfig) -> nn.Module:
    """The timm model of ``config.name`` (``NAME.TAG``), without weights. Pretrained weights from
    the cache must be named by their tag: a bare name takes timm's first tag, which is not the
    papers' (``efficientnet_b5`` is ImageNet-12k, ``wide_resnet50_2`` timm's own recipe) and may
    change with the timm version."""
    try:
        model = timm.create_model(config.name, pretrained=False)
    except RuntimeError as exc:  # timm's "Unknown model" and "Invalid pretrained tag"
        raise ConfigError(f"backbone.name {config.name!r}: {exc}") from None
    if config.pretrained and config.weights_path is None and "." not in config.name and config.name != LITE0:
        tags = timm.list_pretrained(f"{config.name}.*")
        raise ConfigError(f"backbone {config.name}: name its pretrained weights as NAME.TAG in the section's "
                          f"`name` (one of {', '.join(tags) or 'none: timm has no pretrained weights for it'}), or "
                          "give a weights_path")
    return model


def build_backbone(config: BackboneConfig) -> Backbone:
    model = create_model(config)
    modules = dict(model.named_modules())
    for layer in config.layers:
        if layer not in modules:
            raise ConfigError(f"backbone.layers: {config.name} has no module {layer!r}")
    source = load_pretrained(model, config)
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    extractor = FeatureExtractor(model, config.layers, mean, std)
    return Backbone(extractor, _probe(extractor, config.name), source)
