"""Leaderboards: metrics.json of one or more runs -> CSV, Markdown and plots, beside published numbers."""

from effad_hpc.leaderboard.build import (
    Leaderboard,
    LeaderboardError,
    MetricsWarning,
    build_leaderboard,
    write_leaderboard,
)
from effad_hpc.leaderboard.published import published_rows, published_values

__all__ = ["Leaderboard", "LeaderboardError", "MetricsWarning", "build_leaderboard", "published_rows",
           "published_values", "write_leaderboard"]
