"""Evaluation: official-equivalent metrics, thresholds from validation data, maps, masks and plots."""

from effad_hpc.evaluation.evaluate import (
    METRICS,
    SCHEMA_VERSION,
    evaluate_category,
    model_dir,
    read_metrics,
    results_dir,
    sample_output,
)

__all__ = ["METRICS", "SCHEMA_VERSION", "evaluate_category", "model_dir", "read_metrics", "results_dir",
           "sample_output"]
