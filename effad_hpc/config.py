"""Typed, validated experiment configs.

A config is a YAML file (see ``configs/``) validated into :class:`ExperimentConfig`. Every key is
declared here with its type and default; an unknown key or a value of the wrong type is a
:class:`~effad_hpc.errors.ConfigError` naming the file and the dotted key. Command-line overrides
(``data.image_size=512``) are merged into the YAML before validation, so they pass the same checks.

Relative paths are resolved against the working directory when the config is loaded, so the
resolved config that every run writes beside its outputs (:func:`write_resolved_config`) means
the same thing wherever a job later reads it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from effad_hpc.errors import ConfigError
from effad_hpc.utils.atomic import atomic_write_text


def _absolute(path: Path) -> Path:
    return path.expanduser().absolute()


# YAML gives paths as strings; accept those (strict mode would not) and make them absolute.
ConfigPath = Annotated[Path, Field(strict=False), AfterValidator(_absolute)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]


class Section(BaseModel):
    """A config section: immutable, no unknown keys, no silent type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SyntheticConfig(Section):
    """Generate ``data.root`` with the synthetic generator when it does not exist yet."""

    seed: int = 0
    size: Annotated[int, Field(ge=32)] = 128
    """Height of the generated images in pixels (LOCO scenes are wider than high); at least 32, as
    on smaller images the smallest holes and pins can miss every pixel and leave a defect unseen."""
    num_train: PositiveInt = 40
    num_validation: PositiveInt = 10
    """Images in LOCO's validation/good (MVTec AD layouts draw validation from train)."""
    num_test_good: PositiveInt = 10
    num_test_per_defect: PositiveInt = 4


def _distinct_categories(categories: list[str]) -> list[str]:
    # Custom errors, not Field(min_length=1): pydantic's "List should have at least 1 item" does not say that
    # leaving the key out is how to ask for every category.
    if not categories:
        raise PydanticCustomError("empty_categories", "empty list; leave it out (null) for every category")
    repeated = sorted({name for name in categories if categories.count(name) > 1})
    if repeated:
        raise PydanticCustomError("duplicate_categories", "{names} listed more than once",
                                  {"names": ", ".join(map(repr, repeated))})
    return categories


class DataConfig(Section):
    name: str | None = None
    """The data set's name in metrics and leaderboards (``mvtec_ad`` matches the published rows);
    default: the root folder's name, prefixed with ``synthetic_`` for a generated set."""
    layout: Literal["mvtec_ad", "mvtec_loco"]
    """``mvtec_ad`` also reads any folder in the MVTec AD layout."""
    root: ConfigPath
    """Folder that holds one sub-folder per category."""
    categories: Annotated[list[str], AfterValidator(_distinct_categories)] | None = None
    """Categories to use, each once; ``null`` means every category folder under ``root``."""
    image_size: PositiveInt = 256
    """Images are resized to image_size x image_size before the backbone."""
    validation_fraction: Fraction = 0.1
    """MVTec AD only: seeded fraction of train/good held out for validation."""
    synthetic: SyntheticConfig | None = None


class BackboneConfig(Section):
    name: str = "tf_efficientnet_lite0"
    """A timm model and its weights, ``NAME.TAG`` (``tf_efficientnet_b5.aa_in1k``): pretrained weights
    from the cache must be named by their tag. Only the offline Lite0 (its pinned package) and
    ``pretrained: false`` or a ``weights_path`` take a bare name."""
    layers: Annotated[list[str], Field(min_length=1)] = ["blocks.4"]
    """Module names whose outputs are the features, e.g. ``blocks.5`` (EfficientNet stage 5)."""
    pretrained: bool = True
    """``false`` builds random weights on purpose (shape tests only); never a silent fallback."""
    weights_path: ConfigPath | None = None
    """A state-dict file (timm key names) to load instead of the cache."""
    cache_dir: ConfigPath | None = None
    """Hugging Face / timm cache that ``effad-hpc prefetch`` fills on a login node. The other
    backbones of a config (distillation's, baselines') look here too unless they name their own."""

    def identity(self) -> dict[str, Any]:
        """The settings that make its features what they are, for stage keys: all but where the
        weights are cached, so that moving the cache does not retrain a run."""
        return self.model_dump(mode="json", exclude={"cache_dir"})


