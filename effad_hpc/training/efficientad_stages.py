"""Stages of EfficientAD-S/M: the teacher distillation (shared by every category), then the
student + autoencoder of each category (SPEC section 1).

``distill_s`` / ``distill_m`` regress a padded PDN onto a pretrained backbone's mid-level patch
features (``distillation.backbone``) over an image folder, or take a user's PDN state dict
(``distillation.teacher_weights``). ``efficientad_s`` / ``efficientad_m`` normalize the
teacher's channels over the category's training images, train student and autoencoder for
``efficientad.steps`` steps and then set the map normalization from validation quantiles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from effad_hpc.config import DistillationConfig, ExperimentConfig, Precision
from effad_hpc.data import ImageDataset, load_category
from effad_hpc.data.fingerprint import folder_fingerprint
from effad_hpc.errors import CheckpointError, ConfigError, DataError
from effad_hpc.features.backbones import Backbone, build_backbone
from effad_hpc.features.weights import checkpoint_identity
from effad_hpc.models import PDN, build_model
from effad_hpc.models.efficientad import EfficientAD, normalize_images
from effad_hpc.models.map_normalization import quantiles_of_maps
from effad_hpc.models.pdn import DistillationTargets, PDNSize, pdn_output_size
from effad_hpc.training.artifacts import (
    BEST_MODEL,
    SHARED,
    StageRecord,
    complete_stage,
    completed_record,
    load_state,
    save_state,
)
from effad_hpc.training.registry import (
    Budget,
    ModelInputs,
    ModelRecipe,
    Stage,
    completed_stage,
    register_recipe,
    register_stage,
    stage_folder,
    stage_key,
)
from effad_hpc.training.sources import (
    PenaltyImages,
    image_folder,
    image_samples,
    penalty_folder,
)
from effad_hpc.training.loop import seeded_generator
from effad_hpc.training.statistics import channel_statistics
from effad_hpc.training.steps import StepRun, StepSampler, fit_steps
from effad_hpc.utils.atomic import input_sha256
from effad_hpc.utils.device import autocast, resolve_device

SIZES: dict[str, PDNSize] = {"s": "small", "m": "medium"}
TARGET_STATS = "target_stats.pt"


def _distillation(config: ExperimentConfig) -> DistillationConfig:
    if config.distillation is None:
        raise ConfigError("EfficientAD-S/M need a teacher: add a distillation section to the config "
                          "(distillation.images to distill one, or distillation.teacher_weights)")
    return config.distillation


def _step_batches(dataset: ImageDataset, batch_size: int, seed: int, stage: str, start: int, steps: int,
                  config: ExperimentConfig, device: torch.device) -> Iterator[torch.Tensor]:
    # Its own generator: a DataLoader draws its workers' base seed when iteration starts, which
    # would otherwise take a number from the global RNG (dropout's) at the resume step only.
    loader = DataLoader(dataset, batch_sampler=StepSampler(len(dataset), batch_size, seed, stage, start, steps),
                        num_workers=config.features.num_workers, pin_memory=device.type == "cuda",
                        generator=seeded_generator(seed, stage, "loader", start))
    for batch in loader:
        yield batch["image"].to(device, non_blocking=True)


def _lazy_batches(make: Callable[[int], Iterator[torch.Tensor]]) -> Callable[[int], torch.Tensor]:
    """The batch of a step from an iterator started at the first step asked for (a resume point)."""
    state: dict[str, Iterator[torch.Tensor]] = {}

    def batch(step: int) -> torch.Tensor:
        if "batches" not in state:
            state["batches"] = make(step)
        return next(state["batches"])

    return batch


@torch.no_grad()
# --- teacher distillation ------------------------------------------------------------------


def _use_teacher_file(config: ExperimentConfig, size: PDNSize, stage: str) -> StageRecord:
    """Check a user's PDN state dict against the architecture and keep it as the stage's model."""
    path = _distillation(config).teacher_weights
    folder, key = stage_folder(config, SHARED, stage), stage_key(config, stage, SHARED)
    if not path.is_file():
        raise CheckpointError(f"distillation.teacher_weights: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickled module, a truncated file, not a torch file at all
        raise CheckpointError(f"distillation.teacher_weights: {path} is not a state dict that loads with "
                              f"weights_only=True ({type(exc).__name__}); save the PDN's state_dict() instead "
                              "of the pickled module") from None
    teacher = PDN(size)
    try:
        teacher.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: not a PDN-{size[0].upper()} teacher state dict ({exc})") from None
    save_state(teacher.state_dict(), folder / BEST_MODEL)
    return complete_stage(folder, stage=stage, category=SHARED, key=key, best_epoch=0, final_epoch=0,
                          best_validation=float("nan"), stopped_early=False, train_seconds=0.0)


def random_grayscale(images: torch.Tensor, generator: torch.Generator, probability: float) -> torch.Tensor:
    """Each image turned grey (3 equal channels) with ``probability``, as torchvision's RandomGrayscale."""
    grey = (torch.rand(len(images), generator=generator) < probability).to(images.device)
    return torch.where(grey[:, None, None, None], TF.rgb_to_grayscale(images, num_output_channels=3), images)


