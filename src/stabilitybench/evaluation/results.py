"""Typed results of `monitor evaluate`: what `evaluation.json` holds, field for field.

A figure that could not be estimated is `None` (JSON null) with a sentence in `notes` saying
why; a number's place never holds text. Results are per workload and macro-averaged over
workloads (never pooled across them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stabilitybench.evaluation.manifold import ManifoldResult
from stabilitybench.metrics.serialize import load_json_as

MONITOR_DIR = "monitor"
NO_VALUE = "no workload has a value"  # a macro note
EVALUATION_FILE = "evaluation.json"

# The numeric fields of a DetectorResult that the macro average takes the mean of.
MACRO_FIELDS = (
    "event_recall",
    "chance_recall",
    "chance_recall_p95",
    "clock_recall",
    "lead_time_median",
    "false_alarms_per_1k",
    "false_alarms_per_1k_not_collapsed",
    "false_alarms_per_1k_collapsed",
    "false_alarms_per_1k_sham",
    "time_in_warning",
    "auroc",
    "outcome_auroc",
    "outcome_auroc_doses",
)


@dataclass
class DetectorResult:
    """One detector on one workload (or macro-averaged over workloads) at the calibrated
    thresholds, under the alarm-episode protocol (SPH, SOP = horizon)."""

    event_recall: float | None = None  # collapses with a true alarm / collapses with room for one
    chance_recall: float | None = (
        None  # a random predictor with the same alarm rate and warning time
    )
    chance_recall_p95: float | None = None  # 95th percentile of the recall of shifted alarms
    clock_recall: float | None = None  # the clock control, per perturbation at the same FA
    lead_time_median: float | None = None  # collapse start − start of the first true episode
    lead_time_iqr: list[float] | None = None  # [q25, q75]
    false_alarms_per_1k: float | None = None  # on healthy runs of held-out seeds
    false_alarms_per_1k_not_collapsed: float | None = None  # hard negatives, after onset
    false_alarms_per_1k_sham: float | None = None  # the sham arm, after onset
    false_alarms_per_1k_collapsed: float | None = None  # collapsed runs, not true, before collapse
    time_in_warning: float | None = None  # share of healthy runs' steps inside an episode
    auroc: float | None = None  # step AUROC of "an alarm here would be true"
    auroc_ci: list[float] | None = None  # bootstrap over seeds, 95%
    outcome_auroc: float | None = None  # onset-window score, collapsed vs not (runs with an onset)
    outcome_auroc_doses: float | None = None  # the same between doses of one perturbation only
    n_collapses: int = 0  # collapses with room for a warning (event recall's denominator)
    n_no_lead_possible: int = 0  # collapses that began less than SPH after their onset
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
    horizon: int | None = None  # SOP
    target_false_alarms_per_1k: float | None = None
    sph: int | None = None
    gap: int | None = None
    manifold: ManifoldResult | None = None  # how low-dimensional its healthy telemetry is


@dataclass
class Protocol:
    """How the figures were made (the `protocol` object of the JSON); `horizon`, `sph`, `sop`,
    `gap` and `target_false_alarms` are the audit's, each workload records its own."""

    horizon: int = 100  # optimizer steps (= sop)
    sph: int = 10  # optimizer steps: the least useful lead
    sop: int = 100
    gap: int = 5  # below-threshold steps merged inside an episode
    target_false_alarms: float = 1.0  # per 1,000 steps on held-out healthy runs
    horizon_unit: str = "optimizer steps"
    alarm: str = (
        "an alarm episode (score >= threshold, gaps of at most `gap` steps merged) raises an "
        "alarm when it starts and again every `sop` steps while it stays on"
    )
    true_warning: str = (
        "an alarm at step t whose run's collapse starts in [t + sph, t + sph + sop]; the collapse "
        "start is the dense collapse step, or the evaluation before the one that first showed "
        "the drop (clipped at the onset) when only evaluations time it"
    )
    lead: str = "collapse start − the start of the episode that holds the first true alarm"
    calibration: str = (
        "per workload and held-out seed: the smallest threshold at which it and every stricter "
        "one give at most the target alarms per 1,000 steps (episode starts and renewals) on "
        "the healthy runs of the other seeds"
    )
    chance: str = (
        "chance_recall: 1 − (1 − w)·exp(−λ·sop), w the detector's time in warning and λ its "
        "episode starts per step out of warning, both on the collapsed runs before collapse; "
        "chance_recall_p95: the 95th percentile of the recall with each run's alarms shifted "
        "circularly at random before its collapse"
    )
    clock: str = (
        "clock_recall: the `clock` control, per perturbation (its kind and parameters, not its "
        "dose) the best schedule that knows only "
        "the onset (k alarms from d steps after it, one every sop; k unbounded: it stays on) "
        "among those whose false alarms per 1,000 post-onset steps on that perturbation's hard "
        "negatives (its runs that did not collapse, the sham arm not among them) are at most "
        "the detector's own there; a collapse of a perturbation "
        "without hard negatives counts as warned (knowing the perturbation predicts it); the "
        "recall over every collapse with room, null without any hard negative"
    )
    doses: str = (
        "outcome_auroc_doses: the outcome AUROC among runs of one perturbation kind given at "
        "several doses of which some collapse and some do not (null where the audit has none)"
    )
    auroc: str = (
        "step AUROC: positives are the steps of collapsed runs where an alarm would be true; "
        "negatives the post-onset steps of perturbed runs (sham included) that did not collapse "
        "and the healthy "
        "runs' steps from the earliest onset on; bootstrap over seeds"
    )
    no_lead_steps: int = 1  # a collapse this close to its perturbation's onset allows no lead
    bootstrap_reps: int = 2000
    surrogate_draws: int = 1000
    seed: int = 0  # of the bootstrap and the surrogates, so an evaluation is reproducible
    macro: str = (
        "the mean over workloads with a value; lead_time_iqr the mean of the quartiles; auroc_ci "
        "the percentiles of the mean of the workloads' bootstrap draws"
    )
    latent_dim: int | None = None
    n_unscored: int = 0  # finished runs without scores.parquet
    n_guarded: int = 0  # guarded runs, left out (a guard changes the run)
    n_unjudged: int = 0  # unhealthy runs without a collapse verdict
    n_flagged_healthy: int = 0  # healthy runs the collapse criterion flags: left out
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
