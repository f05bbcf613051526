"""EfficientAD's networks and teacher distillation as the authors' code builds them
(nelson1425/EfficientAD: common.py's get_pdn_small / get_pdn_medium, pretraining.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from effad_hpc.models import PDN, build_model
from effad_hpc.models.pdn import DistillationTargets
from effad_hpc.training.efficientad_stages import (
    _distill_settings,
    _target_stats,
    distillation_targets,
    distillation_views,
)

from tests.conftest import tiny_config

# (in, out, kernel) of conv1, conv2, ... in the authors' get_pdn_small / get_pdn_medium(out_channels).
REFERENCE_PDN = {
    "small": lambda out: [(3, 128, 4), (128, 256, 4), (256, 256, 3), (256, out, 4)],
    "medium": lambda out: [(3, 256, 4), (256, 512, 4), (512, 512, 1), (512, 512, 3), (512, out, 4), (out, out, 1)],
}


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("out_channels", [384, 768])  # teacher, student
@pytest.mark.parametrize("size", ["small", "medium"])
def test_pdn_layers_are_the_reference_table(size, out_channels, padded):
    convs = [(name, m) for name, m in PDN(size, out_channels, padded).named_modules()
             if isinstance(m, torch.nn.Conv2d)]
    assert [name for name, _ in convs] == [f"conv{i + 1}" for i in range(len(convs))]  # anomalib's state dict keys
    assert [(m.in_channels, m.out_channels, m.kernel_size[0]) for _, m in convs] == REFERENCE_PDN[size](out_channels)


def test_efficientad_m_student_has_no_384_bottleneck():
    student = build_model("efficientad_m", image_size=256).student
    assert (student.conv5.out_channels, student.conv6.in_channels, student.conv6.out_channels) == (768, 768, 768)


# --- distillation targets ------------------------------------------------------------------


def _reference_embed(layer2: torch.Tensor, layer3: torch.Tensor, width: int = 1024, out: int = 384) -> torch.Tensor:
    """pretraining.py's FeatureExtractor.embed op by op: each layer's zero-padded 3x3 patches
    (channel-major), layer3's bilinearly interpolated to layer2's grid, each layer's patch
    average-pooled to ``width`` (MeanMapper), both stacked and pooled to ``out`` (Aggregator)."""
    height, width_px = layer2.shape[-2:]
    per_layer = []
    for maps in (layer2, layer3):
        patches = F.unfold(maps, 3, padding=1).reshape(len(maps), -1, *maps.shape[-2:])
        patches = F.interpolate(patches, size=(height, width_px), mode="bilinear", align_corners=False)
        rows = patches.permute(0, 2, 3, 1).reshape(-1, 1, patches.shape[1])
        per_layer.append(F.adaptive_avg_pool1d(rows, width))
    pooled = F.adaptive_avg_pool1d(torch.cat(per_layer, dim=-1), out)
    return pooled.reshape(len(layer2), height, width_px, out).permute(0, 3, 1, 2)


def test_targets_are_the_reference_embedding():
    generator = torch.Generator().manual_seed(0)
    layer2, layer3 = torch.randn(2, 128, 8, 8, generator=generator), torch.randn(2, 256, 4, 4, generator=generator)
    targets = DistillationTargets([128, 256], grid=8)([layer2, layer3])
    torch.testing.assert_close(targets, _reference_embed(layer2, layer3), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer3_channels", [256, 512])
def test_both_layers_weigh_the_same_whatever_their_widths(layer3_channels):
    project = DistillationTargets([128, layer3_channels], grid=8)
    ones2, ones3 = torch.ones(1, 128, 8, 8), torch.ones(1, layer3_channels, 4, 4)
    only2 = project([ones2, torch.zeros_like(ones3)])[0, :, 3:5, 3:5]  # positions clear of the zero padding
    only3 = project([torch.zeros_like(ones2), ones3])[0, :, 3:5, 3:5]
    # Each layer fills half of the 384 channels: the first 192 are layer2's, the last 192 layer3's.
    torch.testing.assert_close(only2, torch.cat([torch.ones(192, 2, 2), torch.zeros(192, 2, 2)]))
    torch.testing.assert_close(only3, torch.cat([torch.zeros(192, 2, 2), torch.ones(192, 2, 2)]))


class _TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer2, self.layer3 = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.Conv2d(16, 32, 3, 2, 1)

    def forward(self, images):
        layer2 = self.layer2(images)
        return {"layer2": layer2, "layer3": self.layer3(layer2)}


def test_targets_are_float32_under_autocast():
    torch.manual_seed(0)
    backbone = SimpleNamespace(extractor=_TwoLayers(), layers=[SimpleNamespace(name="layer2", channels=16),
                                                                  SimpleNamespace(name="layer3", channels=32)])
    targets = distillation_targets(backbone, ["layer2", "layer3"], 16, torch.device("cpu"))
    images = torch.rand(2, 3, 32, 32)
    full = targets(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = targets(images)
    assert under_autocast.dtype == torch.float32 and under_autocast.shape == (2, 384, 16, 16)
    torch.testing.assert_close(under_autocast, full, rtol=1e-6, atol=1e-7)  # bf16 would be off by ~1e-2


def test_grayscale_hits_one_image_in_ten_and_both_views_together():
    images = torch.rand(4000, 3, 8, 8)
    backbone_view, pdn_view = distillation_views(images, torch.Generator().manual_seed(1), 0.1, 4)
    assert pdn_view.shape == (4000, 3, 4, 4)

    def grey(views):
        return (views[:, 1:] - views[:, :1]).abs().amax((1, 2, 3)) < 1e-6

    assert torch.equal(grey(backbone_view), grey(pdn_view))
    assert 0.08 < grey(backbone_view).float().mean() < 0.12
    colour = ~grey(backbone_view)
    assert torch.equal(backbone_view[colour], images[colour])
    again, _ = distillation_views(images, torch.Generator().manual_seed(1), 0.1, 4)
    assert torch.equal(again, backbone_view)  # the step's generator fixes the choice: a resume redraws it


def _config(tmp_path, distillation: dict):
    images = tmp_path / "imagenet"
    images.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(images / "a.png")
    return tiny_config(tmp_path / "data", tmp_path / "run", {
        "models": ["efficientad_s"],
        "distillation": {"images": str(images), "backbone": {"name": "tf_efficientnet_lite0",
                                                             "layers": ["blocks.2", "blocks.3"]}, **distillation}})


def test_statistics_use_the_configured_number_of_images(tmp_path):
    config = _config(tmp_path, {"normalization_images": 12, "batch_size": 4, "grayscale": 0.0})
    dataset = [{"image": torch.full((3, 2, 2), float(i))} for i in range(5)]  # fewer than 12: cycled through
    seen = []

    def compute(images):
        seen.append(images[:, 0, 0, 0])
        return images[:, :1]

    mean, _ = _target_stats(compute, dataset, config, "distill_s", tmp_path, "key", torch.device("cpu"))
    seen = torch.cat(seen)
    assert len(seen) == 12
    assert torch.bincount(seen.long(), minlength=5).tolist().count(2) == 3  # two passes, then two images more
    assert mean.flatten().item() == pytest.approx(seen.mean().item())


def test_reference_count_and_grayscale_are_the_defaults_and_in_the_stage_key(tmp_path):
    config = _config(tmp_path, {})
    assert (config.distillation.normalization_images, config.distillation.grayscale) == (10_000, 0.1)
    settings = _distill_settings(config)
    assert (settings["normalization_images"], settings["grayscale"]) == (10_000, 0.1)
