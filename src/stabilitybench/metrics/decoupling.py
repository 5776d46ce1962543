"""Finding 1: is final performance decoupled from training stability? One rule, which `summary`
and `findings` both report.

The stability score is `stability_before_final`: measured on the evaluations *before* the final
window that final performance averages, so the two are not read off the same points of a curve.
Spearman rho between the two, both ranked within each perturbation (a perturbation that lowers
both cannot make them look coupled), with a percentile bootstrap 95 % CI. Decoupling is
*supported* only on positive evidence: both quantities must differ between the workload's
conditions (knobs × perturbation) beyond seed noise (Kruskal–Wallis p < 0.05 each: otherwise
there is no signal to be coupled or not, and the verdict is *inconclusive*), and the CI's upper
bound must lie below 0.5; a lower bound above 0.5 is *not supported* (coupled).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from stabilitybench.metrics.intervals import spearman_ci
from stabilitybench.metrics.records import RunRecord
from stabilitybench.metrics.stability import within_group_rank

METHOD = (
    "spearman(final_perf, stability_before_final), both ranked within each perturbation, "
    "percentile bootstrap 95% CI; decoupled only if both differ between conditions "
    "(Kruskal-Wallis p < 0.05) and the CI's upper bound is below 0.5; pooled: ranked within "
    "each workload and perturbation"
)
SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
DECOUPLED_BELOW = 0.5  # the rho CI's upper bound below this → decoupled
MIN_RUNS = 10
SIGNAL_P = 0.05  # Kruskal–Wallis across conditions: below this, a quantity carries signal


@dataclass
class WorkloadCorrelation:
    """Claim 1's figures on one workload (or pooled over workloads)."""

    workload: str
    n: int
    rho: float | None
    ci: list[float | None]
    signal_p: float | None  # the larger Kruskal–Wallis p of stability and final perf
    verdict: str  # supported | not supported | inconclusive
    reason: str


@dataclass
class Decoupling:
    """Claim 1 per workload and pooled (ranks within each workload)."""

    pooled: WorkloadCorrelation
    per_workload: list[WorkloadCorrelation] = field(default_factory=list)
    method: str = METHOD


def usable(records: Sequence[RunRecord]) -> list[RunRecord]:
    """Finished runs with a final performance (−inf: diverged) and a stability score."""
    return [
        r
        for r in records
        if r.done
        and r.final_perf is not None
        and not math.isnan(r.final_perf)
        and r.stability_before_final is not None
    ]


def signal_p(records: Sequence[RunRecord]) -> float | None:
    """The larger of the Kruskal–Wallis p-values of stability and of final performance across
    the runs' conditions (workload, knobs, perturbation); None with fewer than 2 conditions of
    2 runs, or when a quantity is constant."""
    from scipy import stats

    groups: dict[tuple[str, str, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.workload, r.knobs_key, r.perturbation), []).append(r)
    sets = [g for g in groups.values() if len(g) >= 2]
    if len(sets) < 2:
        return None
    worst = 0.0
    for values in (
        [[float(r.stability_before_final or 0.0) for r in g] for g in sets],
        [[float(r.final_perf or 0.0) for r in g] for g in sets],
    ):
        flat = np.concatenate([np.asarray(v) for v in values])
        if np.all(flat == flat[0]):
            return None
        parts = [np.asarray(v) for v in values]  # ranks: -inf (diverged) is simply the worst
        worst = max(worst, float(stats.kruskal(*parts).pvalue))
    return worst


def verdict(
    n: int, rho: float | None, ci: Sequence[float | None], p: float | None
) -> tuple[str, str]:
    """Claim 1's rule (module docstring): (verdict, the figure that decided it)."""
    if n < MIN_RUNS or rho is None or ci[0] is None or ci[1] is None:
        return INCONCLUSIVE, f"{n} runs with a usable rho (need {MIN_RUNS})"
    text = f"rho {rho:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"
    if p is None or p >= SIGNAL_P:
        where = "no" if p is None else f"p = {p:.2f}:"
        return INCONCLUSIVE, (
            f"{text}, but {where} no difference between conditions beyond seed noise in "
            "stability or final performance: nothing to be decoupled"
        )
    if ci[1] < DECOUPLED_BELOW:
        return SUPPORTED, f"{text}: CI below {DECOUPLED_BELOW}"
    if ci[0] > DECOUPLED_BELOW:
        return NOT_SUPPORTED, f"{text}: coupled, CI above {DECOUPLED_BELOW}"
    return INCONCLUSIVE, f"{text}: CI spans {DECOUPLED_BELOW}"


def correlate(
    name: str,
    records: Sequence[RunRecord],
    rng: np.random.Generator,
    reps: int,
    *,
    by_workload: bool = False,
) -> WorkloadCorrelation:
    """Claim 1 on these runs: rho of the within-group ranks (groups: perturbation, and the
    workload too when `by_workload`), its CI, the signal test and the verdict."""
    runs = usable(records)
    groups = [f"{r.workload}/{r.perturbation}" if by_workload else r.perturbation for r in runs]
    perf = np.array([r.final_perf for r in runs], dtype=float)
    score = np.array([r.stability_before_final for r in runs], dtype=float)
    rho: float | None = None
    ci: list[float | None] = [None, None]
    if len(runs) >= 3:
        value, (low, high) = spearman_ci(
            within_group_rank(perf, groups), within_group_rank(score, groups), rng=rng, reps=reps
        )
        finite = [v if math.isfinite(v) else None for v in (value, low, high)]
        rho, ci = finite[0], [finite[1], finite[2]]
    p = signal_p(runs)
    decided, reason = verdict(len(runs), rho, ci, p)
    return WorkloadCorrelation(name, len(runs), rho, ci, p, decided, reason)


def audit_decoupling(
    records: Sequence[RunRecord], rng: np.random.Generator, reps: int
) -> Decoupling:
    """Claim 1 per workload and pooled over the given (unguarded) runs."""
    per_workload = [
        correlate(w, [r for r in records if r.workload == w], rng, reps)
        for w in dict.fromkeys(r.workload for r in records)
    ]
    return Decoupling(correlate("pooled", records, rng, reps, by_workload=True), per_workload)
