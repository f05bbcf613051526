"""Export: every model as one TorchScript and one ONNX file whose outputs equal PyTorch's; the
README's predict example runs them with torch or onnxruntime alone."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from effad_hpc.data import ImageDataset, load_category
from effad_hpc.export import TOLERANCE, export_detector, read_metadata, run_artifact
from effad_hpc.training import load_detector, train
from tests.conftest import REPO, tiny_config
from tests.test_training import SMALL_NETS

MODELS = ["efficientad_ast", "ast", "efficientad_s", "efficientad_m", "patchcore", "padim", "spade"]
TINY = SMALL_NETS | {
    "teacher.epochs": 1, "student.epochs": 1, "ast_student.epochs": 1,
    "efficientad": {"image_size": 64, "steps": 2, "checkpoint_every": 2},
    "patchcore.coreset_ratio": 0.25, "padim.dims": 40, "spade.image_neighbors": 3,
    "evaluation.latency_repeats": 1,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_fabric):
    """Every model trained briefly on one category (scores do not matter here, equal outputs do)."""
    config = tiny_config(synthetic_fabric, tmp_path_factory.mktemp("export") / "run", TINY | {
        "models": MODELS,
        "distillation": {"images": str(synthetic_fabric), "pattern": "*/train/good/*", "steps": 2,
                         "batch_size": 2, "normalization_images": 4, "checkpoint_every": 2,
                         "backbone": {"name": "tf_efficientnet_lite0", "layers": ["blocks.2", "blocks.3"]},
                         "backbone_image_size": 128}})
    for model in MODELS:
        train(config, model, "fabric", show_progress=False)
    return config


def _test_images(config, size: int, count: int = 2) -> torch.Tensor:
    """Test-split images (defects included): not the validation images the export checked itself on."""
    samples = load_category(config, "fabric").samples("test")[-count:]
    return torch.stack([ImageDataset(samples, size)[i]["image"] for i in range(count)])


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("model", MODELS)
def test_artifact_outputs_equal_pytorch(trained, model, fmt, tmp_path):
    result = export_detector(trained, model, "fabric", fmt, tmp_path / f"{model}.{fmt}", batch=2)
    detector = load_detector(trained, model, "fabric", torch.device("cpu"))
    images = _test_images(trained, detector.image_size)
    expected = detector(images)
    anomaly_map, score = run_artifact(result.path, fmt, images)
    assert anomaly_map.shape == (2, detector.image_size, detector.image_size) and score.shape == (2,)
    want_map, want_score = expected["maps"]["combined"].numpy(), expected["score"].numpy()
    scale = max(1.0, np.abs(want_map).max(), np.abs(want_score).max())
    assert np.abs(anomaly_map - want_map).max() <= TOLERANCE * scale
    assert np.abs(score - want_score).max() <= TOLERANCE * scale
    assert np.ptp(want_map) > 0  # a constant map would make the comparison empty
    metadata = read_metadata(result.path, fmt)
    assert metadata["model"] == model
    assert metadata["input"]["shape"] == [2, 3, detector.image_size, detector.image_size]
    assert metadata["thresholds"] is None  # not evaluated: no thresholds are invented


def _readme_predict_example() -> str:
    readme = (REPO / "README.md").read_text()
    match = re.search(r"<!-- predict example -->\s*```python\n(.*?)```", readme, re.S)
    assert match, "README.md lost its predict example"
    return match.group(1)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_readme_predict_example_runs_without_effad_hpc(trained, fmt, tmp_path):
    """The CLI writes the artifact; the README's example scores an image with it in a fresh
    interpreter that cannot import effad_hpc, and prints what PyTorch computes."""
    out = tmp_path / f"patchcore.{fmt}"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(json.dumps(trained.model_dump(mode="json")))
    cli = subprocess.run([sys.executable, "-m", "effad_hpc", "export", "--config", str(config_file), "--model",
                          "patchcore", "--category", "fabric", "--format", fmt, "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert str(out) in cli.stdout and out.is_file()
    sample = load_category(trained, "fabric").samples("test")[-1]
    script = tmp_path / "predict.py"
    script.write_text("import sys\nsys.modules['effad_hpc'] = None  # importing it would fail\n"
                      + _readme_predict_example())
    run = subprocess.run([sys.executable, str(script), str(out), str(sample.path)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    score = float(re.search(r"score ([-\d.e+]+)", run.stdout).group(1))
    detector = load_detector(trained, "patchcore", "fabric", torch.device("cpu"))
    image = ImageDataset([sample], detector.image_size)[0]["image"][None]
    assert score == pytest.approx(float(detector(image)["score"][0]), rel=1e-3, abs=1e-4)


def test_export_of_an_untrained_model_names_the_training_command(trained, tmp_path):
    config = trained.model_copy(update={"run": trained.run.model_copy(update={"out_dir": tmp_path / "empty"})})
    from effad_hpc.errors import CheckpointError

    with pytest.raises(CheckpointError, match="effad-hpc train --model padim --category fabric"):
        export_detector(config, "padim", "fabric", "onnx", tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_artifact_path_defaults_into_the_run_folder(trained):
    result = export_detector(trained, "padim", "fabric", "torchscript")
    assert result.path == Path(trained.run.out_dir) / "padim" / "export" / "fabric.pt"
    assert result.path.is_file() and not list(result.path.parent.glob(".*tmp-*"))
