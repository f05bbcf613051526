"""Training as the papers do it: one ImageNet folder for distillation and penalties, a penalty
that leaves batch norm's running statistics alone, and AST's student on its own schedule."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from effad_hpc.config import load_config, load_resolved_config, parse_config, write_resolved_config
from effad_hpc.errors import ConfigError
from effad_hpc.models import build_model
from effad_hpc.training import read_log, stage_dir, train
from effad_hpc.training.registry import stage_key
from effad_hpc.training.sources import penalty_folder

from tests.conftest import REPO, tiny_config_dict

TINY_TEACHER = {"pos_enc_channels": 4, "coupling_blocks": 1, "hidden_channels": 8, "kernel_sizes": [3], "clamp": 3.0}
SMALL_NETS = {
    "teacher.hidden_channels": 32, "teacher.epochs": 2, "teacher.batch_size": 4,
    "student.hidden_channels": 16, "student.residual_blocks": 1, "student.epochs": 1, "student.batch_size": 4,
    "ast_student.hidden_channels": 32, "ast_student.residual_blocks": 1, "ast_student.epochs": 3,
    "ast_student.batch_size": 4,
}


def _batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _running_statistics(module: nn.Module) -> list[torch.Tensor]:
    return [buffer.clone() for norm in _batch_norms(module)
            for buffer in (norm.running_mean, norm.running_var, norm.num_batches_tracked)]


# --- one ImageNet folder -------------------------------------------------------------------


def test_imagenet_fills_the_distillation_and_penalty_folders_unless_a_section_names_its_own(tmp_path):
    raw = tiny_config_dict(tmp_path / "data", tmp_path / "run") | {
        "imagenet": str(tmp_path / "imagenet"), "distillation": {"pattern": "*/*"},
        "efficientad": {"penalty_images": str(tmp_path / "other")}}
    config = parse_config(raw, "test")
    assert config.imagenet == tmp_path / "imagenet"
    assert config.distillation.images == config.student.penalty_images == config.imagenet
    assert config.efficientad.penalty_images == tmp_path / "other"
    write_resolved_config(config, tmp_path)
    assert load_resolved_config(tmp_path) == config

    without_distillation = parse_config(tiny_config_dict(tmp_path / "data", tmp_path / "run")
                                        | {"imagenet": str(tmp_path / "imagenet")}, "test")
    assert without_distillation.distillation is None  # no teacher to distill: its backbone is not fetched


@pytest.mark.parametrize("name", ["mvtec_ad.yaml", "mvtec_loco.yaml"])
def test_thesis_configs_name_one_imagenet_folder_for_distillation_and_both_penalties(name):
    config = load_config(REPO / "configs" / name)
    assert config.imagenet == Path.cwd() / "data/imagenet/train"  # a placeholder, as data.root
    assert config.distillation.images == config.imagenet
    assert config.student.penalty_folder() == config.efficientad.penalty_folder() == config.imagenet


def test_a_missing_penalty_folder_says_how_to_switch_the_penalty_off(tmp_path):
    raw = tiny_config_dict(tmp_path / "data", tmp_path / "run") | {"imagenet": str(tmp_path / "missing")}
    config = parse_config(raw, "test")
    for section in ("student", "efficientad"):
        with pytest.raises(ConfigError, match=rf"^imagenet: {tmp_path / 'missing'} is not a folder: set it to an "
                                              r"ImageNet-like image folder, or switch the penalty off with "
                                              r"student.penalty=false efficientad.penalty=false$"):
            penalty_folder(config, section)
    own = parse_config(raw | {"student": {"penalty_images": str(tmp_path / "own")}}, "test")
    with pytest.raises(ConfigError, match=r"^student.penalty_images: .* switch the penalty off with student.penalty"
                                          r"=false$"):
        penalty_folder(own, "student")
    switched_off = parse_config(raw | {"student": {"penalty": False}, "efficientad": {"penalty": False}}, "test")
    assert penalty_folder(switched_off, "student") is None and penalty_folder(switched_off, "efficientad") is None
    (tmp_path / "imagenet").mkdir()
    found = parse_config(raw | {"imagenet": str(tmp_path / "imagenet")}, "test")
    assert penalty_folder(found, "efficientad") == (tmp_path / "imagenet", "imagenet")


def test_a_switched_off_penalty_keeps_the_student_key_whatever_the_folder(make_config, tmp_path):
    def student_key(changes: dict) -> str:
        _, config = make_config(changes)
        return stage_key(config, "student_ae", "fabric")

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    off = {"student.penalty": False}
    assert student_key(off | {"imagenet": str(tmp_path / "a")}) == student_key(off | {"imagenet": str(tmp_path / "b")})
    assert student_key({"imagenet": str(tmp_path / "a")}) != student_key(off | {"imagenet": str(tmp_path / "a")})


# --- the penalty and batch norm ------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["ast", "efficientad_ast"])
def test_the_penalty_batch_moves_no_batch_norm_statistics_but_gets_its_gradient(model_name):
    torch.manual_seed(0)
    extra = {"ae_channels": 8} if model_name == "efficientad_ast" else {}
    model = build_model(model_name, feature_channels=6, map_size=8, teacher=TINY_TEACHER, hidden_channels=16,
                        residual_blocks=2, **extra).train()
    features, penalty_features = torch.randn(4, 6, 8, 8), 3 + 2 * torch.randn(4, 6, 8, 8)
    without_penalty = copy.deepcopy(model)
    before = _running_statistics(model)

    parts = model.losses(features, penalty_features)
    without_penalty.losses(features)
    after = _running_statistics(model)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))  # the category batch counts
    for ours, theirs in zip(after, _running_statistics(without_penalty), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)  # the penalty batch does not

    # Normalized by its own batch statistics, as a plain training-mode forward would do.
    plain = copy.deepcopy(without_penalty.student)(model.teacher.with_positions(penalty_features))
    torch.testing.assert_close(parts["penalty"], plain[:, :6].pow(2).mean())
    parameters = list(model.student.parameters())
    gradients = torch.autograd.grad(parts["penalty"], parameters)
    assert all(gradient.abs().sum() > 0 for gradient in gradients)
    assert all(norm.track_running_stats for norm in _batch_norms(model))  # restored after the penalty


@pytest.mark.parametrize("model_name", ["efficientad_s", "efficientad_m"])
def test_efficientad_students_have_no_batch_norm_for_the_penalty_to_move(model_name):
    model = build_model(model_name, image_size=64)
    assert _batch_norms(model.student) == []


# --- AST's own schedule --------------------------------------------------------------------


def test_ast_student_key_follows_ast_student_and_not_student(make_config):
    def keys(changes: dict) -> dict[str, str]:
        _, config = make_config(SMALL_NETS | changes)
        return {name: stage_key(config, name, "fabric") for name in ("teacher", "student", "student_ae")}

    plain = keys({})
    thesis_student = keys({"student.epochs": 7})
    ast_student = keys({"ast_student.epochs": 7})
    assert thesis_student["student"] == plain["student"] and thesis_student["student_ae"] != plain["student_ae"]
    assert ast_student["student"] != plain["student"] and ast_student["student_ae"] == plain["student_ae"]
    assert plain["teacher"] == thesis_student["teacher"] == ast_student["teacher"]  # one teacher for both


def test_ast_defaults_are_its_papers_and_the_demo_keeps_its_small_student():
    config = load_config(REPO / "configs" / "mvtec_ad.yaml")
    ast = config.ast_student
    assert (ast.epochs, ast.patience_fraction, ast.batch_size, ast.lr, ast.adam_eps, ast.weight_decay) == (
        240, None, 8, 2e-4, 1e-8, 1e-5)
    assert (ast.hidden_channels, ast.residual_blocks) == (1024, 4)
    assert (config.student.epochs, config.student.patience_fraction) == (100, 0.1)
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert (demo.ast_student.hidden_channels, demo.ast_student.epochs, demo.ast_student.batch_size) == (128, 20, 8)


def test_a_tiny_ast_run_trains_every_ast_student_epoch(make_config, tmp_path):
    # student.* asks for 1 epoch with early stopping: AST must not read it.
    _, config = make_config(SMALL_NETS | {"student.patience_fraction": 0.5})
    teacher, student = train(config, "ast", "fabric", show_progress=False)
    assert student.final_epoch == config.ast_student.epochs == 3 and not student.stopped_early
    assert [int(row["epoch"]) for row in read_log(stage_dir(config, "fabric", "student"))] == [1, 2, 3]
    weights = torch.load(stage_dir(config, "fabric", "student") / "model.pt", weights_only=True)
    assert weights["student.0.weight"].shape[0] == config.ast_student.hidden_channels

    # EfficientAD-AST on the same teacher, with a placeholder imagenet that is not there.
    _, missing = make_config(SMALL_NETS | {"imagenet": str(tmp_path / "no_imagenet")})
    with pytest.raises(ConfigError, match="imagenet: .* switch the penalty off with student.penalty=false"):
        train(missing, "efficientad_ast", "fabric", show_progress=False)
    assert stage_key(missing, "teacher", "fabric") == teacher.key