class FeaturesConfig(Section):
    """How backbone features are extracted into the sharded HDF5 store."""

    dtype: Literal["float16", "float32"] = "float16"
    compression: Literal["gzip", "lzf", "none"] = "lzf"
    compression_level: Annotated[int, Field(ge=0, le=9)] = 4
    """gzip only."""
    shards: PositiveInt = 1
    """Shards per split; each shard can be written by its own job (``--shard I/N``)."""
    batch_size: PositiveInt = 8
    num_workers: NonNegativeInt = 0


class TrainedStage(Section):
    """Optimizer, schedule, validation and data source shared by the trained stages (SPEC: Adam
    lr 2e-4, eps 1e-8, weight decay 1e-5, batch 8)."""

    lr: PositiveFloat = 2e-4
    adam_eps: PositiveFloat = 1e-8
    weight_decay: Annotated[float, Field(ge=0)] = 1e-5
    batch_size: PositiveInt = 8
    epochs: PositiveInt = 100
    min_samples: PositiveInt | None = None
    """Raise ``epochs`` on a small category until the stage sees at least this many training
    samples (:meth:`epochs_for`): 30 epochs of 26 photos are 780 samples, of 680 images 20,400.
    ``null``: ``epochs`` as they are (the papers count epochs)."""
    lr_drop_at: Fraction | None = None
    """Multiply the learning rate by 0.1 after this fraction of the epochs (EfficientAD: 0.95)."""
    validate_every: PositiveInt = 1
    """Epochs between validation passes; ``model.pt`` is the pass chosen on validation data (the
    lowest loss on the validation split, or the students' ``select_by`` score)."""
    patience_fraction: Fraction | None = None
    """Early stopping: stop after this fraction of the epochs without a lower validation loss
    (validation split only, never test labels); ``null`` trains every epoch."""
    feature_source: Literal["stored", "on_the_fly"] = "stored"
    """Read features from the HDF5 store, or run the frozen backbone on every batch."""

    def epochs_for(self, train_images: int) -> int:
        """The epochs the stage trains for on ``train_images`` training images: ``epochs``, or
        more where they would give fewer than ``min_samples`` samples."""
        if self.min_samples is None:
            return self.epochs
        return max(self.epochs, -(-self.min_samples // train_images))


class TeacherConfig(TrainedStage):
    """AST normalizing-flow teacher (SPEC section 2)."""

    coupling_blocks: PositiveInt = 4
    hidden_channels: PositiveInt = 1024
    kernel_sizes: Annotated[list[PositiveInt], Field(min_length=1)] = [3, 3, 3, 5]
    clamp: PositiveFloat = 3.0
    pos_enc_channels: Annotated[int, Field(ge=0, multiple_of=4)] = 32
    """Channels of the 2-D positional encoding that conditions the flow and is appended to the
    students' input (AST's method); ``0``: position-free, the features alone (leaderboard variant
    ``position-free``)."""
    input_noise: Annotated[float, Field(ge=0)] = 0.0
    """Gaussian noise added to the flow's input features while it trains (not at validation or
    inference), with this standard deviation in units of each channel's standard deviation over
    the training features: it keeps the flow from fitting the few training samples of a small
    category, whose density then ranks the validation images' normal structures as rare. 0: none
    (the paper; left out of the stage key, so teachers trained before the setting existed stay valid)."""
    feature_grid: Literal["coarsest", "finest", "patches"] = "coarsest"
    """How several ``backbone.layers`` make the input of the flow and of its students (AST and
    EfficientAD-AST): concatenated on the coarsest grid, finer layers average-pooled (the thesis,
    with one layer), or on the finest, coarser layers upsampled bilinearly (stride 8 with 16: four
    times the positions, so finer maps for four times the cost), or ``patches``: as ``finest``
    after each layer is averaged over its 3x3 neighbourhood (PatchCore's locally aware features)."""
    epochs: PositiveInt = 240

    @model_validator(mode="after")
    def _one_kernel_size_per_block(self) -> TeacherConfig:
        if len(self.kernel_sizes) != self.coupling_blocks:
            raise ValueError(f"kernel_sizes has {len(self.kernel_sizes)} entries for {self.coupling_blocks} "
                             "coupling_blocks: give one kernel size per block")
        return self


class PenaltySettings(Section):
    """EfficientAD's penalty: mean(student(image)^2) on ImageNet-like images keeps the student from
    imitating the teacher off the category's images (SPEC sections 1 and 3)."""

    penalty: bool = True
    """``false`` switches the penalty off; ``true`` adds it when there is a folder (``penalty_images``)."""
    penalty_images: ConfigPath | None = None
    """The penalty's image folder (searched recursively); unset: the top-level ``imagenet``."""

    def penalty_folder(self) -> Path | None:
        """The folder the penalty reads, or None when it is switched off or has no folder."""
        return self.penalty_images if self.penalty else None


SyntheticScore = Literal["val_synthetic_image_auroc", "val_synthetic_pixel_auroc", "val_synthetic_au_pro",
                         "val_synthetic_mean"]
"""Label-free scores on the synthetic-anomaly validation set; ``val_synthetic_mean`` is the mean
of image AUROC and AU-PRO (detection and localisation weigh the same)."""
VALIDATION_LOSS = "validation_loss"


class ASTStudentConfig(TrainedStage):
    """The AST baseline's residual student, as its paper trains it (SPEC section 2): 240 epochs,
    no early stopping, no penalty."""

    hidden_channels: PositiveInt = 1024
    residual_blocks: PositiveInt = 4
    epochs: PositiveInt = 240
    loss_percentile: Annotated[float, Field(gt=0, le=1)] = 1.0
    """1.0 uses every element (AST and the thesis); 0.999 is EfficientAD's hard feature loss."""
    teacher_targets: Literal["cached", "computed"] = "cached"
    """``cached``: the frozen teacher's z of every sample is computed once, into a file in the
    stage folder, instead of in every epoch (the same values up to float32 rounding across batch
    sizes; see ``effad_hpc/training/targets.py``); ``computed``: by the teacher at every step."""
    select_by: Literal["validation_loss"] | SyntheticScore = VALIDATION_LOSS
    """What chooses ``model.pt`` among the validation passes: the loss on the good validation
    images, or a score of the model on the synthetic-anomaly validation set
    (``validation_anomalies``), then computed at every validation pass. The loss measures how well
    the student imitates on good images, not how well the model detects; neither reads a test
    label. Early stopping (``patience_fraction``) watches the loss either way: the score is too
    noisy to stop on."""


class MapQuantiles(Section):
    """EfficientAD's map normalisation: per map, the validation quantiles (q_a, q_b) go to 0 and 0.1."""

    map_quantiles: Annotated[list[Fraction], Field(min_length=2, max_length=2)] = [0.9, 0.995]
    """Validation quantiles (q_a, q_b) of each map that are mapped to 0 and 0.1."""

    @model_validator(mode="after")
    def _ordered_quantiles(self) -> MapQuantiles:
        if not self.map_quantiles[0] < self.map_quantiles[1]:
            raise ValueError(f"map_quantiles {self.map_quantiles}: the first must be below the second")
        return self


class StudentConfig(PenaltySettings, MapQuantiles, ASTStudentConfig):
    """The EfficientAD-AST student + feature autoencoder (SPEC section 3): at most 100 epochs with
    early stopping, and the penalty."""

    epochs: PositiveInt = 100
    patience_fraction: Fraction | None = 0.1
    ae_channels: PositiveInt = 64
    """Autoencoder code width."""
    ae_upsampling_stages: NonNegativeInt = 2
    """Nearest x2 upsampling steps in the autoencoder's decoder before pooling back to the grid."""
    ae_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.2
    smoothing_sigma: Annotated[float, Field(ge=0)] = 0.0
    """Gaussian smoothing of the hybrid's map once upsampled to the image, in pixels of its input
    (the thesis: none; PatchCore's 4 smooths the blocky upsampling of a coarse grid)."""
    map_normalization: Literal["none", "quantile"] = "none"
    """How the ST and AE maps are combined: ``none`` averages them as they are (the thesis);
    ``quantile`` first maps each with its validation quantiles (``map_quantiles``, EfficientAD's
    rule), so that neither map's scale dominates the average."""
    ae_target: Literal["teacher", "features"] = "teacher"
    """What the autoencoder reconstructs (and the student's second head regresses through it):
    ``teacher``, the flow's z (the thesis), or ``features``, the backbone's features standardised
    per channel with the training features' statistics. z is whitened by construction, close to
    noise for a network that does not replicate the flow; the features keep the structure an
    autoencoder can learn and fail to reconstruct off the normal data (EfficientAD's autoencoder
    reconstructs its teacher's features, not a whitened code). ``teacher`` is left out of the
    stage key, so students trained before the setting existed stay valid."""


class EfficientADConfig(PenaltySettings, MapQuantiles):
    """EfficientAD-S/M training on images (SPEC section 1); the teacher comes from ``distillation``."""

    image_size: Annotated[int, Field(ge=64, multiple_of=32)] = 256
    """Input side of teacher, student and autoencoder (the paper: 256; smaller only for quick tests)."""
    steps: PositiveInt = 70_000
    batch_size: PositiveInt = 1
    lr: PositiveFloat = 1e-4
    weight_decay: Annotated[float, Field(ge=0)] = 1e-5
    lr_drop_at: Fraction | None = 0.95
    """Multiply the learning rate by 0.1 after this fraction of the steps."""
    hard_quantile: Annotated[float, Field(gt=0, le=1)] = 0.999
    """Hard feature loss: only elements at or above this quantile of the squared error count."""
    augmentation: Annotated[float, Field(ge=0, lt=1)] = 0.2
    """Strength of the brightness / contrast / saturation jitter (one, at random) of the AE input."""
    ae_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.2
    checkpoint_every: PositiveInt = 1_000
    """Steps between resumable checkpoints (and log rows with the validation loss)."""


DISTILLATION_BACKBONE = BackboneConfig(name="wide_resnet101_2.tv_in1k", layers=["layer2", "layer3"])
"""The paper's: WideResNet-101 ``layer2`` + ``layer3`` with torchvision's ImageNet weights."""


class DistillationConfig(Section):
    """EfficientAD's teacher: a padded PDN regressed onto a pretrained backbone's mid-level
    features (SPEC section 1). Runs once per run; every category uses the result."""

    teacher_weights: ConfigPath | None = None
    """A PDN state dict (``conv1.weight``, ...) to use instead of distilling; then nothing below is used."""
    images: ConfigPath | None = None
    """Folder of ImageNet-like images to distill on (ImageNet in the paper)."""
    pattern: str = "**/*"
    """Glob under ``images`` that selects the files (image suffixes only), e.g. ``*/train/good/*``."""
    backbone: BackboneConfig = DISTILLATION_BACKBONE
    backbone_image_size: PositiveInt = 512
    """The backbone's input side; the PDN sees the same image at ``efficientad.image_size``."""
    steps: PositiveInt = 60_000
    batch_size: PositiveInt = 16
    lr: PositiveFloat = 1e-4
    weight_decay: Annotated[float, Field(ge=0)] = 1e-5
    normalization_images: PositiveInt = 10_000
    """Images whose target features give the per-channel mean and std the targets are normalized with
    (the authors' pretraining: 10,000; the folder is cycled through when it has fewer)."""
    grayscale: Annotated[float, Field(ge=0, le=1)] = 0.1
    """Probability that a distillation image is turned grey, for the backbone and the PDN alike
    (the authors' pretraining: ``RandomGrayscale(0.1)``)."""
    checkpoint_every: PositiveInt = 1_000

    @field_validator("backbone", mode="before")
    @classmethod
    def _partial_backbone_keeps_the_papers(cls, value: Any) -> Any:
        # `distillation.backbone.cache_dir=...` alone must not turn the teacher's source into
        # BackboneConfig's defaults (Lite0 blocks.4): unnamed keys keep the paper's backbone.
        return DISTILLATION_BACKBONE.model_dump() | value if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _images_or_weights(self) -> DistillationConfig:
        if self.teacher_weights is None and self.images is None:
            raise ValueError("give distillation.images (a folder to distill the teacher on) "
                             "or distillation.teacher_weights (a PDN state dict)")
        return self


Layers = Annotated[list[str], Field(min_length=1)]


class BaselineConfig(Section):
    """Features of a baseline: backbone layers, read from the store or computed on the fly."""

    backbone: BackboneConfig | None = None
    """Its own backbone (the papers: WideResNet-50); ``null`` uses ``backbone``."""
    image_size: PositiveInt | None = None
    """Its own input side (the papers: 256 or 224); ``null`` uses ``data.image_size``."""
    layers: Layers | None = None
    """Layers of that backbone (mid-level ones); ``null`` uses its ``layers``."""
    feature_source: Literal["stored", "on_the_fly"] = "stored"
    """``stored`` reads the feature store, which holds ``backbone.layers`` at ``data.image_size``:
    only for the main backbone and image size; ``on_the_fly`` runs the backbone on the images."""
    batch_size: PositiveInt = 8
    smoothing_sigma: Annotated[float, Field(ge=0)] = 4.0
    """Gaussian smoothing of the upsampled map, in pixels of the model's input (the papers: 4; 0: none)."""

    def named_layers(self) -> list[str]:
        """The layers this section names itself (``null`` ones come from the backbone)."""
        return list(self.layers or ())


class PatchCoreConfig(BaselineConfig):
    coreset_ratio: Annotated[float, Field(gt=0, le=1)] = 0.1
    """Fraction of the training patches kept in the memory bank (greedy coreset)."""
    projection_dim: PositiveInt | None = 128
    """Random projection the coreset is selected on (``null``: the full features)."""
    num_neighbors: PositiveInt = 9
    """Neighbours of the nearest bank vector in the image-score reweighting."""


class PaDiMConfig(BaselineConfig):
    dims: PositiveInt = 100
    """Random channel subset kept (the paper: 100 for ResNet-18, 550 for WideResNet-50)."""
    regularization: PositiveFloat = 0.01
    """Added to the covariance's diagonal, so that it is invertible with few images."""


class SPADEConfig(BaselineConfig):
    image_neighbors: PositiveInt = 50
    """K nearest training images (global features) whose pixels a test pixel is compared with."""
    pixel_neighbors: PositiveInt = 1
    global_layer: str | None = None
    """Layer whose global average pool is an image's feature for the image-level kNN (the paper:
    the backbone's last, ``layer4`` of WideResNet-50); ``null``: the spatial mean of ``layers``."""
    gallery_dtype: Literal["float16", "float32"] = "float16"
    """The stored training pyramids: float16 halves the model (3 GB instead of 6 GB at paper
    sizes); distances are computed in float32 either way, and the maps differ by about 1e-3."""

    def named_layers(self) -> list[str]:
        return super().named_layers() + ([self.global_layer] if self.global_layer else [])


class InferenceConfig(Section):
    score: Literal["max", "mean"] = "max"
    """Image score from the combined anomaly map."""
    batch_size: PositiveInt = 8
    channels_last: bool = True
    """Trained detectors, and the backbone in feature extraction, compute in the NHWC layout
    (oneDNN's and cuDNN's fast convolutions: 1.3-1.5x on a CPU); the same values up to float32
    rounding."""
    compile: bool = False
    """``torch.compile`` the backbone and the model's maps (weights frozen into the graph; up to 2x
    on a CPU for EfficientNet backbones) after a compilation of about a minute per process."""


class EvaluationConfig(Section):
    """The evaluation stage: thresholds from the validation split, metric resolution, outputs."""

    image_threshold_quantile: Annotated[float, Field(gt=0, le=1)] = 0.99
    """Image threshold = this quantile of the validation images' scores (good images only)."""
    pixel_threshold_quantile: Annotated[float, Field(gt=0, le=1)] = 0.999
    """Pixel threshold = this quantile of the validation maps' pixel scores (``pixel_threshold: quantile``)."""
    pixel_threshold: Literal["quantile", "synthetic_f1"] = "quantile"
    """How the pixel threshold (masks, pixel F1) is chosen without test labels: ``quantile`` of the
    good validation pixels (``pixel_threshold_quantile``); ``synthetic_f1``: the best F1 on the
    synthetic-anomaly validation set, made from the good validation images (a model whose good
    images have a long tail of high pixels gets no threshold above every defect)."""
    bins: Annotated[int, Field(ge=100)] = 10_000
    """Score thresholds of the streaming pixel metrics (memory O(bins), not O(pixels))."""
    pro_fpr_limit: Annotated[float, Field(gt=0, le=1)] = 0.3
    spro_fpr_limits: Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=1)] = [
        0.01, 0.05, 0.1, 0.3, 1.0]
    latency_repeats: PositiveInt = 20
    """Timed batch-1 forwards (after 3 warm-up ones) for ms/image, and timed batches for images/s."""
    write_overlays: bool = True
    write_masks: bool = True


