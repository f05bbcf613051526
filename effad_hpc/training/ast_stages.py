"""Stages of AST and EfficientAD-AST: the flow teacher, then the AST student or the
EfficientAD-AST student + autoencoder, which read the teacher's best model."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from effad_hpc.config import PAPER_METHOD, VALIDATION_LOSS, ASTStudentConfig, ExperimentConfig, Section
from effad_hpc.data.fingerprint import folder_fingerprint
from effad_hpc.errors import CheckpointError
from effad_hpc.models import AST, ASTTeacher, EfficientADAST, build_model
from effad_hpc.models.map_normalization import quantiles_of_maps
from effad_hpc.training.artifacts import BEST_MODEL, StageRecord, completed_record, load_state
from effad_hpc.training.loop import StageRun, fit
from effad_hpc.training.registry import (
    Budget,
    ModelRecipe,
    Stage,
    completed_stage,
    recipe,
    register_recipe,
    register_stage,
    stage_folder,
    stage_key,
)
from effad_hpc.training.sources import (
    BackboneFeatures,
    ComputedFeatures,
    FeatureSource,
    PenaltyImages,
    open_source,
    penalty_folder,
)
from effad_hpc.training.statistics import channel_statistics
from effad_hpc.training.targets import TargetedBatch, TeacherTargets
from effad_hpc.utils.device import autocast, resolve_device


def teacher_kwargs(config: ExperimentConfig) -> dict:
    t = config.teacher
    return {"pos_enc_channels": t.pos_enc_channels, "coupling_blocks": t.coupling_blocks,
            "hidden_channels": t.hidden_channels, "kernel_sizes": list(t.kernel_sizes), "clamp": t.clamp}


def _residual_student_kwargs(config: ExperimentConfig, student: ASTStudentConfig, channels: int,
                             map_size: int) -> dict:
    return {"feature_channels": channels, "map_size": map_size, "teacher": teacher_kwargs(config),
            "hidden_channels": student.hidden_channels, "residual_blocks": student.residual_blocks,
            "loss_percentile": student.loss_percentile}


def _ast_kwargs(config: ExperimentConfig, channels: int, map_size: int) -> dict:
    return _residual_student_kwargs(config, config.ast_student, channels, map_size)


def _efficientad_ast_kwargs(config: ExperimentConfig, channels: int, map_size: int) -> dict:
    s = config.student
    return _residual_student_kwargs(config, s, channels, map_size) | {
        "ae_channels": s.ae_channels, "ae_upsampling_stages": s.ae_upsampling_stages, "ae_dropout": s.ae_dropout,
        "map_normalization": s.map_normalization == "quantile", "smoothing_sigma": s.smoothing_sigma,
        "ae_target": s.ae_target}


def _training_statistics(source: FeatureSource, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the source's training features."""
    return channel_statistics(source.batches("train", range(source.size("train")), batch_size))


def train_teacher(config: ExperimentConfig, category: str, show_progress: bool = True) -> StageRecord:
    folder, key = stage_folder(config, category, "teacher"), stage_key(config, "teacher", category)
    if (done := completed_record(folder, key, verify=True)) is not None:
        return done
    device = resolve_device(config.run.device, config.run.precision)
    source = open_source(config, category, config.teacher.feature_source, device,
                         preparation=config.teacher.feature_grid)
    noise_std = None
    if config.teacher.input_noise > 0:  # before seeding: the flow starts from the weights it has without noise
        _, channel_std = _training_statistics(source, config.teacher.batch_size)
        noise_std = config.teacher.input_noise * channel_std.to(device)
    torch.manual_seed(config.seed)
    teacher = ASTTeacher(source.channels, source.map_size, **teacher_kwargs(config)).to(device)

    def objective(features, _penalty):
        if noise_std is not None and teacher.training:  # validation passes score the features as they are
            features = features + noise_std * torch.randn_like(features)
        nll = teacher.nll(features)
        return {"nll": nll, "total": nll}

    return fit(StageRun("teacher", category, folder, key, config.teacher, teacher, objective, source, config.seed,
                        config.run.precision), show_progress)


def _train_student(stage: str, model_name: str, config: ExperimentConfig, category: str,
                   show_progress: bool) -> StageRecord:
    folder, key = stage_folder(config, category, stage), stage_key(config, stage, category)
    if (done := completed_record(folder, key, verify=True)) is not None:
        return done
    teacher_path = stage_folder(config, category, "teacher") / BEST_MODEL
    if completed_stage(config, "teacher", category, verify=True) is None:
        raise CheckpointError(f"{teacher_path.parent}: no trained teacher for this config; "
                              f"run `effad-hpc train --stage teacher --category {category}` first")
    # AST trains by its paper (no penalty), EfficientAD-AST by the thesis: each has its own section.
    settings = config.ast_student if model_name == "ast" else config.student
    found = None if model_name == "ast" else penalty_folder(config, "student")
    device = resolve_device(config.run.device, config.run.precision)
    source = open_source(config, category, settings.feature_source, device,
                         preparation=config.teacher.feature_grid)
    feature_statistics = None
    if model_name == "efficientad_ast" and config.student.ae_target == "features":
        # before seeding, as the teacher's: the student starts from the weights it has with z as the target
        feature_statistics = _training_statistics(source, settings.batch_size)
    torch.manual_seed(config.seed)
    model = recipe(model_name).build(config, source.channels, source.map_size, {})
    model.teacher.load_state_dict(load_state(teacher_path))
    if feature_statistics is not None:
        model.feature_mean.copy_(feature_statistics[0])
        model.feature_std.copy_(feature_statistics[1])
    model.to(device)
    penalty = None
    if found is not None:
        compute = source.compute if isinstance(source, ComputedFeatures) else \
            BackboneFeatures(config, device, preparation=config.teacher.feature_grid)
        penalty = PenaltyImages(*found, config.data.image_size, compute)
    finish = None
    if model_name == "efficientad_ast" and config.student.map_normalization == "quantile":
        def finish() -> None:
            model.map_quantiles.copy_(validation_quantiles(model, source, settings.batch_size, config))
    targets = None
    if settings.teacher_targets == "cached":
        targets = TeacherTargets(folder, key, source, model.teacher, settings.batch_size)
    record = fit(StageRun(stage, category, folder, key, settings, model,
                          model.losses if targets is None else _with_targets(model), targets or source, config.seed,
                          config.run.precision, penalty, finish, settings.select_by), show_progress)
    if targets is not None:
        targets.remove()
    return record