def distillation_views(images: torch.Tensor, generator: torch.Generator, grayscale: float,
                       image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(backbone view, PDN view) of a batch: the authors' pretraining turns the image grey before
    both views (``RandomGrayscale(0.1)  # apply same to both``), then resizes it for each."""
    backbone_view = random_grayscale(images, generator, grayscale)
    pdn_view = F.interpolate(backbone_view, size=(image_size, image_size), mode="bilinear", antialias=True)
    return backbone_view, pdn_view


def distillation_targets(backbone: Backbone, layers: list[str], grid: int,
                         device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Images in [0, 1] -> the backbone's distillation targets (:class:`DistillationTargets`)."""
    channels = {layer.name: layer.channels for layer in backbone.layers}
    project = DistillationTargets([channels[name] for name in layers], grid).to(device)
    extractor = backbone.extractor.to(device)

    def targets(images: torch.Tensor) -> torch.Tensor:
        # float32 even inside the step loop's autocast, as the authors' pretraining: the targets
        # are what the teacher learns to reproduce, and bf16 would round them to 3 digits.
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            maps = extractor(images.to(device, non_blocking=True).float())
            return project([maps[name] for name in layers])

    return targets


def _target_stats(compute: Callable[[torch.Tensor], torch.Tensor], dataset: ImageDataset, config: ExperimentConfig,
                  stage: str, folder: Path, key: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the distillation targets over ``distillation.normalization_images``
    seeded random images, seen as the training sees them (random grey-scale), cycling through the
    folder when it has fewer, as the authors' infinite loader (kept in the stage folder, so a
    resumed run does not recompute them)."""
    path = folder / TARGET_STATS
    if path.is_file() and (saved := load_state(path))["key"] == key:
        return saved["mean"][None, :, None, None].to(device), saved["std"][None, :, None, None].to(device)
    d = _distillation(config)
    order_generator = torch.Generator().manual_seed(config.seed)
    passes = -(-d.normalization_images // len(dataset))
    picks = torch.cat([torch.randperm(len(dataset), generator=order_generator) for _ in range(passes)])
    loader = DataLoader(torch.utils.data.Subset(dataset, picks[:d.normalization_images].tolist()),
                        batch_size=d.batch_size, num_workers=config.features.num_workers)
    grey_generator = seeded_generator(config.seed, stage, "normalization")
    mean, std = channel_statistics(compute(random_grayscale(batch["image"], grey_generator, d.grayscale))
                                   for batch in loader)
    save_state({"key": key, "mean": mean.flatten().cpu(), "std": std.flatten().cpu()}, path)
    return mean.to(device), std.to(device)


def _distill(size: PDNSize, stage: str) -> Callable[..., StageRecord]:
    def run(config: ExperimentConfig, category: str = SHARED, show_progress: bool = True) -> StageRecord:
        folder, key = stage_folder(config, SHARED, stage), stage_key(config, stage, SHARED)
        if (done := completed_record(folder, key, verify=True)) is not None:
            return done
        d = _distillation(config)
        if d.teacher_weights is not None:
            return _use_teacher_file(config, size, stage)
        device = resolve_device(config.run.device, config.run.precision)
        dataset = ImageDataset(image_samples(image_folder(d.images, "distillation.images", d.pattern), "distill"),
                               d.backbone_image_size)
        backbone = config.backbone_or_main(d.backbone)
        image_size = config.efficientad.image_size
        targets = distillation_targets(build_backbone(backbone), backbone.layers,
                                       pdn_output_size(size, image_size, padded=True), device)
        mean, std = _target_stats(targets, dataset, config, stage, folder, key, device)
        torch.manual_seed(config.seed)
        teacher = PDN(size, padded=True).to(device)
        batches = _lazy_batches(lambda start: _step_batches(dataset, d.batch_size, config.seed, stage, start, d.steps,
                                                            config, device))

        def losses(step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
            backbone_view, pdn_view = distillation_views(batches(step), generator, d.grayscale, image_size)
            target = (targets(backbone_view) - mean) / std
            mse = (teacher(normalize_images(pdn_view)).float() - target).pow(2).mean()
            return {"mse": mse, "total": mse}

        return fit_steps(StepRun(stage, SHARED, folder, key, teacher, list(teacher.parameters()), losses, d.steps,
                                 d.lr, d.weight_decay, None, d.checkpoint_every, config.seed, device,
                                 config.run.precision), show_progress)

    return run


def _distill_settings(config: ExperimentConfig) -> dict:
    d = _distillation(config)
    # Files count by their content, not by where they are mounted: a moved folder retrains nothing.
    if d.teacher_weights is not None:
        return {"teacher_weights_sha256": input_sha256(d.teacher_weights) if d.teacher_weights.is_file() else None}
    return d.model_dump(mode="json", exclude={"teacher_weights", "images", "checkpoint_every"}) | {
        "backbone": checkpoint_identity(config.backbone_or_main(d.backbone)),
        "image_size": config.efficientad.image_size,
        "images_fingerprint": folder_fingerprint(d.images, d.pattern)}


# --- student + autoencoder -----------------------------------------------------------------


def jitter(images: torch.Tensor, generator: torch.Generator, strength: float) -> torch.Tensor:
    """EfficientAD's AE-input augmentation: per image one of brightness, contrast or saturation,
    by a factor drawn from [1 - strength, 1 + strength]."""
    if strength == 0:
        return images
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    out = []
    for image in images:
        choice = int(torch.randint(len(adjust), (1,), generator=generator))
        factor = 1 + strength * (2 * float(torch.rand(1, generator=generator)) - 1)
        out.append(adjust[choice](image, factor))
    return torch.stack(out)


def penalty_view(images: torch.Tensor, generator: torch.Generator, grayscale: float = 0.3) -> torch.Tensor:
    """EfficientAD's view of a penalty image (as its authors' code): loaded at twice the model's
    side, the central half kept (a zoomed-in crop), turned grey with probability ``grayscale``."""
    side = images.shape[-1] // 2
    crop = TF.center_crop(images, [side, side])
    grey = torch.rand(len(crop), generator=generator) < grayscale
    return torch.where(grey[:, None, None, None], TF.rgb_to_grayscale(crop, num_output_channels=3), crop)


@torch.no_grad()
def teacher_statistics(model: EfficientAD, loader: DataLoader,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the teacher's output over every training image, in one pass."""
    return channel_statistics(model.teacher_outputs(batch["image"].to(device), normalized=False) for batch in loader)


@torch.no_grad()
def map_quantiles(model: EfficientAD, loader: DataLoader, device: torch.device,
                  quantiles: tuple[float, float], precision: Precision) -> torch.Tensor:
    """[[q_a, q_b] of the ST map, [q_a, q_b] of the AE map] over the validation images, computed
    in the precision inference uses: the constants map exactly the maps they will normalise."""
    def raw_maps() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in loader:
            with autocast(device, precision):
                yield model.raw_maps(batch["image"].to(device))

    return quantiles_of_maps(raw_maps(), quantiles)


def _train_efficientad(model_name: str, teacher_stage: str) -> Callable[..., StageRecord]:
    def run(config: ExperimentConfig, category: str, show_progress: bool = True) -> StageRecord:
        folder, key = stage_folder(config, category, model_name), stage_key(config, model_name, category)
        if (done := completed_record(folder, key, verify=True)) is not None:
            return done
        teacher_folder = stage_folder(config, SHARED, teacher_stage)
        if completed_stage(config, teacher_stage, SHARED, verify=True) is None:
            raise CheckpointError(f"{teacher_folder}: no teacher for this config; run "
                                  f"`effad-hpc train --model {model_name} --stage {teacher_stage}` first")
        e = config.efficientad
        device = resolve_device(config.run.device, config.run.precision)
        data = load_category(config, category)
        splits = {split: ImageDataset(data.samples(split), e.image_size) for split in ("train", "validation")}
        for split, dataset in splits.items():
            if len(dataset) == 0:
                raise DataError(f"{category}: the {split} split is empty; {model_name} needs good {split} images")
        loaders = {split: DataLoader(dataset, batch_size=config.inference.batch_size,
                                     num_workers=config.features.num_workers) for split, dataset in splits.items()}
        torch.manual_seed(config.seed)
        model: EfficientAD = build_model(model_name, image_size=e.image_size, hard_quantile=e.hard_quantile,
                                         ae_dropout=e.ae_dropout)
        model.teacher.load_state_dict(load_state(teacher_folder / BEST_MODEL))
        model.to(device)
        found = penalty_folder(config, "efficientad")
        penalty = None if found is None else PenaltyImages(*found, 2 * e.image_size)
        batches = _lazy_batches(lambda start: _step_batches(splits["train"], e.batch_size, config.seed, model_name,
                                                            start, e.steps, config, device))

        def losses(step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
            images = batches(step)
            penalty_images = None if penalty is None else \
                penalty_view(penalty.batch(generator, len(images)), generator).to(device)
            return model.losses(images, jitter(images, generator, e.augmentation), penalty_images)

        def validate() -> float:
            with torch.no_grad():
                totals = [model.losses(b["image"].to(device), b["image"].to(device))["total"].item() * len(b["image"])
                          for b in loaders["validation"]]
            return sum(totals) / len(splits["validation"])

        def prepare() -> None:
            mean, std = teacher_statistics(model, loaders["train"], device)
            model.teacher_mean.copy_(mean)
            model.teacher_std.copy_(std)

        def finish() -> None:
            model.map_quantiles.copy_(map_quantiles(model, loaders["validation"], device, e.map_quantiles,
                                                      config.run.precision))

        parameters = [*model.student.parameters(), *model.autoencoder.parameters()]
        return fit_steps(StepRun(model_name, category, folder, key, model, parameters, losses, e.steps, e.lr,
                                 e.weight_decay, e.lr_drop_at, e.checkpoint_every, config.seed, device,
                                 config.run.precision, validate, prepare, finish), show_progress)

    return run


def _efficientad_settings(config: ExperimentConfig) -> dict:
    e = config.efficientad
    penalty = e.penalty_folder()
    return {"efficientad": e.model_dump(mode="json", exclude={"checkpoint_every", "penalty_images"}),
            "penalty_fingerprint": folder_fingerprint(penalty) if penalty else None}


def _build(model_name: str):
    def build(config: ExperimentConfig, _channels: int, _map_size: int, _state: dict) -> torch.nn.Module:
        e = config.efficientad
        return build_model(model_name, image_size=e.image_size, hard_quantile=e.hard_quantile, ae_dropout=e.ae_dropout)

    return build


def _image_inputs(config: ExperimentConfig) -> ModelInputs:
    return ModelInputs(config.efficientad.image_size)


def _no_store(_config: ExperimentConfig) -> bool:
    return False


def _distillation_steps(config: ExperimentConfig, _train_images: int) -> int | None:
    """None when a user's teacher file replaces the distillation: its length is not ours to judge."""
    d = config.distillation
    return None if d is None or d.teacher_weights is not None else d.steps


for _suffix, _size in SIZES.items():
    _teacher, _model = f"distill_{_suffix}", f"efficientad_{_suffix}"
    # The paper's lengths: 60,000 distillation steps, 70,000 student steps.
    register_stage(Stage(_teacher, _distill(_size, _teacher), _distill_settings, uses_store=_no_store,
                         reads_backbone=False, shared=True, budget=Budget(_distillation_steps, 60_000, "steps")))
    register_stage(Stage(_model, _train_efficientad(_model, _teacher), _efficientad_settings, needs=(_teacher,),
                         uses_store=_no_store, reads_backbone=False,
                         budget=Budget(lambda config, _images: config.efficientad.steps, 70_000, "steps")))
    register_recipe(ModelRecipe(_model, (_teacher, _model), _build(_model), _image_inputs))
