"""Shared fixtures: small synthetic data sets, tiny configs, and a real one-node Slurm cluster."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from effad_hpc.config import ExperimentConfig, SyntheticConfig, load_config, parse_config
from effad_hpc.data.synthetic import generate

REPO = Path(__file__).resolve().parents[1]
SMALL = SyntheticConfig(seed=3, size=64, num_train=8, num_validation=3, num_test_good=3, num_test_per_defect=2)


@pytest.fixture(scope="session")
def synthetic_ad(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "mvtec_ad"
    generate("ad", root, ["fabric", "grid", "washer"], SMALL)
    return root


@pytest.fixture(scope="session")
def synthetic_loco(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "mvtec_loco"
    generate("loco", root, None, SMALL)
    return root


def tiny_config_dict(data_root: Path, out_dir: Path, layout: str = "mvtec_ad") -> dict:
    return {
        "name": "tiny",
        "seed": 0,
        "data": {"layout": layout, "root": str(data_root), "image_size": 64, "validation_fraction": 0.25},
        "backbone": {"name": "tf_efficientnet_lite0", "layers": ["blocks.2", "blocks.4"]},
        "features": {"dtype": "float32", "compression": "gzip", "shards": 2, "batch_size": 4},
        "run": {"out_dir": str(out_dir), "device": "cpu"},
        "validation_anomalies": {"count": 20},  # the default 100 makes choices; tests check the mechanics
    }


def apply_changes(raw: dict, changes: dict | None) -> dict:
    """Set dotted keys (``"student.epochs": 2``) in a raw config mapping."""
    for dotted, value in (changes or {}).items():
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return raw


def tiny_config(data_root: Path, out_dir: Path, changes: dict | None = None) -> ExperimentConfig:
    return parse_config(apply_changes(tiny_config_dict(data_root, out_dir), changes), "tiny config")


@pytest.fixture
def make_config(tmp_path, synthetic_ad):
    """Write a tiny config YAML (with optional changes) and return (path, loaded config)."""

    def make(changes: dict | None = None, data_root: Path | None = None, layout: str = "mvtec_ad",
             overrides: tuple[str, ...] = ()) -> tuple[Path, ExperimentConfig]:
        raw = apply_changes(tiny_config_dict(data_root or synthetic_ad, tmp_path / "run", layout), changes)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path, load_config(path, overrides)

    return make


# --- a real one-node Slurm cluster -----------------------------------------------------------


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Start `slurm/cluster.sh up` once per session; always brought down at the end.

    Outside CI a machine that cannot run the cluster (not root, no apt) skips the Slurm tests
    with the reason; in CI (CI=true) that is a failure.
    """
    in_ci = os.environ.get("CI") == "true"
    reason = None
    if os.geteuid() != 0:
        reason = "the one-node Slurm cluster must be started as root"
    elif shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        reason = "Slurm is not installed and apt-get is not available to install it"
    if reason:
        if in_ci:
            pytest.fail(f"Slurm cluster unavailable in CI: {reason}")
        pytest.skip(reason)

    folder = tmp_path_factory.mktemp("slurm")
    script = REPO / "slurm" / "cluster.sh"

    def down() -> None:
        subprocess.run(["bash", str(script), "down", str(folder)], capture_output=True, timeout=120)

    def down_on_sigterm(signum, frame):  # a CI time-out or kill: no daemon may outlive the session
        down()
        raise SystemExit(128 + signum)

    previous_handler = signal.signal(signal.SIGTERM, down_on_sigterm)
    up = subprocess.run(["bash", str(script), "up", str(folder)], capture_output=True, text=True, timeout=600)
    try:
        if up.returncode != 0:
            message = f"slurm/cluster.sh up failed:\n{up.stdout}\n{up.stderr}"
            if in_ci:
                pytest.fail(message)
            pytest.skip(message)
        conf = str(folder / "etc" / "slurm.conf")
        previous = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = conf  # submitit's sbatch/sacct/scancel calls inherit it
        yield {"dir": folder, "slurm_conf": conf}
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
    finally:
        down()
        signal.signal(signal.SIGTERM, previous_handler)


@pytest.fixture(scope="session")
def synthetic_fabric(tmp_path_factory) -> Path:
    """One texture category with enough images for a trained model to be judged on."""
    root = tmp_path_factory.mktemp("data") / "fabric_128"
    generate("ad", root, ["fabric"], SyntheticConfig(seed=5, size=128, num_train=24, num_validation=3,
                                                     num_test_good=8, num_test_per_defect=3))
    return root
