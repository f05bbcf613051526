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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import timm
import torch
from timm.layers import BatchNormAct2d, Conv2dSame
from timm.models._efficientnet_blocks import SqueezeExcite
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

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
        self.memory_format = torch.contiguous_format
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

    def optimize(self, channels_last: bool = True) -> FeatureExtractor:
        """For frozen forward passes (extraction, features on the fly, inference; not export, which
        traces the modules as built): batch norms folded into their convolutions
        (:func:`fold_batch_norms`) and TensorFlow "same" padding done by the convolutions
        themselves (:func:`pad_same_in_kernels`) and squeeze-excitation gates applied to the
        weights of the projections after them (:func:`gate_projections`), all checked on a probe
        image against the forward as built, then the NHWC layout when ``channels_last``, in which
        the features come out. Lite0 at 256 px on a CPU: 1.8x against NCHW for the layout and the
        folding (1.25x of it is the folding: a batch norm over NHWC is a slow pass), and 1.6x more
        from the padding; B5 at 768 px: 1.08x from the padding and 1.17x more from the gates
        (Lite0 has none)."""
        # two images: a rewrite may take another path for a batch (gate_projections does)
        probe = torch.rand(2, 3, PROBE_SIZE, PROBE_SIZE, generator=torch.Generator().manual_seed(0))
        probe = probe.to(self.mean.device)
        with torch.no_grad():
            reference = self(probe)
            undo_folding = fold_batch_norms(self.model)
            undo_padding = pad_same_in_kernels(self.model)
            undo_gating = gate_projections(self.model)
            optimized = self(probe)
        for layer, expected in reference.items():
            tolerance = 1e-4 * max(expected.abs().max().item(), 1e-6)
            if not torch.allclose(optimized[layer], expected, rtol=0, atol=tolerance):
                # e.g. a norm that did not follow its convolution after all: correct and slower
                undo_gating()
                undo_padding()
                undo_folding()
                break
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return self.to(memory_format=self.memory_format)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (images.contiguous(memory_format=self.memory_format) - self.mean) / self.std
        out: dict[str, torch.Tensor] = {}
        self._run(self.model, "", x, set(self.layers), out)
        return {name: out[name] for name in self.layers}


