"""Every speed or memory optimisation against the reference computation it replaces: equal
outputs within a stated tolerance (speed itself is measured by benchmarks/run.py, not here)."""

from __future__ import annotations

import copy
import math
import os
import resource
import shutil

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from effad_hpc.config import BackboneConfig
from effad_hpc.errors import TrainingError
from effad_hpc.features.backbones import FeatureExtractor, build_backbone, fold_batch_norms
from effad_hpc.models import AnomalyDetector, ASTTeacher
from effad_hpc.models.autoencoder import FeatureAutoencoder
from effad_hpc.models.detector import gaussian_smooth
from effad_hpc.models.padim import PaDiM
from effad_hpc.models.spade import SPADE
from effad_hpc.training import read_log, stage_folder, train
from effad_hpc.training.artifacts import LAST_CHECKPOINT
from effad_hpc.training.detector import untrained_detector
from effad_hpc.training.targets import TARGETS_FILE
from effad_hpc.utils import memory
from tests.conftest import tiny_config
from tests.test_training import SMALL_NETS


@pytest.mark.parametrize("sigma, size", [(4.0, 64), (16.0, 256), (2.5, 37)])
def test_separable_smoothing_equals_torchvisions_dense_gaussian_blur(sigma, size):
    maps = torch.rand(2, 1, size, size + 3, generator=torch.Generator().manual_seed(0))
    kernel = 2 * math.ceil(4 * sigma) + 1
    exact = TF.gaussian_blur(maps.double(), [kernel, kernel], [sigma, sigma])
    dense = TF.gaussian_blur(maps, [kernel, kernel], [sigma, sigma])
    separable = gaussian_smooth(maps, sigma).double()
    # float32: the dense kernel sums up to 129^2 products, so it strays more from the exact result
    assert (separable - exact).abs().max() <= 1e-6
    assert (separable - exact).abs().max() <= (dense.double() - exact).abs().max() + 1e-7


def _thesis_decoder(channels: int, out_channels: int, map_size: int, stages: int) -> torch.nn.Sequential:
    """EfficientAD-AST's decoder as the thesis lists it: explicit nearest x2 upsampling and a final
    adaptive average pooling back to the grid."""
    layers = [torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.ReLU(), torch.nn.Dropout(0.2)]
    for _ in range(stages):
        layers += [torch.nn.Upsample(scale_factor=2, mode="nearest"), torch.nn.Conv2d(channels, channels, 3, padding=1),
                   torch.nn.ReLU(), torch.nn.Dropout(0.2)]
    return torch.nn.Sequential(*layers, torch.nn.Conv2d(channels, out_channels, 3, padding=1),
                               torch.nn.AdaptiveAvgPool2d(map_size))


@pytest.mark.parametrize("stages, map_size", [(2, 6), (1, 5), (3, 4)])
def test_feature_autoencoder_computes_the_thesis_decoder_with_its_weights(stages, map_size):
    torch.manual_seed(0)
    autoencoder = FeatureAutoencoder(9, 7, channels=8, upsampling_stages=stages).double()
    reference = _thesis_decoder(8, 7, map_size, stages).double()
    # The same keys: weights trained before the decoder was reformulated load unchanged.
    autoencoder.decoder.load_state_dict(reference.state_dict())
    code = torch.randn(3, 8, map_size, map_size, dtype=torch.float64, requires_grad=True)
    for module in (autoencoder, reference):  # eval: no dropout, so both are deterministic
        module.eval()
    ours, theirs = autoencoder.decoder(code), reference(code)
    assert ours.shape == theirs.shape == (3, 7, map_size, map_size)
    assert (ours - theirs).abs().max() <= 1e-12
    # Training takes the same gradients (to the weights and through the decoder).
    weights = dict(autoencoder.decoder.named_parameters())
    reference_weights = dict(reference.named_parameters())
    grads = torch.autograd.grad(ours.pow(2).sum(), [code, *weights.values()])
    reference_grads = torch.autograd.grad(theirs.pow(2).sum(), [code, *(reference_weights[k] for k in weights)])
    for grad, reference_grad in zip(grads, reference_grads):
        assert (grad - reference_grad).abs().max() <= 1e-10 * max(1.0, reference_grad.abs().max().item())
    # float32, as trained and served: within float rounding of the reference.
    ours32, theirs32 = autoencoder.float().decoder(code.float()), reference.float()(code.float())
    assert (ours32 - theirs32).abs().max() <= 1e-5 * theirs32.abs().max()


def _reference_padim(features: torch.Tensor, channel_index: torch.Tensor, regularization: float):
    """Per position, in float64: the sample mean and the inverse of the regularised sample covariance."""
    x = features.double()[:, channel_index].flatten(2).permute(2, 0, 1)  # (positions, N, dims)
    mean = x.mean(1)
    centred = x - mean[:, None]
    covariance = centred.transpose(1, 2) @ centred / (x.shape[1] - 1)
    return mean, torch.linalg.inv(covariance + regularization * torch.eye(x.shape[-1], dtype=torch.float64))