class ValidationAnomaliesConfig(Section):
    """The synthetic-anomaly validation set: anomalies pasted into the category's own validation
    images, each with its mask, the same for every trial and model of a config's data. It gives a
    label-free score (``val_synthetic_*``) that sweeps rank trials on; no test file is read."""

    count: PositiveInt = 100
    """Anomalous images per category (drawn round-robin over the validation images and kinds).
    Choices rest on it: on the real cookie photos four draws of 20 put EfficientAD-AST's AU-PRO above
    PatchCore's and spread the score by 0.07; with 100 the order is the test's (README, quality)."""
    seed: int = 0
    kinds: Annotated[list[Literal["cut_paste", "noise_blend"]], Field(min_length=1)] = ["cut_paste", "noise_blend"]
    """``cut_paste``: a recoloured, rotated patch of another training image; ``noise_blend``: a
    smooth-noise-shaped region where a transformed training image shows through."""
    area: Annotated[list[Annotated[float, Field(gt=0, lt=1)]], Field(min_length=2, max_length=2)] = [0.01, 0.06]
    """Range of an anomaly's area as a fraction of the image."""

    @model_validator(mode="after")
    def _area_is_a_range(self) -> ValidationAnomaliesConfig:
        if not self.area[0] < self.area[1]:
            raise ValueError(f"area {self.area}: give [low, high] with low < high")
        return self


