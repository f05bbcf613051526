"""The pure torch models: flow invertibility and log-determinant, shapes, losses, registry."""

from __future__ import annotations

import pytest
import torch

from effad_hpc.config import BackboneConfig
from effad_hpc.errors import ConfigError
from effad_hpc.features.backbones import build_backbone
from effad_hpc.models import AnomalyDetector, ASTTeacher, build_model, hard_mse, list_models
from effad_hpc.models.positional import positional_encoding_2d

TEACHER = {"pos_enc_channels": 8, "coupling_blocks": 2, "hidden_channels": 16, "kernel_sizes": [3, 5], "clamp": 3.0}


def _randomize(module: torch.nn.Module, scale: float = 0.2) -> None:
    """The flow starts as the identity (zero-initialised subnets); move it away from that. Every
    floating-point parameter, frozen ones too (a hybrid's teacher); not the flow's permutations."""
    generator = torch.Generator().manual_seed(0)
    for parameter in module.parameters():
        if parameter.is_floating_point():
            parameter.data = scale * torch.randn(parameter.shape, generator=generator)


def test_flow_is_invertible_and_its_log_det_matches_autograd():
    teacher = ASTTeacher(6, 3, **TEACHER)
    _randomize(teacher)
    teacher.double()  # exact enough to compare with autograd's determinant
    features = torch.randn(1, 6, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z, log_det = teacher(features)
    assert not torch.allclose(z, features, atol=1e-3)  # not the identity any more
    recovered = teacher.flow.inverse(z, teacher.condition(1))
    torch.testing.assert_close(recovered, features, atol=1e-9, rtol=1e-9)

    jacobian = torch.autograd.functional.jacobian(lambda x: teacher(x.view(1, 6, 3, 3))[0].flatten(),
                                                  features.flatten())
    sign, log_abs_det = torch.linalg.slogdet(jacobian)
    assert sign != 0
    torch.testing.assert_close(log_det[0], log_abs_det, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("raw, clamped", [  # at clamp 3: clamp * 0.636 * atan(raw / clamp)
    (0.0, 0.0), (3.0, 3.0 * 0.636 * torch.pi / 4), (-3.0, -3.0 * 0.636 * torch.pi / 4), (1.5, 3.0 * 0.636 * 0.4636476),
    (1e6, 3.0 * 0.636 * torch.pi / 2),
])
def test_soft_clamp_is_clamp_0636_atan_of_s_over_clamp(raw, clamped):
    """Through the real coupling block, whose subnets output the constant log-scale ``raw`` (their
    last conv is zero but for its bias): every element is scaled by exp(clamped). FrEIA's own
    clamps, clamp * 0.636 * atan(s) and clamp * tanh(s), differ at s = 1.5 and 3 (and tanh at 1e6)."""
    teacher = ASTTeacher(4, 2, **TEACHER | {"coupling_blocks": 1, "kernel_sizes": [3], "clamp": 3.0})
    coupling = teacher.flow.flow.module_list[-1]
    for subnet in (coupling.subnet1, coupling.subnet2):  # output channels: 2 log-scales, then 2 shifts
        subnet[-1].bias.data = torch.tensor([raw, raw, 0.0, 0.0])
    features = torch.rand(1, 4, 2, 2, generator=torch.Generator().manual_seed(0)) + 0.5
    z, log_det = teacher(features)
    assert log_det.item() == pytest.approx(16 * clamped, rel=1e-5, abs=1e-6)
    # the permutation only reorders the channels; each element is multiplied by exp(clamped)
    scaled = features.flatten() * torch.exp(torch.tensor(clamped))
    torch.testing.assert_close(z.flatten().sort().values, scaled.sort().values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pos_enc_channels, equivariant", [(0, True), (8, False)])
def test_a_position_free_model_scores_a_shifted_pattern_the_same(pos_enc_channels, equivariant):
    """pos_enc_channels 0: no condition, so the teacher's z and the students' maps of a shifted
    feature map are the shifted maps, away from the zero-padded border (2 blocks of kernels 3 and 5
    see 12 positions around); with the positional encoding they are not."""
    model = build_model("efficientad_ast", feature_channels=6, map_size=32,
                        teacher=TEACHER | {"pos_enc_channels": pos_enc_channels}, hidden_channels=8,
                        residual_blocks=1, ae_channels=4, ae_upsampling_stages=1).eval()
    _randomize(model)
    features = torch.randn(1, 6, 32, 32, generator=torch.Generator().manual_seed(2))
    shifted = torch.roll(features, shifts=(3, 3), dims=(2, 3))
    with torch.no_grad():
        z, z_shifted = model.teacher_outputs(features), model.teacher_outputs(shifted)
        st, st_shifted = model.maps(features)["st"], model.maps(shifted)["st"]
    inside = (slice(None), slice(None), slice(15, 17), slice(15, 17))
    same_z = torch.allclose(torch.roll(z, shifts=(3, 3), dims=(2, 3))[inside], z_shifted[inside], atol=1e-4)
    same_st = torch.allclose(torch.roll(st, shifts=(3, 3), dims=(1, 2))[inside[1:]], st_shifted[inside[1:]],
                             atol=1e-4)
    assert same_z == same_st == equivariant


def test_positional_encoding_distinguishes_every_position():
    encoding = positional_encoding_2d(32, 5, 7)
    assert encoding.shape == (32, 5, 7)
    vectors = encoding.flatten(1).T
    assert torch.cdist(vectors, vectors).add(torch.eye(35) * 10).min() > 1e-3
    with pytest.raises(ValueError, match="multiple of 4"):
        positional_encoding_2d(30, 4, 4)


def test_hard_mse_keeps_the_hardest_elements():
    target = torch.zeros(1000)
    prediction = torch.arange(1000, dtype=torch.float32)
    assert hard_mse(target, prediction, 1.0) == pytest.approx(prediction.pow(2).mean().item())
    top = prediction[900:].pow(2).mean().item()
    assert hard_mse(target, prediction, 0.9) == pytest.approx(top, rel=1e-3)


@pytest.mark.parametrize(("backbone", "layers", "image_size", "channels", "grid"), [
    ("tf_efficientnet_lite0", ["blocks.4"], 256, 112, 16),
    ("tf_efficientnet_b5.aa_in1k", ["blocks.5"], 768, 304, 24),
])
def test_shapes_follow_the_backbone(backbone, layers, image_size, channels, grid):
    extracted = build_backbone(BackboneConfig(name=backbone, layers=layers, pretrained=False))
    (layer,) = extracted.layers
    assert (layer.channels, layer.map_size(image_size)) == (channels, grid)
    features = torch.randn(2, channels, grid, grid)
    for name in ("ast", "efficientad_ast"):
        model = build_model(name, feature_channels=channels, map_size=grid, teacher=TEACHER, hidden_channels=16,
                            residual_blocks=1).eval()
        heads = 2 if name == "efficientad_ast" else 1
        student = model.student(model.teacher.with_positions(features))
        assert student.shape == (2, heads * channels, grid, grid)
        maps = model.maps(features)
        assert all(m.shape == (2, grid, grid) for m in maps.values())
        if name == "efficientad_ast":
            assert model.autoencoder(model.teacher.with_positions(features)).shape == (2, channels, grid, grid)
            torch.testing.assert_close(maps["combined"], 0.5 * maps["st"] + 0.5 * maps["ae"])


def test_detector_maps_come_at_image_size_with_max_or_mean_scores():
    backbone = build_backbone(BackboneConfig(layers=["blocks.2", "blocks.4"]))
    channels = sum(layer.channels for layer in backbone.layers)
    model = build_model("efficientad_ast", feature_channels=channels, map_size=4, teacher=TEACHER, hidden_channels=16,
                        residual_blocks=1)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = AnomalyDetector(model, 64, "max", backbone.extractor, ["blocks.2", "blocks.4"])(images)
    assert set(out["maps"]) == {"combined", "st", "ae", "teacher"}
    assert all(m.shape == (3, 64, 64) for m in out["maps"].values())
    torch.testing.assert_close(out["score"], out["maps"]["combined"].flatten(1).amax(1))
    mean = AnomalyDetector(model, 64, "mean", backbone.extractor, ["blocks.2", "blocks.4"])(images)
    torch.testing.assert_close(mean["score"], mean["maps"]["combined"].flatten(1).mean(1))


def test_registry_builds_by_name_and_names_unknown_models():
    assert set(list_models()) == {"ast", "efficientad_ast", "efficientad_s", "efficientad_m", "patchcore", "padim",
                                  "spade"}
    with pytest.raises(ConfigError, match="'patchcorex' is not known"):
        build_model("patchcorex")


def test_the_hybrid_averages_raw_maps_by_default_and_normalised_maps_on_request():
    torch.manual_seed(0)
    kwargs = {"feature_channels": 6, "map_size": 4, "teacher": TEACHER, "hidden_channels": 8, "residual_blocks": 1}
    raw = build_model("efficientad_ast", **kwargs).eval()
    assert "map_quantiles" not in raw.state_dict()  # the thesis's model and its saved files are unchanged
    normalised = build_model("efficientad_ast", **kwargs, map_normalization=True).eval()
    normalised.load_state_dict(raw.state_dict(), strict=False)
    normalised.map_quantiles.copy_(torch.tensor([[0.5, 1.5], [0.2, 0.4]]))
    features = torch.randn(2, 6, 4, 4)
    with torch.no_grad():
        st, ae = raw.raw_maps(features)
        assert torch.allclose(raw.maps(features)["combined"], 0.5 * st + 0.5 * ae)
        expected = 0.5 * 0.1 * (st - 0.5) / 1.0 + 0.5 * 0.1 * (ae - 0.2) / 0.2
        assert torch.allclose(normalised.maps(features)["combined"], expected, atol=1e-6)