def test_padim_chunked_in_place_fit_equals_the_direct_float64_computation():
    generator = torch.Generator().manual_seed(1)
    batches = [2.0 + torch.randn(5, 12, 6, 7, generator=generator) for _ in range(3)]  # 42 positions
    model = PaDiM.fit(batches, dims=10, regularization=0.01, position_chunk=5)  # chunks that do not divide 42
    mean, precision = _reference_padim(torch.cat(batches), model.channel_index, 0.01)
    assert torch.allclose(model.mean.double(), mean, atol=1e-5)
    assert torch.allclose(model.precision.double(), precision, rtol=1e-4, atol=1e-4)
    one_chunk = PaDiM.fit(batches, dims=10, regularization=0.01, position_chunk=10_000)
    assert torch.allclose(model.precision, one_chunk.precision, rtol=1e-5, atol=1e-5)


def test_spade_float16_gallery_maps_equal_float32_within_2e_3():
    generator = torch.Generator().manual_seed(2)
    gallery = torch.randn(12, 16, 5, 5, generator=generator)
    test = torch.randn(3, 16, 5, 5, generator=generator)
    full = SPADE.fit([gallery[:7], gallery[7:]], image_neighbors=4, gallery_dtype=torch.float32)
    half = SPADE.fit([gallery[:7], gallery[7:]], image_neighbors=4)
    assert half.gallery.dtype == torch.float16 and half.gallery.nbytes == full.gallery.nbytes // 2
    want = full.maps(test)["combined"]
    assert (half.maps(test)["combined"] - want).abs().max() <= 2e-3 * want.abs().max()
    assert torch.allclose(half.image_scores(test, {}), full.image_scores(test, {}))  # global features stay float32


@pytest.mark.parametrize("model", ["efficientad_ast", "ast"])
def test_cached_teacher_targets_train_the_student_as_computed_ones(model, synthetic_ad, tmp_path, monkeypatch):
    """z computed once per sample instead of every epoch: the same validation losses within 1e-4
    (relative), the teacher run once per sample, and no cache file left behind."""
    section = "student" if model == "efficientad_ast" else "ast_student"
    stage = "student_ae" if model == "efficientad_ast" else "student"
    calls = []
    forward = ASTTeacher.forward
    monkeypatch.setattr(ASTTeacher, "forward", lambda self, features: calls.append(len(features)) or
                        forward(self, features))
    histories = {}
    for targets in ("computed", "cached"):
        config = tiny_config(synthetic_ad, tmp_path / targets, SMALL_NETS | {f"{section}.teacher_targets": targets})
        train(config, model, "fabric", show_progress=False)  # the teacher stage too: its calls are counted
        calls.clear()
        folder = stage_folder(config, "fabric", stage)
        shutil.rmtree(folder)
        train(config, model, "fabric", show_progress=False)
        histories[targets] = [float(row["validation"]) for row in read_log(folder)]
        counted = sum(calls)
        assert not (folder / TARGETS_FILE).exists()
    samples = 6 + 2  # synthetic_ad fabric: 8 good training images, a quarter held out for validation
    assert counted == samples  # cached: each sample once, for 4 epochs and 4 validation passes
    assert np.allclose(histories["cached"], histories["computed"], rtol=1e-4, atol=0)
    assert len(histories["cached"]) == 4


