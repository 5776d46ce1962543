"""Typed results of `monitor evaluate`: what `evaluation.json` holds, field for field.

A figure that could not be estimated is `None` (JSON null) with a sentence in `notes` saying
why. `Evaluation.per_workload` is room for results per workload (empty today).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stabilitybench.metrics.serialize import load_json_as
from stabilitybench.monitor.alarms import AlarmStats

MONITOR_DIR = "monitor"
EVALUATION_FILE = "evaluation.json"


@dataclass
class DetectorResult(AlarmStats):
    """One detector at the calibrated threshold (the AlarmStats fields), plus its AUROC and
    the same alarm statistics for its own native rule."""

    auroc: float | None = None
    auroc_ci: list[float] | None = None
    calibration: str | None = None  # "held-out seeds" or "in-sample (one baseline seed)"
    threshold_median: float | None = None
    native: AlarmStats | None = None


@dataclass
class Evaluation:
    """The `monitor evaluate --json` document."""

    target_false_alarms_per_1k: float
    n_collapsed: int
    n_recovered: int
    n_baseline: int
    n_unjudged: int
    n_unscored: int
    latent_dim: int | None
    detectors: dict[str, DetectorResult] = field(default_factory=dict)
    seed: int = 0  # of the AUROC bootstrap
    notes: list[str] = field(default_factory=list)
    per_workload: dict[str, dict[str, DetectorResult]] = field(default_factory=dict)


def evaluation_path(root: str | Path) -> Path:
    return Path(root) / MONITOR_DIR / EVALUATION_FILE


def load_evaluation(root: str | Path) -> Evaluation:
    """The evaluation last written for an audit folder (for the report)."""
    return load_json_as(
        Evaluation, evaluation_path(root), "run `stabilitybench monitor evaluate DIR`"
    )