def fold_batch_norms(model: nn.Module) -> Callable[[], None]:
    """Fold each batch norm into the convolution registered just before it in the same parent (as
    timm's EfficientNets and ResNets build their blocks: conv, then norm): the convolution's weight
    and bias take the norm's running statistics and affine terms, and the norm leaves only its
    activation. A frozen model's outputs stay equal up to float32 rounding. Returns the undo."""
    undo = []
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, conv), (norm_name, norm) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and type(norm) in (nn.BatchNorm2d, BatchNormAct2d)
                    and norm.num_features == conv.out_channels and norm.running_mean is not None):
                continue
            undo.append((parent, norm_name, norm, conv, conv.weight, conv.bias))
            conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean,
                                                          norm.running_var, norm.eps, norm.weight, norm.bias)
            conv.requires_grad_(False)
            setattr(parent, norm_name, nn.Sequential(norm.drop, norm.act) if isinstance(norm, BatchNormAct2d)
                    else nn.Identity())

    def restore() -> None:
        for parent, norm_name, norm, conv, weight, bias in reversed(undo):
            conv.weight, conv.bias = weight, bias
            setattr(parent, norm_name, norm)
    return restore


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "same" padding (before, after) of one dimension: ceil(size / stride) outputs."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class KernelPaddedConv2d(nn.Module):
    """timm's ``Conv2dSame`` (TensorFlow "same" padding: a padded copy of the input, one more
    row and column after it than before where the padding is uneven) computed without the copy:
    the convolution pads both sides by the larger amount, and its kernel gets a zero row (column)
    at its start for each uneven side, so every window reads the same pixels with the same weights.
    Wraps the convolution and reads its weight and bias at every call (they may be folded)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        (top, bottom), (left, right) = (_same_padding(size, kernel, stride) for size, kernel, stride
                                        in zip(x.shape[-2:], conv.kernel_size, conv.stride))
        weight = nn.functional.pad(conv.weight, (right - left, 0, bottom - top, 0))
        return nn.functional.conv2d(x, weight, conv.bias, conv.stride, (bottom, right), 1, conv.groups)


def pad_same_in_kernels(model: nn.Module) -> Callable[[], None]:
    """Replace each timm ``Conv2dSame`` of ``model`` (the strided convolutions of the ``tf_``
    EfficientNets: F.pad copies the input of each, the largest tensors of the network) by a
    :class:`KernelPaddedConv2d` that gives the same outputs. Returns the undo."""
    undo = []
    for parent in list(model.modules()):
        if isinstance(parent, KernelPaddedConv2d):  # replaced by an earlier call
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv2dSame) and child.dilation == (1, 1):
                undo.append((parent, name, child))
                setattr(parent, name, KernelPaddedConv2d(child))

    def restore() -> None:
        for parent, name, conv in undo:
            setattr(parent, name, conv)
    return restore


class GatedProjection(nn.Module):
    """A squeeze-excitation (timm's ``SqueezeExcite``) and the 1x1 convolution after it, as one
    step: the gate is computed from the input as before, then multiplied into the convolution's
    weights, one set per image, instead of into the input: W (g * x) = (W g) x. That saves the
    gate's pass over the block's widest tensor (B5 at 768 px: 26 -> 8 ms for the 240 channels at
    192x192)."""

    def __init__(self, excitation: SqueezeExcite, conv: nn.Conv2d):
        super().__init__()
        self.excitation, self.conv = excitation, conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        se = self.excitation
        gate = se.gate(se.conv_expand(se.act1(se.conv_reduce(x.mean((2, 3), keepdim=True)))))
        weight, bias = self.conv.weight, self.conv.bias
        if x.shape[0] == 1:
            return nn.functional.conv2d(x, weight * gate.view(1, -1, 1, 1), bias)
        if not x.is_contiguous(memory_format=torch.channels_last):  # an NCHW batch: as timm computes it
            return nn.functional.conv2d(x * gate, weight, bias)
        # each image its own weights: a batched matrix product over the NHWC pixels
        batch, channels, height, width = x.shape
        weights = weight.view(1, -1, channels) * gate.view(batch, 1, channels)  # (B, out, in)
        pixels = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        out = torch.bmm(pixels, weights.transpose(1, 2)) if bias is None else torch.baddbmm(
            bias, pixels, weights.transpose(1, 2))
        return out.view(batch, height, width, -1).permute(0, 3, 1, 2)


def gate_projections(model: nn.Module) -> Callable[[], None]:
    """Where a block of ``model`` registers a timm ``SqueezeExcite`` and right after it a plain 1x1
    convolution (the projection of EfficientNet's blocks, which they call next), the excitation
    becomes an identity and the convolution a :class:`GatedProjection` of both: the same outputs
    without the gated copy of the block's widest tensor. Returns the undo."""
    undo = []
    for parent in list(model.modules()):
        if isinstance(parent, GatedProjection):  # made by an earlier call
            continue
        children = list(parent.named_children())
        for (se_name, se), (conv_name, conv) in zip(children, children[1:]):
            if not (type(se) is SqueezeExcite and type(conv) is nn.Conv2d and conv.kernel_size == (1, 1)
                    and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.groups == 1):
                continue
            undo.append((parent, se_name, se, conv_name, conv))
            setattr(parent, se_name, nn.Identity())
            setattr(parent, conv_name, GatedProjection(se, conv))

    def restore() -> None:
        for parent, se_name, se, conv_name, conv in undo:
            setattr(parent, se_name, se)
            setattr(parent, conv_name, conv)
    return restore


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