def _assert_same_outputs(reference: AnomalyDetector, optimized: AnomalyDetector) -> None:
    """Maps within 1e-4 of the largest map value, image scores within 1e-4 (relative)."""
    images = torch.rand(2, 3, reference.image_size, reference.image_size, generator=torch.Generator().manual_seed(0))
    want, got = reference(images), optimized(images)
    scale = want["maps"]["combined"].abs().max()
    assert (got["maps"]["combined"] - want["maps"]["combined"]).abs().max() <= 1e-4 * scale
    assert torch.allclose(got["score"], want["score"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model", ["efficientad_ast", "ast", "efficientad_s", "patchcore", "padim", "spade"])
def test_channels_last_detector_equals_the_contiguous_one(model, synthetic_ad, tmp_path):
    config = tiny_config(synthetic_ad, tmp_path, SMALL_NETS | {"efficientad.image_size": 64})
    _assert_same_outputs(untrained_detector(config, model, train_images=6),
                         untrained_detector(config, model, train_images=6).optimize(channels_last=True))


def test_compiled_detector_equals_the_eager_one(synthetic_ad, tmp_path):
    """``inference.compile``: torch.compile with the weights frozen into the graph (EfficientAD-AST)."""
    config = tiny_config(synthetic_ad, tmp_path, SMALL_NETS)
    _assert_same_outputs(untrained_detector(config, "efficientad_ast", train_images=6),
                         untrained_detector(config, "efficientad_ast", train_images=6).optimize(compile=True))


def test_persistent_loader_workers_train_as_the_main_process_does(synthetic_ad, tmp_path):
    """``features.num_workers`` > 0: one set of worker processes for every epoch and validation
    pass; the same sample order, hence the same training, as reading in the main process."""
    histories = {}
    for workers in (0, 2):
        config = tiny_config(synthetic_ad, tmp_path / str(workers), SMALL_NETS | {"features.num_workers": workers})
        train(config, "ast", "fabric", show_progress=False)
        histories[workers] = [float(row["validation"]) for row in read_log(stage_folder(config, "fabric", "student"))]
    assert histories[2] == pytest.approx(histories[0], rel=1e-6)


def test_a_diverging_loss_fails_the_stage_and_keeps_the_last_checkpoint(synthetic_ad, tmp_path):
    """The loss is checked once per epoch (no host synchronisation per step): a run that diverges
    still ends with the named error, before the diverged epoch is checkpointed."""
    config = tiny_config(synthetic_ad, tmp_path, SMALL_NETS | {"teacher.lr": 1e30})
    with pytest.raises(TrainingError, match=r"training loss became (nan|inf) in epoch 1; try a lower teacher.lr"):
        train(config, "ast", "fabric", show_progress=False)
    assert not (stage_folder(config, "fabric", "teacher") / LAST_CHECKPOINT).exists()


def _randomize_norms(model: torch.nn.Module) -> None:
    """Running statistics and affine terms far from the identity, so that a wrong fold shows."""
    generator = torch.Generator().manual_seed(1)
    for norm in model.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            size = norm.num_features
            norm.running_mean.copy_(torch.randn(size, generator=generator))
            norm.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            norm.weight.data.copy_(torch.randn(size, generator=generator))
            norm.bias.data.copy_(torch.randn(size, generator=generator))


@pytest.mark.parametrize("name, layers", [("tf_efficientnet_lite0", ["blocks.2", "blocks.4"]),
                                          ("resnet18", ["layer2", "layer3"])])
def test_folded_batch_norms_give_the_backbones_features_and_can_be_undone(name, layers):
    extractor = build_backbone(BackboneConfig(name=name, layers=layers, pretrained=False)).extractor
    _randomize_norms(extractor.model)
    images = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in extractor.model.state_dict().items()}
    with torch.no_grad():
        want = extractor(images)
        undo = fold_batch_norms(extractor.model)
        got = extractor(images)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in extractor.model.modules())
    for layer in layers:
        assert (got[layer] - want[layer]).abs().max() <= 1e-4 * want[layer].abs().max()
    undo()
    after = extractor.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("kernel, stride, groups", [(3, 2, 1), (3, 2, 4), (5, 2, 4), (3, 3, 1), (4, 2, 1),
                                                   ((3, 5), (2, 1), 1)])
