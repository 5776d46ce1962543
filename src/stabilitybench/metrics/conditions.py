"""Per-condition aggregates (workload × knobs × perturbation) over the runs' records, with CIs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stabilitybench.metrics import reliability as rel
from stabilitybench.metrics.intervals import (
    iqm,
    probability_of_improvement,
    stratified_bootstrap_ci,
    wilson_interval,
)
from stabilitybench.metrics.records import RunRecord


def number(value: float | None) -> float | None:
    """A finite float, or None for NaN/±inf/None (JSON null)."""
    return float(value) if value is not None and math.isfinite(value) else None


def number_pair(values: Sequence[float | None] | None) -> list[float | None]:
    """A (low, high) interval as JSON numbers; [None, None] for none."""
    return [number(v) for v in values] if values else [None, None]


def median_of(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(finite)) if finite else None


@dataclass
class ConditionSummary:
    """One condition's aggregates; a value that cannot be estimated is None, with a note."""

    workload: str
    knobs: Mapping[str, Any]
    perturbation: str
    perturbation_kind: str
    magnitude: float | None
    n_runs: int  # finished
    n_failed: int
    n_unfinished: int
    n_judged: int
    n_collapsed: int
    collapse_rate: float | None
    collapse_rate_ci: list[float | None]
    median_collapse_steps: float | None
    median_collapse_env_steps: float | None
    recovery_rate: float | None
    median_recovery_steps: float | None
    irreversible_rate: float | None
    n_diverged: int
    final_perf_iqm: float | None
    final_perf_iqm_ci: list[float | None]
    n_final_perf_nonfinite: int
    prob_improvement_vs_baseline: float | None
    stability_score_median: float | None
    dispersion_across_time: float | None
    short_term_risk: float | None
    long_term_risk: float | None
    dispersion_across_runs: float | None = None
    risk_across_runs: float | None = None
    guard: str = "none"  # the guard's label; `none` for unguarded runs
    # The collapse rate beyond what the control arm shows, paired by seed: the mean over seeds
    # of (this run collapsed − the same-seed control run collapsed), both judged, with a
    # bootstrap CI over seeds. The control is the sham arm where the audit has one, else the
    # unperturbed runs.
    control: str | None = None
    collapse_excess: float | None = None
    collapse_excess_ci: list[float | None] = field(default_factory=lambda: [None, None])
    n_pairs: int = 0
    notes: list[str] = field(default_factory=list)


def paired_excess(
    runs: Sequence[RunRecord], controls: Sequence[RunRecord], rng: np.random.Generator, reps: int
) -> tuple[float | None, list[float | None], int]:
    """(mean, 95 % bootstrap CI over seeds, number of pairs) of collapsed(run) − collapsed(control)
    over the seeds where both a run and its control were judged."""
    control = {r.seed: r.collapsed for r in controls if r.done and r.collapsed is not None}
    diffs = np.array(
        [
            float(bool(r.collapsed)) - float(bool(control[r.seed]))
            for r in runs
            if r.done and r.collapsed is not None and r.seed in control
        ]
    )
    if diffs.size == 0:
        return None, [None, None], 0
    low, high = stratified_bootstrap_ci(diffs, np.mean, rng=rng, reps=reps)
    return float(diffs.mean()), [number(low), number(high)], int(diffs.size)


def across_runs(records: Sequence[RunRecord]) -> tuple[float | None, float | None]:
    """(dispersion across runs on the evaluation steps every run reached, risk across runs)."""
    finals = np.array([r.final_perf for r in records if number(r.final_perf) is not None])
    risk = number(rel.risk_across_runs(finals)) if finals.size else None
    curves = [(r.curve.steps, r.curve.perf) for r in records]
    if len(curves) < 2:
        return None, risk
    common: set[float] | None = None
    for steps, perf in curves:
        ok = set(steps[np.isfinite(perf)].tolist())
        common = ok if common is None else common & ok
    grid = sorted(common or ())
    if len(grid) < 2:
        return None, risk
    matrix = np.array([[perf[steps == g][0] for g in grid] for steps, perf in curves])
    scale = float(np.median([abs(rel.curve_range(row)) for row in matrix]))
    if not scale > 1e-12:
        return None, risk
    return number(float(np.mean(rel.dispersion_across_runs(matrix / scale)))), risk


