"""Alarm statistics shared by the monitor (fit-time calibration) and the evaluation.

Pure functions over arrays: an alarm event is an up-crossing of a threshold; a threshold is
calibrated on healthy runs for a target number of false alarms per 1,000 steps; AUROC with a
stratified bootstrap interval; recall, precision, lead time and false alarms of one alarm rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from stabilitybench.metrics.intervals import two_sample_bootstrap_ci

BOOTSTRAP = 2000


def alarm_events(scores: np.ndarray, threshold: float) -> np.ndarray:
    """(n,) bool: steps where the score crosses up to `threshold` (the first step counts if above)."""
    above = np.asarray(scores) >= threshold
    if above.size == 0:
        return above
    prev = np.concatenate([[False], above[:-1]])
    return above & ~prev


def false_alarm_rate(scores: Sequence[np.ndarray], threshold: float) -> float:
    """Up-crossings of `threshold` per 1,000 steps over a set of runs (each (n_i,))."""
    steps = sum(len(s) for s in scores)
    if steps == 0:
        return 0.0
    events = sum(int(alarm_events(s, threshold).sum()) for s in scores)
    return 1000.0 * events / steps


def calibrate_threshold(scores: Sequence[np.ndarray], target_per_1k: float) -> float:
    """Smallest threshold whose false-alarm rate on these runs is at most `target_per_1k`.

    scores: one (n_i,) array per held-out healthy run. Candidates are the observed values
    (the largest finite one plus a margin is always feasible). Returns +inf for no data.
    """
    values = np.concatenate([np.asarray(s, dtype=float) for s in scores]) if scores else np.zeros(0)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.inf
    top = float(values.max())
    fallback = top + max(1e-9, 1e-6 * abs(top))
    candidates = np.unique(np.quantile(values, np.linspace(0.5, 1.0, 201)))
    lo, hi = 0, len(candidates) - 1
    best = fallback
    # The rate falls (nearly) monotonically with the threshold: bisect, then confirm.
    while lo <= hi:
        mid = (lo + hi) // 2
        if false_alarm_rate(scores, float(candidates[mid])) <= target_per_1k:
            best = float(candidates[mid])
            hi = mid - 1
        else:
            lo = mid + 1
    if false_alarm_rate(scores, best) > target_per_1k:
        best = fallback
    return best


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney, ties count 1/2); scores/labels: (n,), labels bool."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _auroc_of(positives: np.ndarray, negatives: np.ndarray) -> float:
    labels = np.r_[np.ones(len(positives), bool), np.zeros(len(negatives), bool)]
    return auroc(np.concatenate([positives, negatives]), labels)


def auroc_bootstrap_ci(
    scores: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    reps: int = BOOTSTRAP,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile CI of the AUROC, resampling positives and negatives separately (stratified)."""
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels, dtype=bool)
    return two_sample_bootstrap_ci(
        scores[labels], scores[~labels], _auroc_of, rng=rng, reps=reps, confidence=level
    )


def first_alarm_index(alarms: np.ndarray, steps: np.ndarray, onset: int) -> int | None:
    """Index of the first alarm at or after `onset` (alarms, steps: (n,)), or None."""
    hits = np.flatnonzero(np.asarray(alarms, dtype=bool) & (np.asarray(steps) >= onset))
    return int(hits[0]) if hits.size else None


def window_max(scores: np.ndarray, steps: np.ndarray, start: int, end: int) -> float:
    """Largest score over steps in [start, end] (NaN if no step there or all NaN)."""
    mask = (steps >= start) & (steps <= end)
    values = np.asarray(scores, dtype=float)[mask]
    values = values[~np.isnan(values)]
    return float(values.max()) if values.size else math.nan


@dataclass(frozen=True)
class Trial:
    """One perturbed run as the alarm statistics see it (steps, env steps: (n,))."""

    steps: np.ndarray
    env_steps: np.ndarray | None
    onset: int
    collapsed: bool
    collapse_at: int | None  # optimizer step of the collapse
    collapse_at_env: int | None


@dataclass
class AlarmStats:
    """Recall, precision, lead times and false alarms of one alarm rule (None: see `notes`)."""

    recall: float | None = None
    precision: float | None = None
    lead_time_median: float | None = None
    lead_time_iqr: list[float] | None = None
    lead_time_env_steps_median: float | None = None  # None too for an audit without env steps
    lead_time_env_steps_iqr: list[float] | None = None
    false_alarms_per_1k: float | None = None
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


def too_few(what: str, n_collapsed: int, n_recovered: int) -> str:
    return f"too few runs for {what}: {n_collapsed} collapsed, {n_recovered} recovered"


def alarm_stats(
    trials: Sequence[Trial],
    alarms: Sequence[np.ndarray],
    healthy_alarms: Sequence[np.ndarray],
    out: AlarmStats | None = None,
) -> AlarmStats:
    """The statistics of one rule: `alarms[i]` (n_i,) bool for `trials[i]`, `healthy_alarms` for
    the held-out healthy runs (false alarms = up-crossings per 1,000 of their steps).

    A true warning is the first alarm at or after onset in a run that collapses later; an alarm
    in a run that does not collapse counts against precision.
    """
    out = out or AlarmStats()
    n_pos = sum(t.collapsed for t in trials)
    leads, env_leads, hits, alarmed = _leads(trials, alarms)
    out.recall = hits / n_pos if n_pos else None
    if not n_pos:
        out.note(too_few("recall", n_pos, len(trials) - n_pos))
    out.precision = hits / alarmed if alarmed else None
    if not alarmed:
        out.note("no alarms on perturbed runs")
    missing = (
        "no alarm at or after onset in any collapsed run"
        if n_pos
        else too_few("lead time", n_pos, len(trials) - n_pos)
    )
    out.lead_time_median, out.lead_time_iqr = _quartiles(leads, out, missing)
    if any(t.collapse_at_env is not None for t in trials):
        out.lead_time_env_steps_median, out.lead_time_env_steps_iqr = _quartiles(
            env_leads, out, missing
        )
    total = sum(len(a) for a in healthy_alarms)
    if healthy_alarms:
        events = sum(int(alarm_events(a, 0.5).sum()) for a in healthy_alarms)
        out.false_alarms_per_1k = 1000.0 * events / total if total else 0.0
    else:
        out.note("too few runs: 0 baseline runs with scores")
    return out


def _leads(
    trials: Sequence[Trial], alarms: Sequence[np.ndarray]
) -> tuple[list[int], list[int], int, int]:
    """Lead times (steps, env steps) of the first alarm after onset; true warnings; alarmed runs."""
    leads, env_leads = [], []
    hits = alarmed = 0
    for trial, alarm in zip(trials, alarms, strict=True):
        first = first_alarm_index(alarm, trial.steps, trial.onset)
        if first is None:
            continue
        if not trial.collapsed:
            alarmed += 1
            continue
        assert trial.collapse_at is not None
        lead = int(trial.collapse_at - trial.steps[first])
        leads.append(lead)
        env = trial.env_steps
        if trial.collapse_at_env is not None and env is not None and np.isfinite(env[first]):
            env_leads.append(int(trial.collapse_at_env - env[first]))
        if lead > 0:
            hits += 1
            alarmed += 1
    return leads, env_leads, hits, alarmed


def _quartiles(
    values: list[int], out: AlarmStats, missing: str
) -> tuple[float | None, list[float] | None]:
    if not values:
        out.note(missing)
        return None, None
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    return float(q50), [float(q25), float(q75)]
