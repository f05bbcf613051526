"""EfficientAD-S/M: the architecture of SPEC section 1, the statistics the training fills in
(teacher channel normalization, map normalization), the resumable step loop, the shared teacher
distillation (or a user's teacher file) and real training that separates defects."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from effad_hpc.data import ImageDataset, load_category
from effad_hpc.errors import CheckpointError
from effad_hpc.evaluation import evaluate_category
from effad_hpc.hpc.graph import Node, category_graph, run_graph
from effad_hpc.models import PDN, build_model, hard_mse
from effad_hpc.models.autoencoder import ImageAutoencoder
from effad_hpc.models.losses import quantile
from effad_hpc.training import read_log, read_record, stage_dir, train
from effad_hpc.training.artifacts import BEST_MODEL, SHARED
from effad_hpc.training.efficientad_stages import jitter, map_quantiles, penalty_view, teacher_statistics
from effad_hpc.training.steps import StepRun, fit_steps

from tests.conftest import REPO, tiny_config


@pytest.mark.parametrize("size", ["small", "medium"])
def test_pdn_grids_at_256_px(size):
    images = torch.zeros(1, 3, 256, 256)
    assert PDN(size)(images).shape == (1, 384, 56, 56)
    assert PDN(size, padded=True)(images).shape == (1, 384, 64, 64)  # WideResNet layer2's grid at 512 px
    assert PDN(size, out_channels=768)(images).shape == (1, 768, 56, 56)
    conv_widths = [m.out_channels for m in PDN(size).modules() if isinstance(m, torch.nn.Conv2d)]
    assert conv_widths == ([128, 256, 256, 384] if size == "small" else [256, 512, 512, 512, 384, 384])


def test_image_autoencoder_follows_the_paper_at_256_and_scales_below():
    paper = ImageAutoencoder(256, 56)
    assert paper.sizes == [3, 8, 15, 32, 63, 127]
    assert paper(torch.zeros(2, 3, 256, 256)).shape == (2, 384, 56, 56)
    assert ImageAutoencoder(128, 24)(torch.zeros(1, 3, 128, 128)).shape == (1, 384, 24, 24)
    with pytest.raises(ValueError, match="multiple of 32"):
        ImageAutoencoder(100, 20)


def test_hard_loss_quantile_on_a_bounded_sample_is_close_to_the_exact_one():
    generator = torch.Generator().manual_seed(0)
    target, prediction = torch.randn(200_000, generator=generator), torch.zeros(200_000)
    exact = hard_mse(target, prediction, 0.999)
    torch.manual_seed(0)
    sampled = hard_mse(target, prediction, 0.999, max_elements=50_000)
    assert sampled.item() == pytest.approx(exact.item(), rel=0.05)
    top = target.pow(2).topk(200).values.mean()  # 0.1 % of the elements
    assert exact.item() == pytest.approx(top.item(), rel=1e-3)


def test_ae_input_jitter_is_one_of_three_adjustments_and_reproducible():
    images = torch.rand(4, 3, 16, 16)
    first = jitter(images, torch.Generator().manual_seed(5), 0.2)
    again = jitter(images, torch.Generator().manual_seed(5), 0.2)
    assert torch.equal(first, again) and not torch.equal(first, images)
    assert first.min() >= 0 and first.max() <= 1
    assert torch.equal(jitter(images, torch.Generator(), 0.0), images)


def test_penalty_view_is_the_central_half_grey_about_three_times_in_ten():
    images = torch.rand(400, 3, 16, 16)
    views = penalty_view(images, torch.Generator().manual_seed(0))
    assert views.shape == (400, 3, 8, 8)
    centre = images[..., 4:12, 4:12]
    grey = (views[:, 0] == views[:, 1]).all(dim=(1, 2)) & (views[:, 1] == views[:, 2]).all(dim=(1, 2))
    assert torch.equal(views[~grey], centre[~grey])
    luminance = (torch.tensor([0.2989, 0.587, 0.114])[:, None, None] * centre[grey]).sum(1)
    assert torch.allclose(views[grey][:, 0], luminance, atol=1e-5)
    assert 0.22 < grey.float().mean() < 0.38


@pytest.fixture
def efficientad_config(synthetic_fabric, tmp_path):
    def make(changes: dict | None = None, data_root=None):
        return tiny_config(data_root or synthetic_fabric, tmp_path / "run", {
            "data.image_size": 128, "models": ["efficientad_s"],
            "efficientad": {"image_size": 64, "steps": 6, "checkpoint_every": 3},
            "distillation": {"images": str(synthetic_fabric), "pattern": "*/train/good/*", "steps": 4,
                             "batch_size": 2, "normalization_images": 4, "checkpoint_every": 2,
                             "backbone": {"name": "tf_efficientnet_lite0", "layers": ["blocks.2", "blocks.3"]},
                             "backbone_image_size": 128},
            "evaluation.latency_repeats": 2, **(changes or {})})

    return make


def test_teacher_normalization_and_map_normalization(efficientad_config):
    config = efficientad_config()
    data = load_category(config, "fabric")
    model = build_model("efficientad_s", image_size=64).eval()
    train_loader = DataLoader(ImageDataset(data.samples("train"), 64), batch_size=4)
    mean, std = teacher_statistics(model, train_loader, torch.device("cpu"))
    model.teacher_mean.copy_(mean)
    model.teacher_std.copy_(std)
    outputs = torch.cat([model.teacher_outputs(batch["image"]) for batch in train_loader])
    assert outputs.mean((0, 2, 3)).abs().max() < 1e-3
    assert (outputs.transpose(0, 1).flatten(1).std(1, unbiased=False) - 1).abs().max() < 1e-3

    validation = DataLoader(ImageDataset(data.samples("validation"), 64), batch_size=2)
    model.map_quantiles.copy_(map_quantiles(model, validation, torch.device("cpu"), (0.9, 0.995), "auto"))
    pad = 4
    maps = [model.maps(batch["image"]) for batch in validation]
    for part in ("st", "ae"):
        values = torch.cat([m[part][:, pad:-pad, pad:-pad].flatten() for m in maps])
        assert quantile(values, 0.9).item() == pytest.approx(0.0, abs=1e-6)
        assert quantile(values, 0.995).item() == pytest.approx(0.1, abs=1e-6)
    combined = maps[0]
    assert combined["combined"].shape[-1] == combined["st"].shape[-1] == 8 + 2 * pad  # 64 px -> 8x8 grid, padded
    assert torch.allclose(combined["combined"], 0.5 * combined["st"] + 0.5 * combined["ae"])


def test_step_loop_resumes_to_the_uninterrupted_result(tmp_path):
    images = torch.rand(5, 3, 32, 32)

    def run(folder, stop_at=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Dropout(0.5), torch.nn.Conv2d(4, 2, 3))

        def losses(step, generator):
            if step == stop_at:
                raise KeyboardInterrupt  # the job is killed here
            picks = torch.randint(len(images), (2,), generator=generator)
            loss = model(images[picks]).pow(2).mean()
            return {"mse": loss, "total": loss}

        return fit_steps(StepRun("toy", "cat", folder, "key", model, list(model.parameters()), losses, steps=10,
                                 lr=1e-2, weight_decay=0.0, lr_drop_at=0.5, checkpoint_every=3, seed=0,
                                 device=torch.device("cpu")), show_progress=False), model

    reference, reference_model = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop_at=7)
    resumed, resumed_model = run(tmp_path / "b")
    assert resumed.resumed_at_epochs == [6] and reference.final_epoch == resumed.final_epoch == 10
    for a, b in zip(reference_model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)
    assert not (tmp_path / "b" / "last.pt").exists()


def test_distillation_is_one_shared_node_upstream_of_every_category(efficientad_config):
    config = efficientad_config()
    graph = category_graph(config, "fabric", ["efficientad_s"])
    assert graph[Node("fabric", "efficientad_s")] == (Node(SHARED, "distill_s"),)
    assert Node("fabric", "extract") not in graph  # EfficientAD reads images, not the store
    both = run_graph(config, ["fabric", "washer"], ["efficientad_s", "patchcore"])
    assert [node for node in both if node.stage == "distill_s"] == [Node(SHARED, "distill_s")]


def test_user_teacher_file_replaces_distillation(efficientad_config, tmp_path):
    teacher = PDN("small")
    path = tmp_path / "teacher_s.pth"
    torch.save(teacher.state_dict(), path)
    config = efficientad_config({"distillation": {"teacher_weights": str(path)}})
    train(config, "efficientad_s", "fabric", stages=["distill_s"], show_progress=False)
    kept = torch.load(stage_dir(config, SHARED, "distill_s") / BEST_MODEL, weights_only=True)
    assert all(torch.equal(kept[k], v) for k, v in teacher.state_dict().items())

    torch.save(PDN("medium").state_dict(), tmp_path / "teacher_m.pth")
    wrong = efficientad_config({"distillation": {"teacher_weights": str(tmp_path / "teacher_m.pth")},
                                "run.out_dir": str(tmp_path / "other")})
    with pytest.raises(CheckpointError, match="teacher_m.pth: not a PDN-S teacher state dict"):
        train(wrong, "efficientad_s", "fabric", stages=["distill_s"], show_progress=False)
    torch.save(PDN("small"), tmp_path / "pickled.pth")  # a whole module, as some repositories ship them
    pickled = efficientad_config({"distillation": {"teacher_weights": str(tmp_path / "pickled.pth")},
                                  "run.out_dir": str(tmp_path / "third")})
    with pytest.raises(CheckpointError, match="pickled.pth is not a state dict that loads with weights_only"):
        train(pickled, "efficientad_s", "fabric", stages=["distill_s"], show_progress=False)


def test_concurrent_jobs_distill_the_shared_teacher_once(efficientad_config, tmp_path):
    import yaml

    config = efficientad_config()
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    command = [sys.executable, "-m", "effad_hpc", "train", "--config", str(path), "--model", "efficientad_s",
               "--stage", "distill_s", "--quiet"]
    jobs = [subprocess.Popen([*command, "--category", category], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for category in ("fabric", "fabric")]
    outputs = [job.communicate(timeout=600) for job in jobs]
    assert all(job.returncode == 0 for job in jobs), outputs
    record = read_record(stage_dir(config, SHARED, "distill_s"))
    # the job that waited on the lock found the stage complete and reports the same record
    assert all(f"{record.train_seconds:.1f} s" in out for out, _ in outputs), outputs


def test_efficientad_s_distills_trains_and_separates_defects(efficientad_config):
    config = efficientad_config({
        "efficientad": {"image_size": 128, "steps": 150, "checkpoint_every": 50},
        "evaluation.write_overlays": False})
    records = train(config, "efficientad_s", "fabric", show_progress=False)
    assert [r.stage for r in records] == ["distill_s", "efficientad_s"]
    assert records[1].final_epoch == 150
    log = read_log(stage_dir(config, "fabric", "efficientad_s"))
    assert [int(row["step"]) for row in log] == [50, 100, 150]
    # lr x0.1 after 95 % of the steps: the learning rate logged after step 150 is the dropped one
    assert [float(row["lr"]) for row in log] == pytest.approx([1e-4, 1e-4, 1e-5])
    metrics = evaluate_category(config, "efficientad_s", "fabric", show_progress=False)["metrics"]
    assert metrics["image_auroc"] >= 0.9 and metrics["pixel_auroc"] >= 0.9, metrics


def test_penalty_images_add_the_penalty_loss(efficientad_config, synthetic_ad):
    config = efficientad_config({"efficientad": {"image_size": 64, "steps": 2, "checkpoint_every": 2,
                                                 "penalty_images": str(synthetic_ad / "washer" / "train")}})
    train(config, "efficientad_s", "fabric", show_progress=False)
    (row,) = read_log(stage_dir(config, "fabric", "efficientad_s"))
    assert float(row["train_penalty"]) > 0
    assert float(row["train_total"]) == pytest.approx(sum(float(row[f"train_{part}"])
                                                          for part in ("st", "ae", "stae", "penalty")), rel=1e-5)