Precision = Literal["auto", "fp32", "fp16", "bf16"]
"""``run.precision`` (see :mod:`effad_hpc.utils.device` for what each means on which GPU)."""


class RunConfig(Section):
    out_dir: ConfigPath = Path("runs/default")
    shared_dir: ConfigPath | None = None
    """A cache that runs share (a sweep's trials): feature stores and stage folders there are
    addressed by their keys, ``features/<category>/<feature key>/`` and
    ``train/<category>/<stage>/<stage key>/``, so runs whose settings differ never overwrite each
    other's artifacts, and a run finds what another already trained with the same inputs. Unset:
    everything lives in ``out_dir`` (``features/<category>/``, ``train/<category>/<stage>/``)."""
    trial: str | None = None
    """``<sweep>/<trial id>`` for a sweep trial's run (set by ``effad-hpc sweep``): its metrics.json
    and leaderboard rows carry it in the ``trial`` column."""
    executor: Literal["auto", "slurm", "local", "debug"] = "auto"
    """Where ``effad-hpc run`` puts the jobs: Slurm, local processes, or this process (debug);
    ``auto`` picks Slurm when a controller answers, else local."""
    profile: ConfigPath | None = None
    """Cluster profile YAML with the jobs' resources (see ``slurm/profiles/``); default: local."""
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"
    precision: Precision = "auto"
    """Autocast dtype: ``auto`` is bf16 on GPUs with native bfloat16 (compute capability 8.0+),
    fp16 with loss scaling below (V100), float32 on the CPU; ``fp32`` turns autocast off. The flow
    teacher and the anomaly maps (squared differences) are float32 whatever is chosen."""


