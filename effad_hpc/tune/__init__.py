"""Ray Tune sweeps: sweep files (``space``), one trial (``trial``), the search and its outputs
(``sweep``, ``outputs``). Importing this package does not import Ray (a Slurm job must set Ray's
environment, e.g. its auth token, before Ray is imported)."""

from __future__ import annotations

from pathlib import Path

from effad_hpc.config import ExperimentConfig


def sweep_dir(config: ExperimentConfig, spec_path: Path) -> Path:
    """``<run.out_dir>/sweeps/<sweep file name>/``."""
    return config.run.out_dir / "sweeps" / Path(spec_path).stem