def _finals(records: Sequence[RunRecord]) -> list[float]:
    """Final performance of finished runs, -inf (diverged) included, NaN left out."""
    return [
        r.final_perf
        for r in records
        if r.done and r.final_perf is not None and not math.isnan(r.final_perf)
    ]


def condition_summary(
    runs: Sequence[RunRecord],
    baseline: Sequence[RunRecord] | None,
    rng: np.random.Generator,
    reps: int,
) -> ConditionSummary:
    """Aggregate one condition's runs; `baseline`: the matched unperturbed condition's runs."""
    done = [r for r in runs if r.done]
    judged = [r for r in done if r.collapsed is not None]
    collapsed = [r for r in judged if r.collapsed]
    recovered = [r for r in collapsed if r.collapse and not r.collapse.irreversible]
    finals_all = _finals(done)
    finals = np.array([f for f in finals_all if math.isfinite(f)])
    ci = (
        stratified_bootstrap_ci(finals, iqm, rng=rng, reps=reps) if finals.size else (math.nan,) * 2
    )
    base_finals = _finals(baseline or [])
    first = runs[0]
    c = ConditionSummary(
        workload=first.workload,
        knobs=dict(first.knobs),
        perturbation=first.perturbation,
        perturbation_kind=first.perturbation_kind,
        magnitude=first.magnitude,
        n_runs=len(done),
        n_failed=sum(r.status == "failed" for r in runs),
        n_unfinished=sum(r.status in ("pending", "running") for r in runs),
        n_judged=len(judged),
        n_collapsed=len(collapsed),
        collapse_rate=len(collapsed) / len(judged) if judged else None,
        collapse_rate_ci=number_pair(wilson_interval(len(collapsed), len(judged))),
        median_collapse_steps=median_of(
            [r.collapse.collapse_step for r in collapsed if r.collapse]
        ),
        median_collapse_env_steps=median_of(
            [r.collapse.collapse_env_steps for r in collapsed if r.collapse]
        ),
        recovery_rate=len(recovered) / len(collapsed) if collapsed else None,
        median_recovery_steps=median_of(
            [r.collapse.recovery_steps for r in recovered if r.collapse]
        ),
        irreversible_rate=(len(collapsed) - len(recovered)) / len(judged) if judged else None,
        n_diverged=sum(bool(r.collapse and r.collapse.diverged) for r in done),
        final_perf_iqm=number(iqm(finals)) if finals.size else None,
        final_perf_iqm_ci=number_pair(ci),
        n_final_perf_nonfinite=len(finals_all) - int(finals.size),
        prob_improvement_vs_baseline=number(
            probability_of_improvement(np.array(finals_all), np.array(base_finals))
        )
        if base_finals and finals_all
        else None,
        stability_score_median=median_of([r.stability_score for r in done]),
        dispersion_across_time=_reliability_median(done, "dispersion_across_time"),
        short_term_risk=_reliability_median(done, "short_term_risk"),
        long_term_risk=_reliability_median(done, "long_term_risk"),
    )
    c.dispersion_across_runs, c.risk_across_runs = across_runs(done)
    c.guard = first.guard
    _explain(c, baseline is not None)
    return c


def _reliability_median(done: Sequence[RunRecord], name: str) -> float | None:
    """The median over runs of one within-run reliability metric."""
    return median_of([getattr(r.reliability, name) for r in done if r.reliability is not None])


def _explain(c: ConditionSummary, has_baseline: bool) -> None:
    """Notes for the figures that could not be estimated."""
    if c.collapse_rate is None:
        c.notes.append("collapse_rate: no finished run could be judged (no onset or evaluation)")
    if c.recovery_rate is None and c.collapse_rate is not None:
        c.notes.append("recovery_rate: no run collapsed")
    if c.final_perf_iqm is None:
        c.notes.append("final_perf_iqm: no finished run has a finite final performance")
    if c.prob_improvement_vs_baseline is None and c.perturbation_kind != "none":
        why = "no finished baseline runs" if has_baseline else "no matched baseline condition"
        c.notes.append(f"prob_improvement_vs_baseline: {why}")
    if c.dispersion_across_runs is None:
        c.notes.append(
            "dispersion_across_runs: fewer than two runs share two finite evaluation steps"
        )