PAPER_METHOD = "paper"
"""A model's ``variant`` when the config trains its paper's method (the thesis's for EfficientAD-AST)."""


IMAGENET_KEYS = (("distillation", "images"), ("student", "penalty_images"), ("efficientad", "penalty_images"))
"""The (section, key) folders that the top-level ``imagenet`` stands in for when they are unset."""


class ExperimentConfig(Section):
    name: str
    seed: int = 0
    models: Annotated[list[str], Field(min_length=1)] = ["efficientad_ast"]
    """Registered model names (see ``effad-hpc train --help``) that a run trains and evaluates."""
    data: DataConfig
    imagenet: ConfigPath | None = None
    """ImageNet-like image folder for what EfficientAD trains on ImageNet: the teacher distillation
    (``distillation.images``, when there is a distillation section) and the penalties
    (``student.penalty_images``, ``efficientad.penalty_images``); a key set there wins."""
    backbone: BackboneConfig = BackboneConfig()
    features: FeaturesConfig = FeaturesConfig()
    teacher: TeacherConfig = TeacherConfig()
    ast_student: ASTStudentConfig = ASTStudentConfig()
    """The ``ast`` baseline's student; the flow teacher is shared with EfficientAD-AST."""
    student: StudentConfig = StudentConfig()
    """EfficientAD-AST's student + autoencoder."""
    efficientad: EfficientADConfig = EfficientADConfig()
    distillation: DistillationConfig | None = None
    """Required by EfficientAD-S/M."""
    patchcore: PatchCoreConfig = PatchCoreConfig()
    padim: PaDiMConfig = PaDiMConfig()
    spade: SPADEConfig = SPADEConfig()
    inference: InferenceConfig = InferenceConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    validation_anomalies: ValidationAnomaliesConfig = ValidationAnomaliesConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="before")
    @classmethod
    def _imagenet_fills_unset_folders(cls, raw: Any) -> Any:
        # Filled before validation, so that the resolved config names every folder a stage reads
        # and distillation's own check (images or teacher_weights) sees the filled one.
        folder = raw.get("imagenet") if isinstance(raw, dict) else None
        if not isinstance(folder, (str, Path)):  # unset, or a wrong type that field validation names
            return raw
        filled = dict(raw)
        for section, key in IMAGENET_KEYS:
            # An absent student or efficientad section means its defaults; distillation stays absent
            # (no teacher to distill: `prefetch` would fetch its backbone for nothing).
            value = raw.get(section, None if section == "distillation" else {})
            if isinstance(value, dict) and value.get(key) is None:
                filled[section] = value | {key: folder}
            elif isinstance(value, Section) and getattr(value, key) is None:
                filled[section] = value.model_copy(update={key: _absolute(Path(folder))})
        return filled

    @model_validator(mode="after")
    def _stored_baseline_layers_are_stored(self) -> ExperimentConfig:
        for name in ("patchcore", "padim", "spade"):
            section: BaselineConfig = getattr(self, name)
            if section.feature_source != "stored":
                continue
            if section.backbone not in (None, self.backbone) or section.image_size not in (None, self.data.image_size):
                raise ValueError(f"{name}: the feature store holds the features of `backbone` at data.image_size; "
                                 f"with its own backbone or image_size, set {name}.feature_source: on_the_fly")
            missing = [layer for layer in section.named_layers() if layer not in self.backbone.layers]
            if missing:
                raise ValueError(f"{name} reads layers {missing} that are not in backbone.layers "
                                 f"{self.backbone.layers}, the layers the feature store holds: add them there or set "
                                 f"{name}.feature_source: on_the_fly")
        spade_layers = self.spade.layers or self.backbone_or_main(self.spade.backbone).layers
        if self.spade.global_layer in spade_layers:
            raise ValueError(f"spade.global_layer {self.spade.global_layer!r} is also a pyramid layer "
                             f"{spade_layers}: name a deeper one (the paper: the last)")
        if any(model.startswith("efficientad_") and model != "efficientad_ast" for model in self.models) \
                and self.distillation is None:
            raise ValueError("EfficientAD-S/M need a teacher: add a distillation section (distillation.images, or "
                             "with imagenet set `distillation: {}`, to distill one, or distillation.teacher_weights)")
        return self

    def backbone_or_main(self, own: BackboneConfig | None) -> BackboneConfig:
        """A section's own backbone (distillation's, a baseline's), or ``backbone`` when it has
        none. An own backbone without a cache of its own reads ``backbone.cache_dir``: one
        ``backbone.cache_dir=`` on the command line then serves ``prefetch`` and every job."""
        if own is None:
            return self.backbone
        if own.cache_dir is None and own.weights_path is None:
            return own.model_copy(update={"cache_dir": self.backbone.cache_dir})
        return own


