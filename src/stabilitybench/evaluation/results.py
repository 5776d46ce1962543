"""Typed results of `monitor evaluate`: what `evaluation.json` holds, field for field.

A figure that could not be estimated is `None` (JSON null) with a sentence in `notes` saying
why; a number's place never holds text. Results are per workload and macro-averaged over
workloads (never pooled across them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stabilitybench.metrics.serialize import load_json_as

MONITOR_DIR = "monitor"
NO_VALUE = "no workload has a value"  # a macro note
EVALUATION_FILE = "evaluation.json"

# The numeric fields of a DetectorResult that the macro average takes the mean of.
MACRO_FIELDS = (
    "event_recall",
    "lead_time_median",
    "false_alarms_per_1k",
    "false_alarms_per_1k_not_collapsed",
    "auroc",
    "outcome_auroc",
)


@dataclass
class DetectorResult:
    """One detector on one workload (or macro-averaged over workloads) at the calibrated
    thresholds, under the prospective-warning protocol with horizon H."""

    event_recall: float | None = None  # collapses with a true warning / collapses with room for one
    lead_time_median: float | None = None  # collapse step − first true warning (optimizer steps)
    lead_time_iqr: list[float] | None = None  # [q25, q75]
    false_alarms_per_1k: float | None = None  # on healthy runs of held-out seeds
    false_alarms_per_1k_not_collapsed: float | None = None  # on judged runs that did not collapse
    auroc: float | None = None  # step AUROC of "collapse within H"
    auroc_ci: list[float] | None = None  # bootstrap over runs, 95%
    outcome_auroc: float | None = None  # onset-window score, collapsed vs not (runs with an onset)
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


@dataclass
class WorkloadResult:
    """One workload: its run counts and every detector's result."""

    n_collapsed: int
    n_not_collapsed: int
    n_healthy: int
    detectors: dict[str, DetectorResult] = field(default_factory=dict)
    # the workload's warning settings (the spec's `warning`, or the command line's)
    horizon: int | None = None
    target_false_alarms_per_1k: float | None = None


@dataclass
class Protocol:
    """How the figures were made (the `protocol` object of the JSON)."""

    horizon_unit: str = "optimizer steps"
    alarm: str = "an up-crossing of the detector's calibrated threshold"
    true_warning: str = "an alarm at step t with the run's collapse in (t, t + horizon]"
    calibration: str = (
        "per workload and held-out seed: the smallest threshold with at most the target false "
        "alarms per 1,000 steps on the healthy runs of the other seeds"
    )
    no_lead_steps: int = 1  # a collapse this close to its perturbation's onset allows no lead
    bootstrap_reps: int = 2000
    seed: int = 0  # of the bootstrap, so an evaluation is reproducible
    macro: str = (
        "the mean over workloads with a value; lead_time_iqr the mean of the quartiles; auroc_ci "
        "the percentiles of the mean of the workloads' bootstrap draws"
    )
    latent_dim: int | None = None
    n_unscored: int = 0  # finished runs without scores.parquet
    n_guarded: int = 0  # guarded runs, left out (a guard changes the run)
    n_unjudged: int = 0  # unhealthy runs without a collapse verdict
    no_lead_possible: dict[str, int] = field(default_factory=dict)  # per workload
    notes: list[str] = field(default_factory=list)


@dataclass
class Evaluation:
    """The `monitor evaluate --json` document."""

    target_false_alarms_per_1k: float
    horizon: int
    protocol: Protocol = field(default_factory=Protocol)
    workloads: dict[str, WorkloadResult] = field(default_factory=dict)
    detectors: dict[str, DetectorResult] = field(default_factory=dict)  # macro-averaged


def evaluation_path(root: str | Path) -> Path:
    return Path(root) / MONITOR_DIR / EVALUATION_FILE


def load_evaluation(root: str | Path) -> Evaluation:
    """The evaluation last written for an audit folder (for the report)."""
    return load_json_as(
        Evaluation, evaluation_path(root), "run `stabilitybench monitor evaluate DIR`"
    )
