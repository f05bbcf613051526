"""Leaderboards from small golden metrics sets: exact CSV contents, merge rules, published rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from effad_hpc.leaderboard import (
    LeaderboardError,
    MetricsWarning,
    build_leaderboard,
    published_values,
    write_leaderboard,
)

from tests.conftest import REPO


PAPER_LENGTHS = {"teacher": {"trained": 240, "paper": 240, "unit": "epochs"},
                 "student_ae": {"trained": 100, "paper": 100, "unit": "epochs"}}
SHORT_STUDENT = PAPER_LENGTHS | {"student_ae": {"trained": 20, "paper": 100, "unit": "epochs"}}


CPU = {"device_name": "Xeon", "precision": "float32"}
V100 = {"device_name": "Tesla V100-SXM2-16GB", "precision": "float16"}


def _metrics(run: Path, model: str, category: str, created: str, validation: float, budget=PAPER_LENGTHS,
             compute=CPU, **metrics) -> Path:
    path = run / model / "results" / category / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "schema_version": 1, "key": "k", "model": model, "category": category, "dataset": "mvtec_ad",
        "layout": "mvtec_ad", "run_name": run.name, "config_hash": f"h-{run.name}", "code_version": "0.1.0",
        "created_at": created, "metrics": metrics, "budget": budget, "compute": compute,
        "training": {"teacher": {"best_validation": 0.1}, "student_ae": {"best_validation": validation}},
    }))
    return path


@pytest.fixture
def two_runs(tmp_path):
    first, second = tmp_path / "run1", tmp_path / "run2"
    _metrics(first, "efficientad_ast", "bottle", "2026-01-01T00:00:00+00:00", 0.5,
             image_auroc=0.9, pixel_auroc=0.8, train_seconds_total=10.0, latency_ms=20.0)
    _metrics(first, "efficientad_ast", "carpet", "2026-01-01T00:00:00+00:00", 0.5,
             image_auroc=1.0, pixel_auroc=0.7, train_seconds_total=20.0, latency_ms=20.0)
    _metrics(second, "efficientad_ast", "bottle", "2026-02-01T00:00:00+00:00", 0.9, SHORT_STUDENT, V100,
             image_auroc=0.95, pixel_auroc=0.85, train_seconds_total=30.0, latency_ms=2.0)
    return first, second


HEADER = ("dataset,model,variant,category,category_type,trial,source,budget,run_id,config_hash,code_version,created_at,"
          "image_auroc,device,precision,latency_ms,pixel_auroc,pixel_rule,train_seconds_total\n")
CARPET = ("mvtec_ad,efficientad_ast,paper,carpet,texture,,measured,paper,run1,h-run1,0.1.0,2026-01-01T00:00:00+00:00,"
          "1,Xeon,float32,20,0.7,quantile,20\n")


def test_latest_rule_gives_the_exact_csvs(two_runs, tmp_path):
    board = build_leaderboard(two_runs, "latest")
    write_leaderboard(board, tmp_path / "out")
    assert (tmp_path / "out" / "leaderboard.csv").read_text() == HEADER + (
        "mvtec_ad,efficientad_ast,paper,bottle,object,,measured,reduced: student_ae 20/100 epochs,run2,h-run2,0.1.0,"
        "2026-02-01T00:00:00+00:00,0.95,Tesla V100-SXM2-16GB,float16,2,0.85,quantile,30\n"
    ) + CARPET
    # The mean latency mixes a GPU and a CPU result: the summary names both devices beside it.
    assert (tmp_path / "out" / "leaderboard_summary.csv").read_text() == (
        "dataset,model,variant,source,budget,categories,image_auroc,pixel_auroc,device,precision,latency_ms,"
        "texture_image_auroc,texture_pixel_auroc,object_image_auroc,object_pixel_auroc,train_seconds_total\n"
        "mvtec_ad,efficientad_ast,paper,measured,mixed,2,0.975,0.775,Tesla V100-SXM2-16GB; Xeon,float16; float32,11,"
        "1,0.7,0.95,0.85,50\n")
    assert len(board.merged) == 1 and "mvtec_ad/efficientad_ast/paper/bottle: 2 results" in board.merged[0]
    assert "rule: latest" in board.merged[0]
    markdown = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "| mvtec_ad | efficientad_ast | paper | measured | mixed | 2 | 0.9750 |" in markdown
    assert "| bottle | measured | reduced: student_ae 20/100 epochs |" in markdown
    assert (tmp_path / "out" / "auroc_per_category_mvtec_ad.png").stat().st_size > 1000


def test_best_rule_keeps_the_lowest_validation_loss(two_runs, tmp_path):
    board = build_leaderboard(two_runs, "best")
    bottle = next(row for row in board.rows if row["category"] == "bottle")
    assert (bottle["run_id"], bottle["image_auroc"]) == ("run1", 0.9)  # validation 0.5 < 0.9
    assert "rule: best" in board.merged[0]


def test_compare_adds_published_rows_and_deltas(two_runs):
    board = build_leaderboard(two_runs, compare=True)
    bottle = next(r for r in board.rows if r["category"] == "bottle" and r["source"] == "measured")
    assert bottle["delta_image_auroc"] == pytest.approx(0.95 - 0.9825)
    assert bottle["delta_pixel_auroc"] == pytest.approx(0.85 - 0.8746)
    published = [r for r in board.rows if r["source"] == "published"]
    assert {r["model"] for r in published} == {"efficientad_ast", "efficientad_s"}
    assert any(e["source"] == "published" and e["model"] == "patchcore" and e["image_auroc"] == 0.991
               for e in board.summary)


def test_published_rows_match_the_thesis_tables():
    values = {(v.dataset, v.model, v.category, v.metric): v for v in published_values()}
    cited = {
        ("mvtec_ad", "efficientad_ast", "bottle", "pixel_auroc"): (0.8746, "Table 3"),
        ("mvtec_ad", "efficientad_ast", "mean", "image_auroc"): (0.9698, "Table 4"),
        ("mvtec_ad", "efficientad_ast", "toothbrush", "best_epoch_student_ae"): (1, "Table 5"),
        ("mvtec_loco", "efficientad_ast", "breakfast_box", "image_auroc"): (0.4937, "Table 8"),
        ("mvtec_ad", "efficientad_s", "wood", "pixel_auroc"): (0.9563, "Table 15"),
        ("mvtec_loco", "efficientad_s", "mean", "image_auroc"): (0.8925, "Table 17"),
        ("mvtec_ad", "padim", "mean", "pixel_auroc"): (0.979, "Table 16"),
        ("mvtec_loco", "ast", "mean", "auroc_logical_anomalies"): (0.797, "Table 20"),
    }
    for key, (value, table) in cited.items():
        assert values[key].value == pytest.approx(value) and table in values[key].source, key
    # The per-category values average to the means the thesis prints (transcription check).
    for dataset, model, metric in [("mvtec_ad", "efficientad_ast", "pixel_auroc"),
                                   ("mvtec_ad", "efficientad_ast", "image_auroc"),
                                   ("mvtec_ad", "efficientad_s", "image_auroc"),
                                   ("mvtec_loco", "efficientad_ast", "image_auroc"),
                                   ("mvtec_loco", "efficientad_s", "pixel_auroc")]:
        per_category = [v.value for (d, m, c, k), v in values.items()
                        if (d, m, k) == (dataset, model, metric) and c not in ("mean", "textures", "objects")]
        assert len(per_category) == (15 if dataset == "mvtec_ad" else 5)
        assert sum(per_category) / len(per_category) == pytest.approx(values[(dataset, model, "mean", metric)].value,
                                                                      abs=1.5e-4)


def test_malformed_metrics_warn_and_the_rest_is_produced(two_runs, tmp_path):
    broken = two_runs[0] / "ast" / "results" / "bottle" / "metrics.json"
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json")
    partial = two_runs[0] / "ast" / "results" / "carpet" / "metrics.json"
    partial.parent.mkdir(parents=True)
    partial.write_text(json.dumps({"model": "ast", "category": "carpet"}))
    with pytest.warns(MetricsWarning) as caught:
        board = build_leaderboard(two_runs)
    messages = " ".join(str(w.message) for w in caught)
    assert f"{broken}: skipped, not readable JSON" in messages and f"{partial}: skipped, partial" in messages
    assert {row["category"] for row in board.rows} == {"bottle", "carpet"}
    assert {row["model"] for row in board.rows} == {"efficientad_ast"}


def test_empty_input_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LeaderboardError, match="no metrics.json under"):
        build_leaderboard([tmp_path / "empty"])
    out = subprocess.run([sys.executable, "-m", "effad_hpc", "leaderboard", str(tmp_path / "empty")],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "no metrics.json under" in out.stderr


def test_cli_merges_runs_and_prints_the_rule(two_runs, tmp_path):
    out = subprocess.run([sys.executable, "-m", "effad_hpc", "leaderboard", *map(str, two_runs), "--merge", "best",
                          "--out", str(tmp_path / "board"), "--compare"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "merged: mvtec_ad/efficientad_ast/paper/bottle: 2 results" in out.stdout and "rule: best" in out.stdout
    assert (tmp_path / "board" / "leaderboard.md").is_file()


def test_demo_results_are_marked_reduced_and_the_thesis_configs_paper():
    from effad_hpc.config import load_config
    from effad_hpc.evaluation.evaluate import training_budget
    from effad_hpc.leaderboard.build import budget_label

    demo = load_config(REPO / "configs" / "demo.yaml")
    assert "efficientad_s" not in demo.models  # no meaningful point within the demo's minutes
    assert budget_label(training_budget(demo, "efficientad_ast", 200)) == \
        "reduced: teacher 20/240 epochs, student_ae 20/100 epochs"
    assert budget_label(training_budget(demo, "efficientad_s", 200)) == \
        "reduced: distill_s 60/60000 steps, efficientad_s 100/70000 steps"
    assert budget_label(training_budget(demo, "patchcore", 200)) == "paper"  # fitted: no length to fall short of
    for name in ("mvtec_ad", "mvtec_loco"):
        thesis = load_config(REPO / "configs" / f"{name}.yaml", ["imagenet=/data/imagenet"])
        assert {model: budget_label(training_budget(thesis, model, 200)) for model in thesis.models} == {
            model: "paper" for model in thesis.models}


def test_a_changed_method_is_its_own_row_and_summary_beside_the_papers(two_runs, tmp_path):
    path = _metrics(two_runs[1], "efficientad_ast", "carpet", "2026-03-01T00:00:00+00:00", 0.4,
                    image_auroc=0.99, pixel_auroc=0.9)
    record = json.loads(path.read_text())
    path.write_text(json.dumps(record | {"variant": "quantile-normalised maps",
                                         "thresholds": {"pixel_rule": "synthetic_f1"}}))
    board = build_leaderboard(two_runs)
    carpets = {(row["variant"], row["pixel_rule"]): row["image_auroc"] for row in board.rows
               if row["category"] == "carpet"}
    assert carpets == {("paper", "quantile"): 1.0, ("quantile-normalised maps", "synthetic_f1"): 0.99}
    assert {(entry["variant"], entry["categories"]) for entry in board.summary} == {
        ("paper", 2), ("quantile-normalised maps", 1)}