# --- loading -------------------------------------------------------------------------------


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names a key twice; plain YAML would silently keep the last value."""


def _section_name(path: list[str]) -> str:
    return f"in section {'.'.join(path)}".replace(".[", "[") if path else "at the top level"


class YamlLoader(yaml.SafeLoader):
    """Safe YAML that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``, users write both) and
    rejects a key given twice in one mapping (:class:`DuplicateKeyError`)."""

    def construct_document(self, node: yaml.Node) -> Any:
        # The whole node tree is checked before construction: only here is each mapping's dotted path known.
        self._check_duplicate_keys(node, [], set())
        return super().construct_document(node)

    def _check_duplicate_keys(self, node: yaml.Node, path: list[str], seen: set[int]) -> None:
        if id(node) in seen:  # an alias to a node already checked (or a recursive one)
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._check_duplicate_keys(item, [*path, f"[{index}]"], seen)
        elif isinstance(node, yaml.MappingNode):
            first_lines: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: explicit keys override merged ones
                    continue
                if isinstance(key_node, yaml.ScalarNode):  # compared as constructed: `1` and `0x1` are one key
                    key = self.construct_object(key_node)
                    line = key_node.start_mark.line + 1
                    if key in first_lines:
                        raise DuplicateKeyError(f"line {line}: duplicate key {key!r} {_section_name(path)} "
                                                f"(first at line {first_lines[key]})")
                    first_lines[key] = line
                self._check_duplicate_keys(value_node, [*path, str(key_node.value)], seen)


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789."))


def set_key(raw: dict[str, Any], key: str, value: Any, source: str) -> None:
    """Set the dotted ``key`` (``student.lr``) of a raw config mapping to ``value``: what a
    command-line override and a sweep trial's sampled value both do before validation."""
    *parents, leaf = key.split(".")
    node = raw
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if child is None:  # an absent optional section (distillation: null)
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parents[: depth + 1])
            raise ConfigError(f"{source}: {where} is a value, not a section")
        node = child
    node[leaf] = value


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected KEY.SUB=VALUE")
    try:
        parsed = yaml.load(value, Loader=YamlLoader)
    except yaml.YAMLError as exc:
        if value.lstrip().startswith(("[", "{")):
            raise ConfigError(f"override {override!r}: value is not valid YAML ({exc})") from exc
        # A shell word such as the glob `*/train/good/*` (a YAML alias to YAML) is meant as text.
        parsed = value
    set_key(raw, key, parsed, f"override {override!r}")


