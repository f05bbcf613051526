"""The command line as a user runs it: real subprocesses."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from effad_hpc.data import read_category
from effad_hpc.features import FeatureDataset
from effad_hpc.training import read_log, read_record

REPO = Path(__file__).resolve().parents[1]


def run(*args, cwd=REPO):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_config_prints_resolved_config_with_hash():
    out = run("-m", "effad_hpc", "config", "--config", "configs/demo.yaml", "features.shards=3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("# config hash: ")
    assert yaml.safe_load(out.stdout)["features"]["shards"] == 3


def test_bad_input_exits_2_with_one_named_message(tmp_path):
    out = run("-m", "effad_hpc", "config", "--config", "configs/demo.yaml", "data.colour=red")
    assert out.returncode == 2
    assert "data.colour: unknown key" in out.stderr and "Traceback" not in out.stderr
    out = run("-m", "effad_hpc", "synth", "--layout", "ad", "--out", str(tmp_path), "--categories", "carpet")
    assert out.returncode == 2 and "unknown synthetic ad categories ['carpet']" in out.stderr
    out = run("-m", "effad_hpc", "train", "--config", "configs/demo.yaml", "--model", "patchcorex")
    assert out.returncode == 2 and "model 'patchcorex' is not known; known models: ast, efficientad_ast" in out.stderr


def test_synth_writes_readable_layouts(tmp_path):
    for layout, name, reader_layout in (("ad", "bottle", "mvtec_ad"), ("loco", "parts_tray", "mvtec_loco")):
        out = run("-m", "effad_hpc", "synth", "--layout", layout, "--out", str(tmp_path / layout),
                  "--categories", name, "--size", "48", "--num-train", "3", "--num-test-per-defect", "1")
        assert out.returncode == 0, out.stderr
        data = read_category(tmp_path / layout / name, reader_layout)
        assert len(data.samples("test")) > 0


def test_run_all_in_process_generates_data_extracts_trains_and_evaluates(tmp_path):
    config = {
        "name": "cli", "data": {"layout": "mvtec_loco", "root": str(tmp_path / "data"), "image_size": 64,
                                "synthetic": {"size": 48, "num_train": 4, "num_validation": 2,
                                              "num_test_good": 2, "num_test_per_defect": 1}},
        "teacher": {"hidden_channels": 16, "epochs": 1},
        # select_by: the jobs score every validation pass on the synthetic-anomaly set.
        "student": {"hidden_channels": 16, "residual_blocks": 1, "epochs": 2, "select_by": "val_synthetic_mean"},
        "validation_anomalies": {"count": 10},
        "evaluation": {"latency_repeats": 2},
        "run": {"out_dir": str(tmp_path / "run"), "device": "cpu"},
    }
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(config))
    out = run("jobs/run_all.py", "--config", str(path), "--executor", "debug")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 job(s) submitted to debug" in out.stdout
    for category in ("parts_tray", "pin_board"):
        assert len(FeatureDataset(tmp_path / "run" / "features" / category, "validation")) == 2
        assert (tmp_path / "run" / "train" / category / "student_ae" / "model.pt").is_file()
        record = read_record(tmp_path / "run" / "train" / category / "student_ae")
        log = read_log(tmp_path / "run" / "train" / category / "student_ae")
        assert record.selected_by == "val_synthetic_mean" and len(log) == 2
        assert record.best_selected == max(float(row["val_synthetic_mean"]) for row in log)
        metrics = json.loads((tmp_path / "run" / "efficientad_ast" / "results" / category / "metrics.json").read_text())
        assert metrics["dataset"] == "synthetic_data" and metrics["layout"] == "mvtec_loco"
        assert metrics["variant"] == "selected by val_synthetic_mean"
        assert "au_spro_0.05_mean" in metrics["metrics"]
    assert (tmp_path / "run" / "config.yaml").read_text().startswith("# config hash: ")


def test_one_cache_dir_on_the_command_line_serves_every_backbone(tmp_path, synthetic_ad):
    """configs/mvtec_ad.yaml gives PatchCore its own WideResNet-50: `backbone.cache_dir=` is where
    it looks too (the README's prefetch-then-submit recipe), and the error says so."""
    cache = tmp_path / "hf-cache"
    out = run("-m", "effad_hpc", "train", "--config", "configs/mvtec_ad.yaml", "--model", "patchcore",
              "--category", "fabric", f"data.root={synthetic_ad}", f"run.out_dir={tmp_path / 'run'}",
              f"backbone.cache_dir={cache}", "run.device=cpu")
    assert out.returncode == 2, out.stderr
    assert "wide_resnet50_2" in out.stderr and str(cache) in out.stderr and "effad-hpc prefetch" in out.stderr
