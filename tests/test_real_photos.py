"""Real photographs end to end: JPEG phone photos (576 x 768, portrait) with human-drawn masks go
through extraction, training and evaluation of PatchCore and EfficientAD-AST by the CLI, and come
out as maps, masks and overlays at the photos' own size. A smoke test of real-photo handling
(sizes, colour, masks); it asserts no score, since eleven images measure nothing (detection
quality on the full set is benchmarks/quality.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import tifffile
import yaml
from PIL import Image

from tests.conftest import REPO, apply_changes, tiny_config_dict

PHOTOS = REPO / "tests" / "data" / "real_cookie"
HEIGHT, WIDTH = 768, 576


def test_real_photos_run_end_to_end_at_their_own_size(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(PHOTOS / "cookie", data / "cookie")
    raw = apply_changes(tiny_config_dict(data, tmp_path / "run"), {
        "models": ["patchcore", "efficientad_ast"], "data.categories": ["cookie"], "data.image_size": 128,
        "data.validation_fraction": 0.34, "evaluation.latency_repeats": 2,
        "teacher.hidden_channels": 32, "teacher.epochs": 2, "teacher.batch_size": 2,
        "student.hidden_channels": 32, "student.residual_blocks": 1, "student.epochs": 2, "student.batch_size": 2,
        "student.map_normalization": "quantile", "validation_anomalies.count": 4})
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, "jobs/run_all.py", "--config", str(path), "--executor", "debug"],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    for model in ("patchcore", "efficientad_ast"):
        results = tmp_path / "run" / model
        metrics = json.loads((results / "results" / "cookie" / "metrics.json").read_text())
        assert metrics["counts"]["test"] == 5 and metrics["counts"]["defective"] == 3
        assert metrics["counts"]["validation"] == 2
        for name in ("image_auroc", "pixel_auroc", "au_pro", "val_synthetic_au_pro"):
            assert 0 <= metrics["metrics"][name] <= 1, (model, name)
        tiffs = sorted((results / "maps" / "cookie" / "test").glob("*/*.tiff"))
        assert len(tiffs) == 5
        for tiff in tiffs:
            anomaly_map = tifffile.imread(tiff)
            assert anomaly_map.shape == (HEIGHT, WIDTH) and anomaly_map.dtype == np.float32
            assert np.isfinite(anomaly_map).all() and anomaly_map.std() > 0
        masks = sorted((results / "masks" / "cookie" / "test").glob("*/*.png"))
        overlays = sorted((results / "overlays" / "cookie" / "test").glob("*/*.png"))
        assert len(masks) == len(overlays) == 5
        for mask in masks:
            with Image.open(mask) as image:
                assert image.size == (WIDTH, HEIGHT) and set(np.unique(np.asarray(image))) <= {0, 255}
        for overlay in overlays:
            with Image.open(overlay) as image:
                assert image.size == (WIDTH, HEIGHT) and image.mode == "RGB"