RENAMED = {"run.mixed_precision": "it became run.precision (auto, fp32, fp16 or bf16; mixed_precision: false is fp32)"}
"""Keys that older configs have, with what replaced them."""


def format_errors(source: str, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden" and key in RENAMED:
            message = f"unknown key; {RENAMED[key]}"
        elif item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required key is missing"
        elif item["type"] == "value_error" and (not item["loc"] or isinstance(item["input"], dict)):
            # a check across keys: the input is the whole file or section, and the message names the keys
            message = item["msg"].removeprefix("Value error, ")
        else:
            message = f"{item['msg']} (got {item['input']!r})"
        lines.append(f"{source}: {key}: {message}")
    return "\n".join(lines)


def parse_config(raw: Any, source: str, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Validate an already-parsed YAML document (plus overrides) into an ExperimentConfig."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    for override in overrides:
        _apply_override(raw, override)
    if overrides:
        source = f"{source} (with overrides {' '.join(overrides)})"
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_errors(source, exc)) from None


def yaml_error_line(exc: yaml.YAMLError) -> str:
    """PyYAML's error in one line (its own text quotes the offending lines with carets)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from exc
    try:
        raw = yaml.load(text, Loader=YamlLoader)
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_error_line(exc)}") from None
    return parse_config(raw if raw is not None else {}, str(path), overrides)


# --- hashing and writing -------------------------------------------------------------------


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-able object that does not depend on key order or Python's hash seed."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def config_hash(config: ExperimentConfig) -> str:
    return stable_hash(config.model_dump(mode="json"))


def to_yaml(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


CONFIG_FILENAME = "config.yaml"
HASH_LINE = "# config hash: "


def write_resolved_config(config: ExperimentConfig, folder: Path) -> str:
    """Write the resolved config to ``folder/config.yaml`` (hash in its first line); return the hash."""
    digest = config_hash(config)
    atomic_write_text(Path(folder) / CONFIG_FILENAME, f"{HASH_LINE}{digest}\n{to_yaml(config)}")
    return digest


def load_resolved_config(folder: Path) -> ExperimentConfig:
    """The config a run wrote into ``folder``, checked against the hash in its first line (a
    truncated or edited file is an error, not a config filled up with defaults)."""
    path = Path(folder) / CONFIG_FILENAME
    if not path.is_file():
        raise ConfigError(f"{folder}: no {CONFIG_FILENAME}; is this a run folder (run.out_dir)?")
    try:
        first_line = path.read_text().partition("\n")[0]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the run's config ({exc})") from None
    if not first_line.startswith(HASH_LINE):
        raise ConfigError(f"{path}: first line is not '{HASH_LINE}...': not a config written by a run")
    try:
        config = load_config(path)
    except ConfigError as exc:  # one line, whatever the parser found first
        raise ConfigError(f"{str(exc).splitlines()[0]}; its content does not match the hash in its first line: "
                          "the file is truncated or was edited") from None
    written, actual = first_line.removeprefix(HASH_LINE).strip(), config_hash(config)
    if written != actual:
        raise ConfigError(f"{path}: content does not match the hash in its first line ({written}, content {actual}): "
                          "the file is truncated or was edited")
    return config
