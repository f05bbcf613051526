"""Metric values that cannot be right (NaN, an AUROC above 1, a string, a negative latency) skip their
metrics.json with a warning naming the file and the metric; the other rows are still produced."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from effad_hpc.leaderboard import MetricsWarning, build_leaderboard

from tests.conftest import REPO


def _metrics(run: Path, category: str, **metrics) -> Path:
    path = run / "efficientad_ast" / "results" / category / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({  # json.dumps writes NaN as `NaN`, which json.loads reads back
        "schema_version": 1, "model": "efficientad_ast", "category": category, "dataset": "mvtec_ad",
        "layout": "mvtec_ad", "created_at": "2026-01-01T00:00:00+00:00", "metrics": metrics,
    }))
    return path


IMPOSSIBLE = [
    pytest.param("image_auroc", float("nan"), "not finite", id="nan"),
    pytest.param("image_auroc", 7.5, "outside [0, 1]", id="auroc-7.5"),
    pytest.param("pixel_f1", "0.9", "not a number (str)", id="string"),
    pytest.param("latency_ms", -1, "negative", id="negative-latency"),
    pytest.param("au_spro_0.05_mean", float("inf"), "not finite", id="infinite"),
    pytest.param("best_epoch_student", True, "not a number (bool)", id="bool"),
]


@pytest.mark.parametrize(("metric", "value", "reason"), IMPOSSIBLE)
def test_an_impossible_value_skips_the_file_with_a_warning(tmp_path, metric, value, reason):
    good = _metrics(tmp_path / "run", "carpet", image_auroc=0.9, latency_ms=3.0)
    bad = _metrics(tmp_path / "run", "bottle", **{"image_auroc": 0.8, metric: value})
    with pytest.warns(MetricsWarning) as caught:
        board = build_leaderboard([tmp_path / "run"])
    assert [str(w.message) for w in caught] == [f"{bad}: skipped, metric {metric} = {value!r}: {reason}"]
    assert [row["category"] for row in board.rows] == ["carpet"] and good.is_file()


def test_possible_values_are_kept(tmp_path, recwarn):
    _metrics(tmp_path / "run", "bottle", image_auroc=1, pixel_auroc=0.0, oracle_pixel_threshold=-3.5,
             latency_ms=0.0, throughput_ips=120.0, best_epoch_student=7, au_pro=None)
    (row,) = build_leaderboard([tmp_path / "run"]).rows
    assert (row["image_auroc"], row["oracle_pixel_threshold"], row["best_epoch_student"]) == (1, -3.5, 7)
    assert not [w for w in recwarn if issubclass(w.category, MetricsWarning)]


def test_cli_skips_impossible_values_and_keeps_the_other_rows(tmp_path):
    _metrics(tmp_path / "run", "carpet", image_auroc=0.9)
    _metrics(tmp_path / "run", "grid", image_auroc=0.7)
    nan = _metrics(tmp_path / "run", "bottle", image_auroc=float("nan"))
    text = _metrics(tmp_path / "run", "wood", pixel_auroc="high")
    out = subprocess.run([sys.executable, "-m", "effad_hpc", "leaderboard", str(tmp_path / "run"),
                          "--out", str(tmp_path / "board")], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"effad-hpc: warning: {nan}: skipped, metric image_auroc = nan: not finite" in out.stderr
    assert f"effad-hpc: warning: {text}: skipped, metric pixel_auroc = 'high': not a number (str)" in out.stderr
    assert "Traceback" not in out.stderr and "2 rows;" in out.stdout
    rows = (tmp_path / "board" / "leaderboard.csv").read_text().splitlines()[1:]
    assert [row.split(",")[3] for row in rows] == ["carpet", "grid"]
