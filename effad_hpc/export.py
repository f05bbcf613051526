"""Self-contained inference artifacts of trained detectors, for inspection lines.

``export_detector(config, model, category, "torchscript" | "onnx")`` writes one file holding the
whole detector: the backbone, the model's networks, its constants (normalisation statistics,
map quantiles, PatchCore's bank, PaDiM's Gaussians, SPADE's gallery) and the map resizing and
smoothing. It reads a float32 batch ``images`` of shape (batch, 3, size, size), RGB in [0, 1],
and returns ``anomaly_map`` (batch, size, size) and ``score`` (batch,), the same values as
:class:`effad_hpc.models.AnomalyDetector`. The batch and the size are fixed when it is written.
Running it needs torch (TorchScript) or onnxruntime (ONNX), not this package.

The artifact's metadata (``effad_hpc.json``: TorchScript extra file, ONNX metadata property)
names the model, config, category, input and outputs, and the validation thresholds when the
category has been evaluated. Every export is checked before it is published: the artifact runs
on the category's validation images and must agree with PyTorch within ``TOLERANCE``.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from effad_hpc.config import ExperimentConfig, config_hash
from effad_hpc.data import ImageDataset, load_category
from effad_hpc.errors import EffadError
from effad_hpc.evaluation import results_dir
from effad_hpc.models import AnomalyDetector
from effad_hpc.training import load_detector
from effad_hpc.utils.atomic import atomic_path

Format = Literal["torchscript", "onnx"]
SUFFIX: dict[str, str] = {"torchscript": ".pt", "onnx": ".onnx"}
METADATA = "effad_hpc.json"
INPUT, OUTPUTS = "images", ("anomaly_map", "score")
TOLERANCE = 1e-4
"""Largest |artifact - PyTorch| allowed, relative to the largest |value| of the output (at least 1)."""
ONNX_LIMIT_BYTES = 2 << 30
"""protobuf's limit on one ONNX file: larger constants (SPADE's gallery at paper sizes) need TorchScript."""


class ExportError(EffadError):
    pass


class InspectionModule(nn.Module):
    """``forward(images) -> (anomaly_map, score)``: a detector at its fixed input size, as exported."""

    def __init__(self, detector: AnomalyDetector):
        super().__init__()
        self.detector = detector.cpu()
        self.eval()  # the exporters read the wrapper's own mode too

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the part maps it also resizes are unused outputs, which both exporters drop from the graph
        output = self.detector(images)
        return output["maps"]["combined"], output["score"]


@dataclass(frozen=True)
class ExportResult:
    path: Path
    max_difference: float
    """Largest |artifact - PyTorch| over both outputs on the check images."""
    metadata: dict


def default_path(config: ExperimentConfig, model: str, category: str, fmt: Format) -> Path:
    return config.run.out_dir / model / "export" / f"{category}{SUFFIX[fmt]}"


def export_detector(config: ExperimentConfig, model: str, category: str, fmt: Format, out: Path | None = None,
                    batch: int = 1) -> ExportResult:
    """Write the trained detector of ``model`` for ``category`` as one ``fmt`` file (default
    ``<run>/<model>/export/<category>.pt|.onnx``), checked against PyTorch before it is published."""
    out = Path(out) if out is not None else default_path(config, model, category, fmt)
    module = InspectionModule(load_detector(config, model, category, torch.device("cpu"), optimized=False))
    size = module.detector.image_size
    validation = load_category(config, category).samples("validation")
    check_images = torch.stack([ImageDataset(validation, size)[i % len(validation)]["image"] for i in range(batch)])
    metadata = {
        "model": model, "category": category, "config": config.name, "config_hash": config_hash(config),
        "input": {"name": INPUT, "shape": [batch, 3, size, size], "dtype": "float32",
                  "values": "RGB in [0, 1], resized to the shape (the data set's images, as in training)"},
        "outputs": {OUTPUTS[0]: [batch, size, size], OUTPUTS[1]: [batch]},
        "thresholds": _validation_thresholds(config, model, category),
    }
    with torch.no_grad():
        reference = module(check_images)
    with atomic_path(out) as tmp:
        (_write_torchscript if fmt == "torchscript" else _write_onnx)(module, check_images, tmp, metadata)
        outputs = run_artifact(tmp, fmt, check_images)
        difference = max(float((torch.as_tensor(got) - want).abs().max()) for got, want in zip(outputs, reference))
        scale = max(1.0, *(float(want.abs().max()) for want in reference))
        if not difference <= TOLERANCE * scale:
            raise ExportError(f"{out}: the {fmt} artifact differs from PyTorch by {difference:.3g} on validation "
                              f"images of {category} (tolerance {TOLERANCE * scale:.3g}); nothing was written")
    return ExportResult(out, difference, metadata)


def _validation_thresholds(config: ExperimentConfig, model: str, category: str) -> dict | None:
    """The image and pixel thresholds that evaluation chose on validation data, if it has run."""
    metrics = results_dir(config, model, category) / "metrics.json"
    if not metrics.is_file():
        return None
    thresholds = json.loads(metrics.read_text()).get("thresholds") or {}
    return {key: thresholds.get(key) for key in ("image", "pixel", "pixel_rule")}


def _write_torchscript(module: nn.Module, images: torch.Tensor, path: Path, metadata: dict) -> None:
    # The tracer warns at every Python-level shape read; the batch and size are fixed by design,
    # and the check after writing compares the artifact's outputs (check_trace would run it twice more).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, images, check_trace=False)
    torch.jit.save(traced, str(path), _extra_files={METADATA: json.dumps(metadata)})


def _write_onnx(module: nn.Module, images: torch.Tensor, path: Path, metadata: dict) -> None:
    import onnx

    constants = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    if constants >= ONNX_LIMIT_BYTES:
        raise ExportError(f"{path.name}: {constants / 2 ** 30:.1f} GiB of weights and memory exceed ONNX's 2 GiB "
                          "file limit; export --format torchscript")
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        program = torch.onnx.export(module, (images,), dynamo=True, input_names=[INPUT], output_names=list(OUTPUTS),
                                    verbose=False)
    proto = program.model_proto
    proto.metadata_props.add(key=METADATA, value=json.dumps(metadata))
    onnx.save_model(proto, str(path))


def run_artifact(path: Path, fmt: Format, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(anomaly_map, score) of an exported file on ``images``, run as a user would run it."""
    if fmt == "torchscript":
        with torch.no_grad():
            anomaly_map, score = torch.jit.load(str(path))(images)
        return anomaly_map.numpy(), score.numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    anomaly_map, score = session.run(list(OUTPUTS), {INPUT: images.numpy()})
    return anomaly_map, score


def read_metadata(path: Path, fmt: Format) -> dict:
    if fmt == "torchscript":
        extra = {METADATA: ""}
        torch.jit.load(str(path), _extra_files=extra)
        return json.loads(extra[METADATA])
    import onnx

    proto = onnx.load_model(str(path), load_external_data=False)
    return json.loads(next(p.value for p in proto.metadata_props if p.key == METADATA))