def _with_targets(model: AST | EfficientADAST):
    """The student's losses on a :class:`TargetedBatch`: the teacher's z comes with the features."""
    def objective(batch: TargetedBatch, penalty: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return model.losses(batch.features, penalty, batch.teacher_z)

    return objective


@torch.no_grad()
def validation_quantiles(model: EfficientADAST, source: FeatureSource, batch_size: int,
                         config: ExperimentConfig) -> torch.Tensor:
    """The hybrid's map quantiles over the validation images, in the precision inference uses."""
    def raw_maps() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for features in source.batches("validation", range(source.size("validation")), batch_size):
            with autocast(features.device, config.run.precision):
                yield model.raw_maps(features)

    return quantiles_of_maps(raw_maps(), config.student.map_quantiles)


def train_student(config: ExperimentConfig, category: str, show_progress: bool = True) -> StageRecord:
    return _train_student("student", "ast", config, category, show_progress)


def train_student_ae(config: ExperimentConfig, category: str, show_progress: bool = True) -> StageRecord:
    return _train_student("student_ae", "efficientad_ast", config, category, show_progress)


def _settings(section: Section, added_later: dict[str, object], exclude: tuple[str, ...] = ()) -> dict:
    """A config section's settings for a stage key, less ``exclude`` and each setting of
    ``added_later`` ({name: the value that is the method from before the setting existed}) that
    has that value: stages trained before it existed keep their keys and stay valid."""
    unchanged = {name for name, before in added_later.items() if getattr(section, name) == before}
    return section.model_dump(mode="json", exclude=unchanged | set(exclude))


def _teacher_settings(config: ExperimentConfig) -> dict:
    return _settings(config.teacher, {"input_noise": 0.0})


def _ast_student_settings(config: ExperimentConfig) -> dict:
    return {"model": "ast", "ast_student": config.ast_student.model_dump(mode="json")}


def _efficientad_ast_student_settings(config: ExperimentConfig) -> dict:
    # The penalty images count by their content, not by where the folder is mounted.
    penalty = config.student.penalty_folder()
    return {"model": "efficientad_ast",
            "student": _settings(config.student, {"ae_target": "teacher"}, exclude=("penalty_images",)),
            "penalty_fingerprint": folder_fingerprint(penalty) if penalty else None}


# The papers' lengths: AST trains teacher and student 240 epochs; the thesis the EfficientAD-AST
# student 100 (both with early stopping where they configure it); ``min_samples`` can raise them.
register_stage(Stage("teacher", train_teacher, _teacher_settings,
                     uses_store=lambda config: config.teacher.feature_source == "stored",
                     budget=Budget(lambda config, images: config.teacher.epochs_for(images), 240)))
register_stage(Stage("student", train_student, _ast_student_settings, needs=("teacher",),
                     uses_store=lambda config: config.ast_student.feature_source == "stored",
                     budget=Budget(lambda config, images: config.ast_student.epochs_for(images), 240)))
register_stage(Stage("student_ae", train_student_ae, _efficientad_ast_student_settings, needs=("teacher",),
                     uses_store=lambda config: config.student.feature_source == "stored",
                     budget=Budget(lambda config, images: config.student.epochs_for(images), 100)))


def _builder(model_name: str, kwargs: Callable[[ExperimentConfig, int, int], dict]):
    def build(config: ExperimentConfig, channels: int, map_size: int, _state: dict) -> torch.nn.Module:
        return build_model(model_name, **kwargs(config, channels, map_size))

    return build


def _variant(config: ExperimentConfig, hybrid: bool) -> str:
    """``paper`` (the thesis's method for EfficientAD-AST), or the switches that change it."""
    switches = []
    if hybrid and config.student.map_normalization == "quantile":
        switches.append("quantile-normalised maps")
    if config.teacher.feature_grid != "coarsest":
        switches.append(f"{config.teacher.feature_grid} grid")
    if config.teacher.pos_enc_channels == 0:
        switches.append("position-free")
    if config.teacher.input_noise > 0:
        switches.append(f"teacher input noise {config.teacher.input_noise:g}")
    if hybrid and config.student.ae_target == "features":
        switches.append("autoencoder on features")
    if hybrid and config.student.smoothing_sigma > 0:
        switches.append(f"smoothed maps (sigma {config.student.smoothing_sigma:g})")
    student = config.student if hybrid else config.ast_student
    if student.select_by != VALIDATION_LOSS:
        switches.append(f"selected by {student.select_by}")
    return " + ".join(switches) or PAPER_METHOD


register_recipe(ModelRecipe("ast", ("teacher", "student"), _builder("ast", _ast_kwargs),
                            variant=lambda config: _variant(config, hybrid=False)))
register_recipe(ModelRecipe("efficientad_ast", ("teacher", "student_ae"),
                            _builder("efficientad_ast", _efficientad_ast_kwargs),
                            variant=lambda config: _variant(config, hybrid=True)))