def test_same_padding_in_the_kernel_gives_timms_padded_convolution(kernel, stride, groups):
    """KernelPaddedConv2d against timm's Conv2dSame (the input padded, one more row and column
    after it than before where uneven) with the same weights, on even, odd and non-square inputs."""
    from timm.layers import Conv2dSame

    from effad_hpc.features.backbones import KernelPaddedConv2d

    generator = torch.Generator().manual_seed(0)
    conv = Conv2dSame(8, 8, kernel, stride, groups=groups).double()
    padded = KernelPaddedConv2d(conv)
    for height, width in [(16, 16), (15, 15), (16, 13), (17, 10), (2, 3)]:
        x = torch.randn(2, 8, height, width, generator=generator, dtype=torch.float64)
        want, got = conv(x), padded(x)
        strides = stride if isinstance(stride, tuple) else (stride, stride)
        assert got.shape == want.shape == (2, 8, -(-height // strides[0]), -(-width // strides[1]))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_optimized_tf_backbone_pads_in_its_kernels_and_gives_the_same_features():
    """optimize() on Lite0 (TensorFlow "same" padding in its strided convolutions) wraps every
    Conv2dSame and gives the features of the backbone as built, on an even and an odd input size."""
    from timm.layers import Conv2dSame

    from effad_hpc.features.backbones import KernelPaddedConv2d

    reference = build_backbone(BackboneConfig(name="tf_efficientnet_lite0", layers=["blocks.4"],
                                              pretrained=False)).extractor
    _randomize_norms(reference.model)
    optimized = copy.deepcopy(reference).optimize(channels_last=True).optimize(channels_last=True)  # idempotent
    padded = sum(isinstance(m, Conv2dSame) for m in reference.model.modules())
    assert padded > 0 and sum(isinstance(m, KernelPaddedConv2d) for m in optimized.model.modules()) == padded
    for size in (96, 81):
        images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            want, got = reference(images)["blocks.4"], optimized(images)["blocks.4"]
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def _gated_b0() -> tuple[FeatureExtractor, FeatureExtractor, int]:
    """(B0 as built, a copy for optimize(), its number of squeeze-excitations); B0 builds its
    blocks as B5 does."""
    from timm.models._efficientnet_blocks import SqueezeExcite

    reference = build_backbone(BackboneConfig(name="tf_efficientnet_b0", layers=["blocks.3", "blocks.5"],
                                              pretrained=False)).extractor
    _randomize_norms(reference.model)
    return reference, copy.deepcopy(reference), sum(type(m) is SqueezeExcite for m in reference.model.modules())


@pytest.mark.parametrize("channels_last", [True, False])
def test_squeeze_excitation_gates_in_the_projection_weights_give_the_same_features(channels_last):
    """optimize() on an EfficientNet with squeeze-excitation moves every block's gate into the
    weights of the 1x1 projection after it, and gives the features of the backbone as built at
    batch 1 (a convolution with gated weights) and batch 3 (NHWC: a batched matrix product; NCHW:
    the gate on the input, as timm computes it), in both layouts."""
    from effad_hpc.features.backbones import GatedProjection

    reference, optimized, excitations = _gated_b0()
    optimized.optimize(channels_last).optimize(channels_last)  # idempotent
    assert excitations > 0
    assert sum(isinstance(m, GatedProjection) for m in optimized.model.modules()) == excitations
    for batch in (1, 3):
        images = torch.rand(batch, 3, 96, 96, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want, got = reference(images), optimized(images)
        for layer, expected in want.items():
            assert got[layer].is_contiguous(memory_format=optimized.memory_format)
            assert (got[layer] - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_compiled_gated_backbone_gives_the_same_features():
    """The gated projections under torch.compile with frozen weights, as inference.compile runs the
    backbone (the compiled-detector test uses Lite0, which has no squeeze-excitation)."""
    reference, optimized, _ = _gated_b0()
    compiled = torch.compile(optimized.optimize(channels_last=True), dynamic=False, options={"freezing": True})
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = reference(images), compiled(images)
    for layer, expected in want.items():
        assert (got[layer] - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_a_norm_that_does_not_follow_its_convolution_is_left_unfolded():
    """Registration order is not data flow: here the norm runs before the convolution, so folding it
    would change the features; optimize() checks on a probe and keeps the model as it was."""

    class NormFirst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.norm = torch.nn.BatchNorm2d(3)

        def forward(self, x):
            return self.conv(self.norm(x))

    model = torch.nn.Sequential()
    model.add_module("block", NormFirst())
    _randomize_norms(model)
    extractor = FeatureExtractor(model, ["block"], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = extractor(images)["block"]
        got = extractor.optimize(channels_last=True)(images)["block"]
    assert isinstance(model.block.norm, torch.nn.BatchNorm2d)
    assert torch.allclose(got, want, atol=1e-6)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _page_faults_counted_per_page() -> bool:
    """Whether a fresh block faults page by page: glibc's malloc (not a preloaded allocator), and
    transparent huge pages not forced on every mapping (then a fault brings in 2 MiB)."""
    try:
        huge_pages = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        huge_pages = ""
    preloaded = os.environ.get("LD_PRELOAD", "")
    return memory._LIBC is not None and "[always]" not in huge_pages and "malloc" not in preloaded


@pytest.mark.skipif(not _page_faults_counted_per_page(),
                    reason="counts glibc's page faults page by page: a no-op elsewhere, huge pages forced here")
def test_reused_memory_keeps_freed_batches_for_the_next_one_and_returns_them_afterwards():
    """Outside the scope every 64 MiB tensor is faulted in page by page again; inside, once a few
    have been freed, the next ones reuse their pages. Leaving the (outermost) scope gives them back."""
    batch = torch.zeros(2**24)  # 64 MiB

    def page_faults(tensors: int) -> int:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(tensors):
            batch + 1  # a 64 MiB activation: written, then freed
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

    outside = page_faults(4)
    before = _resident_bytes()
    with memory.reused_memory():
        # malloc's 64-byte alignment asks a little more than the block freed last; a few more
        # blocks later, the freed ones have merged into blocks that fit
        page_faults(8)
        with memory.reused_memory():
            pass  # an inner scope ends: the outer one still keeps
        inside = page_faults(4)
        kept = _resident_bytes() - before
    returned = _resident_bytes() - before
    assert outside >= 4 * 2**26 // resource.getpagesize() // 2  # about one fault per page
    assert inside < outside / 20
    assert kept >= 2**26 * 0.9  # freed, and still with the process
    assert returned < 2**26 * 0.5
