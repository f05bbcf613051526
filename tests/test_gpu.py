"""GPU checks: tiny stages trained in each precision, a killed GPU stage resumed, GPU evaluation
against the CPU's, the local executor on the GPU, and the build's architectures on this GPU.

Marked ``gpu`` and skipped, with the reason printed (``-rs`` is in the pytest options), where
torch sees no CUDA device; ``benchmarks/gpu_check.sh`` runs them with a throughput table on a GPU
node. Tolerances, and why: a resumed GPU stage matches the uninterrupted one to 5 % of its
validation loss (cuDNN's convolution algorithms are not deterministic, so the two runs are not
bit-equal as they are on the CPU); GPU evaluation (autocast in ``run.precision: auto``) of the same
trained model matches the CPU's float32 metrics to 0.02 and its maps to 2 % of their range.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

from effad_hpc.config import load_config
from effad_hpc.errors import ConfigError
from effad_hpc.evaluation import evaluate_category
from effad_hpc.evaluation.evaluate import model_dir
from effad_hpc.training import read_log, read_record, stage_dir, train
from effad_hpc.training.artifacts import BEST_MODEL
from effad_hpc.utils.device import capability_of, check_build_architectures, resolve_device

from tests.conftest import REPO, apply_changes, tiny_config_dict

NO_GPU = "no CUDA GPU visible to torch: the GPU checks run on a GPU node (bash benchmarks/gpu_check.sh)"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)]

TINY = {"data.categories": ["fabric"], "data.image_size": 128, "evaluation.latency_repeats": 3,
        "teacher.hidden_channels": 32, "teacher.epochs": 6, "teacher.batch_size": 4,
        "ast_student.hidden_channels": 32, "ast_student.epochs": 4, "ast_student.batch_size": 4,
        "student.hidden_channels": 32, "student.residual_blocks": 1, "student.epochs": 4, "student.batch_size": 4,
        "student.patience_fraction": None}
RESUMED_LOSS_TOLERANCE = 0.05
METRIC_TOLERANCE = 0.02
MAP_TOLERANCE = 0.02


def _efficientad(data_root: Path) -> dict:
    return {"efficientad.image_size": 64, "efficientad.steps": 20, "efficientad.checkpoint_every": 10,
            "distillation.images": str(data_root), "distillation.pattern": "*/train/good/*",
            "distillation.steps": 10, "distillation.batch_size": 2, "distillation.normalization_images": 4,
            "distillation.checkpoint_every": 5, "distillation.backbone_image_size": 128,
            "distillation.backbone": {"name": "tf_efficientnet_lite0", "layers": ["blocks.2", "blocks.3"]}}


def _config(data_root: Path, out: Path, changes: dict):
    raw = apply_changes(tiny_config_dict(data_root, out), TINY | changes)
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(raw))
    return path, load_config(path)


def test_the_build_has_kernels_for_this_gpu_and_the_check_refuses_one_it_lacks():
    device = resolve_device("cuda")  # runs the check on the real GPU and build
    name, capability = torch.cuda.get_device_name(device), capability_of(device)
    check_build_architectures(name, capability, torch.cuda.get_arch_list())
    with pytest.raises(ConfigError, match="compute capability 3.0"):
        check_build_architectures("Tesla K10", (3, 0), torch.cuda.get_arch_list())
    torch.ones(8, device=device).sum().item()  # a kernel of this build runs on this GPU


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_tiny_stages_train_on_the_gpu_in_each_precision(precision, synthetic_fabric, tmp_path):
    changes = {"models": ["efficientad_ast", "ast", "efficientad_s"], "run.device": "cuda",
               "run.precision": precision} | _efficientad(synthetic_fabric)
    _, config = _config(synthetic_fabric, tmp_path / "run", changes)
    if precision == "bf16" and capability_of(torch.device("cuda")) < (8, 0):
        with pytest.raises(ConfigError, match="bf16 needs compute capability 8.0"):
            train(config, "ast", "fabric", show_progress=False)
        return
    for model in config.models:
        records = train(config, model, "fabric", show_progress=False)
        for record in records:  # every logged loss finite (fp16 without loss scaling underflows, bf16 drifts)
            rows = read_log(stage_dir(config, record.category, record.stage))
            assert rows and all(np.isfinite(float(value)) for row in rows for name, value in row.items()
                                if name.startswith(("train_", "validation"))), (model, record.stage)
    teacher = torch.load(stage_dir(config, "fabric", "teacher") / BEST_MODEL, weights_only=True)
    assert {value.dtype for value in teacher.values() if value.is_floating_point()} == {torch.float32}
    for model in config.models:
        result = evaluate_category(config, model, "fabric", show_progress=False)
        assert result["compute"]["device_name"] == torch.cuda.get_device_name(0)
        assert result["compute"]["precision"] == {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[precision]
        assert 0 <= result["metrics"]["image_auroc"] <= 1
        tiff = next((model_dir(config, model) / "maps" / "fabric" / "test").glob("*/*.tiff"))
        assert tifffile.imread(tiff).dtype == np.float32


def test_a_killed_gpu_stage_resumes_to_the_uninterrupted_result(synthetic_fabric, tmp_path):
    """The student of EfficientAD-AST under autocast (and fp16 loss scaling on pre-Ampere GPUs)."""
    changes = {"models": ["efficientad_ast"], "run.device": "cuda", "student.epochs": 12}
    values = {}
    for out in ("reference", "killed"):
        path, config = _config(synthetic_fabric, tmp_path / out, changes)
        command = [sys.executable, "-m", "effad_hpc", "train", "--config", str(path), "--quiet"]
        assert subprocess.run([*command, "--stage", "teacher"], cwd=REPO, timeout=600).returncode == 0
        if out == "killed":
            checkpoint = stage_dir(config, "fabric", "student_ae") / "last.pt"
            process = subprocess.Popen([*command, "--stage", "student_ae"], cwd=REPO)
            deadline = time.monotonic() + 300
            while not (checkpoint.is_file() and torch.load(checkpoint, weights_only=True)["epoch"] >= 4):
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            process.send_signal(signal.SIGKILL)
            process.wait()
        assert subprocess.run([*command, "--stage", "student_ae"], cwd=REPO, timeout=600).returncode == 0
        record = read_record(stage_dir(config, "fabric", "student_ae"))
        values[out] = record.best_validation
        if out == "killed":
            assert record.resumed_at_epochs and record.resumed_at_epochs[0] >= 4
    assert values["killed"] == pytest.approx(values["reference"], rel=RESUMED_LOSS_TOLERANCE)


def test_gpu_evaluation_matches_the_cpu_on_the_same_trained_model(synthetic_fabric, tmp_path):
    _, on_cpu = _config(synthetic_fabric, tmp_path / "cpu", {"models": ["efficientad_ast"]})
    train(on_cpu, "efficientad_ast", "fabric", show_progress=False)
    shutil.copytree(tmp_path / "cpu", tmp_path / "gpu")
    _, on_gpu = _config(synthetic_fabric, tmp_path / "gpu", {"models": ["efficientad_ast"], "run.device": "cuda"})
    results = {name: evaluate_category(config, "efficientad_ast", "fabric", show_progress=False)
               for name, config in (("cpu", on_cpu), ("gpu", on_gpu))}
    assert results["gpu"]["compute"]["compute_capability"] is not None
    for metric in ("image_auroc", "pixel_auroc", "au_pro", "val_synthetic_image_auroc"):
        assert results["gpu"]["metrics"][metric] == pytest.approx(results["cpu"]["metrics"][metric],
                                                                  abs=METRIC_TOLERANCE), metric
    for tiff in sorted((model_dir(on_cpu, "efficientad_ast") / "maps").rglob("*.tiff")):
        cpu_map = tifffile.imread(tiff)
        gpu_map = tifffile.imread(model_dir(on_gpu, "efficientad_ast") / tiff.relative_to(model_dir(on_cpu,
                                                                                                   "efficientad_ast")))
        spread = max(float(cpu_map.max() - cpu_map.min()), 1e-12)
        assert np.abs(gpu_map - cpu_map).max() <= MAP_TOLERANCE * spread, tiff


def test_the_local_executor_runs_stages_on_the_gpu(synthetic_fabric, tmp_path):
    """submitit's local executor hides every GPU from a job that asks for none: each chain must
    be given its own."""
    path, config = _config(synthetic_fabric, tmp_path / "run", {"models": ["padim"], "padim.dims": 16,
                                                                "run.device": "auto"})
    out = subprocess.run([sys.executable, "jobs/run_all.py", "--config", str(path), "--executor", "local",
                          "--poll", "1"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    metrics = json.loads((model_dir(config, "padim") / "results" / "fabric" / "metrics.json").read_text())
    assert metrics["device"].startswith("cuda") and metrics["compute"]["compute_capability"] is not None
