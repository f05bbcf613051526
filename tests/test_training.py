"""Training stages on tiny synthetic data: losses fall, checkpoints resume exactly, stored and
on-the-fly features agree, and a trained model separates defective from good images."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from sklearn.metrics import roc_auc_score

from effad_hpc.data import load_category
from effad_hpc.errors import CheckpointError, ConfigError, DataError, TrainingError
from effad_hpc.training import load_detector, predict, read_log, read_record, recipe, stage_dir, train
from effad_hpc.training.artifacts import BEST_MODEL, LAST_CHECKPOINT, load_state
from effad_hpc.training.loop import StageRun, _validate
from effad_hpc.training.sources import StoredFeatures

from tests.conftest import REPO, tiny_config

SMALL_NETS = {
    "teacher.hidden_channels": 32, "teacher.epochs": 4, "teacher.batch_size": 4,
    "student.hidden_channels": 32, "student.residual_blocks": 1, "student.epochs": 4, "student.batch_size": 4,
    "student.patience_fraction": None,
    "ast_student.hidden_channels": 32, "ast_student.residual_blocks": 1, "ast_student.epochs": 4,
    "ast_student.batch_size": 4,
}


def _states_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=atol, msg=lambda m, n=name: f"{n}: {m}")


def test_teacher_nll_and_student_ae_validation_decrease(make_config):
    _, config = make_config(SMALL_NETS | {"teacher.epochs": 6, "student.epochs": 6})
    records = train(config, "efficientad_ast", "fabric", show_progress=False)
    assert [r.stage for r in records] == ["teacher", "student_ae"]
    teacher_log = read_log(stage_dir(config, "fabric", "teacher"))
    assert len(teacher_log) == 6
    assert float(teacher_log[-1]["train_nll"]) < float(teacher_log[0]["train_nll"])
    assert float(teacher_log[-1]["validation"]) < float(teacher_log[0]["validation"])
    student_log = read_log(stage_dir(config, "fabric", "student_ae"))
    assert {"train_st", "train_ae", "train_stae", "train_total", "validation"} <= set(student_log[0])
    assert min(float(row["validation"]) for row in student_log[1:]) < float(student_log[0]["validation"])
    for record in records:
        folder = stage_dir(config, "fabric", record.stage)
        assert not (folder / LAST_CHECKPOINT).exists()  # complete: the resume state is gone
        assert read_record(folder) == record
        state = torch.load(folder / BEST_MODEL, weights_only=True)
        assert all(isinstance(value, torch.Tensor) for value in state.values())


def test_rerun_skips_complete_stages_and_a_changed_input_retrains_downstream(make_config):
    _, config = make_config(SMALL_NETS)
    first = train(config, "efficientad_ast", "fabric", show_progress=False)
    assert train(config, "efficientad_ast", "fabric", show_progress=False) == first
    _, changed = make_config(SMALL_NETS | {"student.lr": 1e-3})
    teacher, student = train(changed, "efficientad_ast", "fabric", show_progress=False)
    assert teacher == first[0]
    assert student.key != first[1].key and student.finished_at >= first[1].finished_at


def test_moving_the_weights_cache_keeps_every_stage_key(synthetic_fabric, tmp_path):
    from effad_hpc.features import feature_key
    from effad_hpc.training.registry import stage_key

    def keys(changes: dict) -> dict[str, str]:
        config = tiny_config(synthetic_fabric, tmp_path, {
            "patchcore": {"backbone": {"name": "wide_resnet50_2", "layers": ["layer2"]},
                          "feature_source": "on_the_fly"},
            "distillation": {"images": str(synthetic_fabric)}} | changes)
        return {"features": feature_key(config)} | {name: stage_key(config, name, "fabric")
                                                      for name in ("teacher", "patchcore", "padim", "distill_s")}

    plain = keys({})
    assert keys({"backbone.cache_dir": str(tmp_path / "cache"),
                 "distillation.backbone.cache_dir": str(tmp_path / "other")}) == plain
    changed = keys({"patchcore.backbone.layers": ["layer3"], "backbone.layers": ["blocks.4"],
                    "distillation.backbone.layers": ["layer3"]})
    assert all(changed[name] != plain[name] for name in plain)


def test_early_stopping_keeps_the_best_validation_model(make_config):
    # A learning rate far too high makes the validation loss rise again: early stopping must end
    # the stage after the patience and keep the best epoch's weights.
    _, config = make_config(SMALL_NETS | {"ast_student.epochs": 20, "ast_student.patience_fraction": 0.1,
                                          "ast_student.lr": 0.05})
    _, record = train(config, "ast", "fabric", show_progress=False)
    log = read_log(stage_dir(config, "fabric", "student"))
    values = [float(row["validation"]) for row in log]
    assert record.stopped_early and record.final_epoch < 20
    assert record.final_epoch - record.best_epoch == 2  # ceil(0.1 * 20) epochs without improvement
    assert min(values) == pytest.approx(record.best_validation) == values[record.best_epoch - 1]

    source = StoredFeatures(config, "fabric", torch.device("cpu"))
    model = recipe("ast").build(config, source.channels, source.map_size, {})
    model.load_state_dict(load_state(stage_dir(config, "fabric", "student") / BEST_MODEL))
    rerun = StageRun("student", "fabric", stage_dir(config, "fabric", "student"), record.key, config.ast_student, model,
                     model.losses, source, config.seed)
    assert _validate(rerun) == pytest.approx(record.best_validation, rel=1e-5)


def test_min_samples_raises_the_epochs_of_a_small_category_and_its_budget_says_so(make_config):
    """``min_samples``: a category of n training images trains ceil(min_samples / n) epochs where
    ``epochs`` would give fewer samples; early stopping's patience is a fraction of those; a
    category large enough keeps ``epochs``. The metrics' budget reports the raised length."""
    from effad_hpc.evaluation.evaluate import training_budget

    _, config = make_config(SMALL_NETS | {"teacher.epochs": 2, "teacher.min_samples": 50})
    record = train(config, "efficientad_ast", "fabric", ["teacher"], show_progress=False)[0]
    images = StoredFeatures(config, "fabric", torch.device("cpu")).size("train")
    epochs = -(-50 // images)
    assert epochs > 2 and record.final_epoch == epochs
    assert len(read_log(stage_dir(config, "fabric", "teacher"))) == epochs
    assert training_budget(config, "efficientad_ast", images)["teacher"]["trained"] == epochs
    assert config.teacher.epochs_for(50) == 2 and config.student.epochs_for(images) == config.student.epochs
    assert config.student.model_copy(update={"min_samples": 10 * images, "epochs": 4}).epochs_for(images) == 10


def test_killed_training_resumes_to_the_uninterrupted_result(make_config, tmp_path):
    nets = SMALL_NETS | {"student.epochs": 30, "student.hidden_channels": 64, "student.residual_blocks": 2}
    path, config = make_config(nets)
    train(config, "efficientad_ast", "fabric", ["teacher"], show_progress=False)
    folder = stage_dir(config, "fabric", "student_ae")
    command = [sys.executable, "-m", "effad_hpc", "train", "--config", str(path), "--model", "efficientad_ast",
               "--category", "fabric", "--stage", "student_ae", "--quiet"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not ((folder / "log.csv").exists() and len(read_log(folder)) >= 3):
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    interrupted_at = load_state(folder / LAST_CHECKPOINT)["epoch"]
    assert 2 <= interrupted_at < 30 and read_record(folder) is None  # killed mid-stage

    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    record = read_record(folder)
    assert record.final_epoch == 30
    log = read_log(folder)
    assert [int(row["epoch"]) for row in log] == list(range(1, 31))  # no repeated or lost rows

    _, uninterrupted = make_config(nets, overrides=(f"run.out_dir={tmp_path / 'uninterrupted'}",))
    _, reference = train(uninterrupted, "efficientad_ast", "fabric", show_progress=False)
    assert reference.best_epoch == record.best_epoch
    assert reference.best_validation == pytest.approx(record.best_validation, rel=1e-5)
    _states_close(load_state(folder / BEST_MODEL),
                  load_state(stage_dir(uninterrupted, "fabric", "student_ae") / BEST_MODEL), atol=1e-5)
    reference_log = read_log(stage_dir(uninterrupted, "fabric", "student_ae"))
    for ours, theirs in zip(log, reference_log, strict=True):
        assert float(ours["train_total"]) == pytest.approx(float(theirs["train_total"]), rel=1e-5)


def test_stored_and_on_the_fly_features_train_the_same_model(make_config, tmp_path):
    _, stored = make_config(SMALL_NETS)
    _, computed = make_config(SMALL_NETS, overrides=(
        "teacher.feature_source=on_the_fly", "student.feature_source=on_the_fly",
        f"run.out_dir={tmp_path / 'on_the_fly'}"))
    for config in (stored, computed):
        train(config, "efficientad_ast", "fabric", show_progress=False)
    assert not (computed.run.out_dir / "features").exists()  # nothing was read from a store
    for stage in ("teacher", "student_ae"):
        ours, theirs = (read_log(stage_dir(c, "fabric", stage)) for c in (stored, computed))
        for a, b in zip(ours, theirs, strict=True):
            assert float(a["validation"]) == pytest.approx(float(b["validation"]), rel=1e-4)
        _states_close(load_state(stage_dir(stored, "fabric", stage) / BEST_MODEL),
                      load_state(stage_dir(computed, "fabric", stage) / BEST_MODEL), atol=1e-4)


def test_penalty_images_add_a_penalty_loss(make_config, synthetic_ad, tmp_path):
    _, config = make_config(SMALL_NETS | {"student.epochs": 2,
                                          "student.penalty_images": str(synthetic_ad / "grid" / "train")})
    train(config, "efficientad_ast", "fabric", show_progress=False)
    log = read_log(stage_dir(config, "fabric", "student_ae"))
    assert all(float(row["train_penalty"]) > 0 for row in log)
    (tmp_path / "empty").mkdir()
    _, empty = make_config(SMALL_NETS | {"student.penalty_images": str(tmp_path / "empty")})
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'}: no images"):
        train(empty, "efficientad_ast", "fabric", show_progress=False)


def test_bad_checkpoints_and_missing_teachers_are_named(make_config):
    _, config = make_config(SMALL_NETS)
    with pytest.raises(CheckpointError, match="no trained teacher"):
        train(config, "ast", "fabric", ["student"], show_progress=False)
    folder = stage_dir(config, "fabric", "teacher")
    folder.mkdir(parents=True)
    (folder / LAST_CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"{folder / LAST_CHECKPOINT}: not a readable checkpoint"):
        train(config, "ast", "fabric", show_progress=False)
    with pytest.raises(ConfigError, match="'nope' is not known"):
        train(config, "nope", "fabric")
    with pytest.raises(ConfigError, match="--stage 'student_ae': ast has the stages teacher, student"):
        train(config, "ast", "fabric", ["student_ae"])


def test_trained_model_separates_defective_from_good_images(make_config, synthetic_fabric):
    _, config = make_config({
        "data.image_size": 128, "backbone.layers": ["blocks.4"],
        "teacher.hidden_channels": 32, "teacher.epochs": 15, "teacher.batch_size": 4,
        "student.hidden_channels": 32, "student.epochs": 15, "student.batch_size": 4,
    }, data_root=synthetic_fabric)
    train(config, "efficientad_ast", "fabric", show_progress=False)
    samples = load_category(config, "fabric").samples("test")
    detector = load_detector(config, "efficientad_ast", "fabric", torch.device("cpu"))
    scores = {}
    for indices, output in predict(detector, samples, config, torch.device("cpu")):
        assert output["maps"]["combined"].shape[1:] == (128, 128)
        scores.update(zip(indices, output["score"].tolist()))
    labels = [sample.label for sample in samples]
    assert 0 < sum(labels) < len(labels)
    assert roc_auc_score(labels, [scores[i] for i in range(len(samples))]) >= 0.9


def test_a_position_free_hybrid_trains_and_loads_under_its_variant(make_config):
    _, config = make_config(SMALL_NETS | {"models": ["efficientad_ast"], "data.categories": ["fabric"],
                                          "teacher.pos_enc_channels": 0})
    train(config, "efficientad_ast", "fabric", show_progress=False)
    detector = load_detector(config, "efficientad_ast", "fabric", torch.device("cpu"))
    assert detector.model.teacher.positions.shape[0] == 0
    assert detector.model.student[0].in_channels == detector.model.feature_channels  # the features alone
    maps = detector.grid_maps(torch.rand(2, 3, 64, 64))
    assert all(torch.isfinite(m).all() for m in maps.values())
    assert recipe("efficientad_ast").variant(config) == "position-free"


def test_a_teacher_trained_on_noisy_features_is_validated_on_clean_ones(make_config):
    """``teacher.input_noise`` perturbs the flow's training batches only: the validation NLL the
    stage logs is that of model.pt on the validation features as stored."""
    from effad_hpc.models import ASTTeacher
    from effad_hpc.training.ast_stages import teacher_kwargs
    from effad_hpc.training.registry import stage_folder, stage_key

    changes = SMALL_NETS | {"models": ["efficientad_ast"], "data.categories": ["fabric"], "teacher.epochs": 3}
    _, clean = make_config(changes)
    _, noisy = make_config(changes | {"teacher.input_noise": 0.5})
    assert stage_key(clean, "teacher", "fabric") != stage_key(noisy, "teacher", "fabric")
    record = train(noisy, "efficientad_ast", "fabric", stages=["teacher"], show_progress=False)[0]
    source = StoredFeatures(noisy, "fabric", torch.device("cpu"))
    teacher = ASTTeacher(source.channels, source.map_size, **teacher_kwargs(noisy))
    teacher.load_state_dict(load_state(stage_folder(noisy, "fabric", "teacher") / BEST_MODEL))
    teacher.eval()
    with torch.no_grad():
        losses = [(teacher.nll(batch).item(), len(batch))
                  for batch in source.batches("validation", range(source.size("validation")), 4)]
    mean_nll = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
    assert mean_nll == pytest.approx(record.best_validation, rel=1e-5)
    # The same run folder: the teacher without noise replaces it, and trains another flow.
    clean_record = train(clean, "efficientad_ast", "fabric", stages=["teacher"], show_progress=False)[0]
    assert record.best_validation != pytest.approx(clean_record.best_validation, abs=1e-4)
    assert recipe("efficientad_ast").variant(noisy) == "teacher input noise 0.5"


def test_an_autoencoder_on_features_reconstructs_the_standardised_training_features(make_config):
    """``student.ae_target: features``: the autoencoder's target is the backbone's features
    standardised with the training features' channel statistics, which model.pt keeps; the
    default (the teacher's z) keeps the stage key it had before the setting existed."""
    from effad_hpc.training.ast_stages import _efficientad_ast_student_settings
    from effad_hpc.training.registry import stage_key
    from effad_hpc.training.statistics import channel_statistics

    changes = SMALL_NETS | {"models": ["efficientad_ast"], "data.categories": ["fabric"], "student.epochs": 3}
    _, on_z = make_config(changes)
    _, on_features = make_config(changes | {"student.ae_target": "features"})
    assert "ae_target" not in _efficientad_ast_student_settings(on_z)["student"]
    assert stage_key(on_z, "student_ae", "fabric") != stage_key(on_features, "student_ae", "fabric")
    train(on_features, "efficientad_ast", "fabric", show_progress=False)
    source = StoredFeatures(on_features, "fabric", torch.device("cpu"))
    mean, std = channel_statistics(source.batches("train", range(source.size("train")), 4))
    model = load_detector(on_features, "efficientad_ast", "fabric", torch.device("cpu")).model
    torch.testing.assert_close(model.feature_mean, mean)
    torch.testing.assert_close(model.feature_std, std)
    features = next(iter(source.batches("train", range(4), 4)))
    model.eval()
    with torch.no_grad():
        reconstruction = model.autoencoder(model.teacher.with_positions(features))
        loss = model.losses(features)["ae"]
    torch.testing.assert_close(loss, ((features - mean) / std - reconstruction).pow(2).mean())
    # Standardised features, not a whitened code of the flow: the loss is not the one against z.
    assert loss != pytest.approx((model.teacher_outputs(features) - reconstruction).pow(2).mean().item(), rel=1e-3)
    assert recipe("efficientad_ast").variant(on_features) == "autoencoder on features"


@pytest.mark.parametrize("feature_grid", ["finest", "patches"])
def test_finer_grids_and_map_normalisation_train_and_load(make_config, feature_grid):
    """teacher.feature_grid: finest (or patches, 3x3-averaged first) gives the stride-8 grid of two
    layers (4x the positions), and student.map_normalization: quantile stores the validation
    quantiles of the final model's maps."""
    _, config = make_config(SMALL_NETS | {"models": ["efficientad_ast"], "data.categories": ["fabric"],
                                          "teacher.feature_grid": feature_grid,
                                          "student.map_normalization": "quantile"})
    train(config, "efficientad_ast", "fabric", show_progress=False)
    detector = load_detector(config, "efficientad_ast", "fabric", torch.device("cpu"))
    images = torch.rand(2, 3, 64, 64)
    grid = detector.grid_maps(images)
    assert grid["combined"].shape[-2:] == (8, 8)  # blocks.2 at stride 8 of 64 px (blocks.4 alone: 4 x 4)
    quantiles = detector.model.map_quantiles
    assert torch.all(quantiles[:, 0] < quantiles[:, 1]) and not torch.equal(quantiles, torch.tensor([[0, 0.1]] * 2))
    assert recipe("efficientad_ast").variant(config) == f"quantile-normalised maps + {feature_grid} grid"
    source = StoredFeatures(config, "fabric", torch.device("cpu"), preparation=feature_grid)
    features = next(source.batches("validation", range(source.size("validation")), 64))
    st, ae = detector.model.raw_maps(features)
    assert quantiles[0, 1] == pytest.approx(torch.quantile(st.flatten(), 0.995).item(), rel=1e-5)
    assert quantiles[1, 0] == pytest.approx(torch.quantile(ae.flatten(), 0.9).item(), rel=1e-5)


def test_a_student_selected_by_the_synthetic_score_keeps_the_pass_with_the_best_score(make_config):
    """``student.select_by``: every validation pass is scored on the synthetic-anomaly set and the
    best score chooses model.pt (which scores the same when loaded), while early stopping still
    watches the validation loss and the scoring leaves the training as it is (the same losses as
    a run selected by the loss); without a scoring listener the stage stops with an error that
    names the setting."""
    from effad_hpc.evaluation.synthetic_validation import TrainingScorer, selecting, synthetic_validation_metrics

    settings = SMALL_NETS | {"student.epochs": 6, "student.patience_fraction": 0.25,
                             "student.map_normalization": "quantile"}
    _, plain = make_config(settings)
    train(plain, "efficientad_ast", "fabric", show_progress=False)
    plain_log = read_log(stage_dir(plain, "fabric", "student_ae"))
    _, config = make_config(settings | {"student.select_by": "val_synthetic_au_pro"})
    with pytest.raises(TrainingError, match="select_by is val_synthetic_au_pro"):
        train(config, "efficientad_ast", "fabric", show_progress=False)
    assert read_log(stage_dir(config, "fabric", "student_ae")) == plain_log  # stopped before an epoch
    with selecting(config):
        record = train(config, "efficientad_ast", "fabric", show_progress=False)[-1]
    log = read_log(stage_dir(config, "fabric", "student_ae"))
    scores = [float(row["val_synthetic_au_pro"]) for row in log]
    assert len(scores) == record.final_epoch and all(0 < s <= 1 for s in scores)
    assert record.selected_by == "val_synthetic_au_pro"
    assert record.best_selected == pytest.approx(max(scores)) == scores[record.best_epoch - 1]
    assert scores.index(max(scores)) == record.best_epoch - 1  # the first pass with the best score
    assert record.best_validation == pytest.approx(float(log[record.best_epoch - 1]["validation"]))
    losses = [float(row["validation"]) for row in log]
    assert losses == [float(row["validation"]) for row in plain_log]  # scoring drew no dropout mask
    # This seeded run's score is best at a pass where the loss is not: the two rules differ here.
    assert losses.index(min(losses)) != record.best_epoch - 1
    assert record.stopped_early == (record.final_epoch < 6)
    if record.stopped_early:  # ceil(0.25 * 6) passes without a lower loss, whatever the score did
        assert record.final_epoch - (losses.index(min(losses)) + 1) == 2

    detector = load_detector(config, "efficientad_ast", "fabric", torch.device("cpu"))
    inputs = TrainingScorer(config, "efficientad_ast", torch.device("cpu")).inputs("fabric", detector)
    loaded = synthetic_validation_metrics(detector, inputs, config, torch.device("cpu"))
    # The loaded detector runs in inference's layout: its maps differ in float rounding only.
    assert loaded["val_synthetic_au_pro"] == pytest.approx(record.best_selected, abs=1e-4)
    assert recipe("efficientad_ast").variant(config).endswith("selected by val_synthetic_au_pro")


def test_a_fitted_baseline_trains_inside_the_selection_scorer(make_config):
    """``effad-hpc train`` and the jobs train every model inside ``selecting``: a model without
    parameters (PatchCore's memory bank is a buffer) is announced to it like any other."""
    from effad_hpc.evaluation.synthetic_validation import selecting

    _, config = make_config()
    with selecting(config):
        (record,) = train(config, "patchcore", "fabric", show_progress=False)
    assert record.stage == "patchcore"
    assert load_detector(config, "patchcore", "fabric", torch.device("cpu")).model.bank.numel() > 0


def test_early_stopping_decides_at_validation_passes_only():
    """With ``validate_every`` > 1 a run resumed between two passes must decide as the
    uninterrupted run did at the last pass: epochs trained since then count for nothing."""
    from effad_hpc.training.loop import _stops_early

    passes = [{"epoch": 10, "validation": 1.0}, {"epoch": 20, "validation": 2.0}]
    between = [*passes, *({"epoch": e} for e in range(21, 28))]  # killed at epoch 27, before the pass at 30
    assert not _stops_early(between, patience=15)  # 20 - 10 < 15: the last pass decides, not epoch 27
    assert _stops_early(between, patience=10)
    assert not _stops_early([{"epoch": e} for e in range(1, 8)], patience=5)  # no pass yet: nothing to stop on
    assert not _stops_early(passes, patience=None)
