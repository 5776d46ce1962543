"""One detector on one workload under the alarm-episode protocol.

A detector's alarms are its episodes' starts and their renewals every SOP steps
(`metrics.alarms`); an alarm at t is true when the run's collapse starts in
[t + SPH, t + SPH + SOP] (`protocol.ScoredRun.collapse_interval`). Beside every recall stand
what no foresight scores: a random predictor with the detector's own alarm rate and time in
warning (analytic, and by surrogates that shift each run's alarms at random), and the `clock`
control: the best alarm schedule that knows only the onset of the run's perturbation, at the
detector's own false-alarm rate on the runs of that perturbation that did not collapse.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from stabilitybench.detectors.base import BaseDetector
from stabilitybench.evaluation.alarms import (
    BOOTSTRAP,
    auroc,
    chance_recall,
    clock_recall_at,
    episode_start,
    pair_counts,
    percentile_ci,
    quartiles,
    run_bootstrap,
    surrogate_recalls,
    too_few,
    true_alarms,
    weighted_auroc,
    window_max,
)
from stabilitybench.evaluation.protocol import AlarmState, ScoredRun, Thresholds
from stabilitybench.evaluation.results import DetectorResult
from stabilitybench.metrics.alarms import episode_bounds
from stabilitybench.settings import WarningSettings

SURROGATES = 1000


@dataclass
class WorkloadRuns:
    """One workload's scored, unguarded runs split as the protocol uses them."""

    healthy: list[ScoredRun] = field(default_factory=list)
    judged: list[ScoredRun] = field(default_factory=list)  # unhealthy, with a collapse verdict
    unjudged: int = 0
    flagged: int = 0  # healthy runs the collapse criterion flags: left out

    @property
    def collapsed(self) -> list[ScoredRun]:
        return [r for r in self.judged if r.collapsed]


def evaluate_detector(
    cls: type[BaseDetector],
    split: WorkloadRuns,
    settings: WarningSettings,
    rng: np.random.Generator,
    reps: int = BOOTSTRAP,
) -> tuple[DetectorResult, np.ndarray | None]:
    """One detector on one workload; also its step-AUROC bootstrap draws (for the macro CI)."""
    column = cls.column
    result = DetectorResult()
    healthy = [r for r in split.healthy if r.scored_by(column)]
    judged = [r for r in split.judged if r.scored_by(column)]
    if not healthy:
        result.note(
            f"no `{column}` scores on this workload's healthy runs (a signal it reads was not "
            "recorded)"
        )
        return result, None
    thresholds = Thresholds(
        column, healthy, settings.target_false_alarms, sop=settings.horizon, gap=settings.gap
    )
    if thresholds.in_sample:
        result.note("thresholds calibrated in-sample: the healthy runs share one seed")
    state = {id(r): thresholds.state(r) for r in [*healthy, *judged]}
    _false_alarms(result, healthy, judged, state, settings)
    leadable = _recall(result, judged, state, settings)
    _chance(result, leadable, state, settings, rng)
    clock_control(result, WorkloadRuns(healthy, judged), settings, state)
    draws = _step_auroc(result, [*healthy, *judged], column, settings, rng, reps)
    _outcome_auroc(result, [r for r in judged if r.onset_step is not None], column)
    _dose_auroc(result, judged, column)
    if len(judged) < len(split.judged):
        result.note(f"{len(split.judged) - len(judged)} judged runs have no `{column}` score")
    return result, draws


def _rate(count: int, steps: int) -> float | None:
    return 1000.0 * count / steps if steps else None


def _is_sham(run: ScoredRun) -> bool:
    return run.record.perturbation_kind == "sham"


def hard_negatives(judged: Sequence[ScoredRun]) -> list[ScoredRun]:
    """Runs that were perturbed (an onset, not a sham: the sham is the control arm) and did not
    collapse: where a detector that only sees that something was done alarms for nothing."""
    return [r for r in judged if not r.collapsed and r.onset_step is not None and not _is_sham(r)]


def _after_onset_rate(runs: Sequence[ScoredRun], state: dict[int, AlarmState]) -> float | None:
    """Alarms per 1,000 steps over these runs, from each one's onset on."""
    count = steps = 0
    for run in runs:
        after = run.steps >= run.onset_step
        count, steps = count + int(state[id(run)].alarms[after].sum()), steps + int(after.sum())
    return _rate(count, steps)


def _false_alarms(
    result: DetectorResult,
    healthy: Sequence[ScoredRun],
    judged: Sequence[ScoredRun],
    state: dict[int, AlarmState],
    settings: WarningSettings,
) -> None:
    """False alarms per 1,000 steps: on held-out healthy runs (every alarm), on perturbed runs
    that did not collapse (from the onset on), on collapsed runs (alarms before the collapse
    that are not true); the healthy runs' time in warning."""
    result.false_alarms_per_1k = _rate(
        sum(int(state[id(r)].alarms.sum()) for r in healthy), sum(len(r.steps) for r in healthy)
    )
    result.time_in_warning = float(
        np.sum([state[id(r)].on.sum() for r in healthy])
        / max(sum(len(r.steps) for r in healthy), 1)
    )
    calm = hard_negatives(judged)
    result.false_alarms_per_1k_not_collapsed = _after_onset_rate(calm, state)
    if not calm:
        result.note("no perturbed run that did not collapse: no false-alarm rate on them")
    sham = [r for r in judged if _is_sham(r) and not r.collapsed and r.onset_step is not None]
    result.false_alarms_per_1k_sham = _after_onset_rate(sham, state)
    count = steps = 0
    for run in judged:
        interval = run.collapse_interval
        if interval is None:
            continue
        before = run.steps < interval[0]
        at = run.steps[state[id(run)].alarms & before]
        false = ~true_alarms(at, interval[0], settings.sph, settings.horizon)
        count, steps = count + int(false.sum()), steps + int(before.sum())
    result.false_alarms_per_1k_collapsed = _rate(count, steps)


def _recall(
    result: DetectorResult,
    judged: Sequence[ScoredRun],
    state: dict[int, AlarmState],
    settings: WarningSettings,
) -> list[ScoredRun]:
    """Event recall and lead times over the collapses that leave room for a warning; returns
    those collapsed runs."""
    collapsed = [r for r in judged if r.collapse_interval is not None]
    no_lead = [r for r in collapsed if r.no_lead_possible(settings.sph)]
    result.n_no_lead_possible = len(no_lead)
    if no_lead:
        result.note(
            f"{len(no_lead)} collapses began less than SPH = {settings.sph} steps after their "
            "perturbation's onset (no lead possible): left out of event recall and lead time"
        )
    leadable = [r for r in collapsed if not r.no_lead_possible(settings.sph)]
    result.n_collapses = len(leadable)
    if not leadable:
        result.note(too_few("event recall", len(leadable), len(judged) - len(collapsed)))
        return leadable
    leads = [lead for r in leadable if (lead := _lead(r, state[id(r)], settings)) is not None]
    result.event_recall = len(leads) / len(leadable)
    result.lead_time_median, result.lead_time_iqr = quartiles(leads)
    if not leads:
        result.note(
            f"no true alarm (a collapse starting {settings.sph}–{settings.sph + settings.horizon} "
            "steps after it) before any collapse"
        )
    return leadable


def _lead(run: ScoredRun, alarms: AlarmState, settings: WarningSettings) -> int | None:
    """Collapse start − the start of the episode holding the run's first true alarm (None:
    no true alarm)."""
    interval = run.collapse_interval
    assert interval is not None
    index = np.flatnonzero(alarms.alarms)
    true = index[true_alarms(run.steps[index], interval[0], settings.sph, settings.horizon)]
    if true.size == 0:
        return None
    return int(interval[0] - run.steps[episode_start(alarms.on, int(true[0]))])


def _chance(
    result: DetectorResult,
    leadable: Sequence[ScoredRun],
    state: dict[int, AlarmState],
    settings: WarningSettings,
    rng: np.random.Generator,
) -> None:
    """What a detector with no foresight would recall at this one's alarm rate and time in
    warning (analytic and surrogate), and the clock control at its false-alarm rate."""
    if not leadable:
        return
    in_warning = starts = off = steps = 0
    surrogates = []
    for run in leadable:
        lo = run.collapse_interval[0]  # type: ignore[index]
        before = run.steps < lo
        on, alarms = state[id(run)].on[before], state[id(run)].alarms[before]
        begun, _ = episode_bounds(on)
        in_warning, starts = in_warning + int(on.sum()), starts + len(begun)
        off, steps = off + int((~on).sum()), steps + int(before.sum())
        window = np.flatnonzero(true_alarms(run.steps[before], lo, settings.sph, settings.horizon))
        a, b = (int(window[0]), int(window[-1])) if window.size else (1, 0)
        surrogates.append((np.flatnonzero(alarms), int(before.sum()), a, b))
    result.chance_recall = chance_recall(
        starts / max(off, 1), in_warning / max(steps, 1), settings.horizon
    )
    draws = surrogate_recalls(surrogates, rng, SURROGATES)
    result.chance_recall_p95 = float(np.percentile(draws, 95))


def without_dose(run: ScoredRun) -> str:
    """What was done to the run, but not how strongly: its perturbation's kind and every
    parameter except the one its class declares as its size (`magnitude_field`), so an LR ramp
    at x300 and at x1000 are one perturbation, a ramp and a spike two."""
    from stabilitybench.perturbations import registry

    info = run.run.info.perturbation
    cls = registry().get(info.kind)
    size = None if cls is None else cls.magnitude_field
    params = {k: v for k, v in info.params.items() if k != size}
    return json.dumps([info.kind, params], sort_keys=True, default=str)


def clock_control(
    result: DetectorResult,
    split: WorkloadRuns,
    settings: WarningSettings,
    state: dict[int, AlarmState],
) -> None:
    """The clock control's recall: a clock that knows which perturbation began (it runs from
    that perturbation's onset) but not its dose (`without_dose`), matched per perturbation to
    this detector's false-alarm rate on that perturbation's runs that did not collapse
    (`clock_recall_at`: the best onset-only schedule); a collapse of a perturbation none of
    whose runs escaped is one the clock warns of (knowing the perturbation predicts it). None,
    with a note, where no collapse's perturbation has such a run (nothing to match). `state`:
    the detector's alarms per run."""
    leadable = [
        r
        for r in split.judged
        if r.collapse_interval is not None
        and r.onset_step is not None
        and not r.no_lead_possible(settings.sph)
    ]
    calm = [r for r in hard_negatives(split.judged) if r.onset_step is not None]
    if result.false_alarms_per_1k_not_collapsed is None or not calm:
        result.note(
            "no perturbed run (other than the sham arm) that did not collapse: no hard "
            "negative, so the clock control cannot be matched"
        )
        return
    groups: dict[str, tuple[list[ScoredRun], list[ScoredRun]]] = defaultdict(lambda: ([], []))
    for run in leadable:
        groups[without_dose(run)][0].append(run)
    for run in calm:
        groups[without_dose(run)][1].append(run)
    if leadable and not any(collapsed and negatives for collapsed, negatives in groups.values()):
        result.note(
            "no run of a perturbation that collapsed runs escaped collapse: no hard negative of "
            "the same perturbation, so the clock control cannot be matched"
        )
        return
    warned = 0.0
    for collapsed, negatives in groups.values():
        if not collapsed:
            continue
        if not negatives:  # every run of this perturbation collapsed: knowing it is enough
            warned += len(collapsed)
            continue
        fa = _after_onset_rate(negatives, state)
        recall = clock_recall_at(
            [(r.onset_step, r.collapse_interval[0]) for r in collapsed],  # type: ignore[index,misc]
            [(r.onset_step, int(r.steps.max())) for r in negatives],  # type: ignore[misc]
            fa or 0.0,
            settings.sph,
            settings.horizon,
        )
        warned += (recall or 0.0) * len(collapsed)
    result.clock_recall = warned / len(leadable) if leadable else None


def _seed_units(
    runs: Sequence[ScoredRun], column: str, settings: WarningSettings
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per seed: the scores and labels of the steps the step AUROC ranks (see `Protocol`)."""
    onsets = [r.onset_step for r in runs if r.onset_step is not None]
    first = min(onsets) if onsets else 0
    scores: dict[int, list[np.ndarray]] = defaultdict(list)
    labels: dict[int, list[np.ndarray]] = defaultdict(list)
    for run in runs:
        values, steps = run.values(column), run.steps
        keep = ~np.isnan(values)
        interval = run.collapse_interval
        if run.healthy:
            keep &= steps >= first
            label = np.zeros(len(steps), dtype=bool)
        elif interval is not None:
            if run.no_lead_possible(settings.sph):
                continue
            label = true_alarms(steps, interval[0], settings.sph, settings.horizon)
            keep &= label
        else:
            keep &= steps >= (run.onset_step or 0)
            label = np.zeros(len(steps), dtype=bool)
        scores[run.seed].append(values[keep])
        labels[run.seed].append(label[keep])
    seeds = sorted(scores)
    return (
        [np.concatenate(scores[s]) for s in seeds],
        [np.concatenate(labels[s]) for s in seeds],
    )


def _step_auroc(
    result: DetectorResult,
    runs: Sequence[ScoredRun],
    column: str,
    settings: WarningSettings,
    rng: np.random.Generator,
    reps: int,
) -> np.ndarray | None:
    """Step AUROC of "an alarm here would be true" (see `Protocol.auroc`); bootstrap over seeds."""
    scores, labels = _seed_units(runs, column, settings)
    pairs, positives, negatives = pair_counts(scores, labels)
    if positives.sum() == 0 or negatives.sum() == 0:
        result.note("no scored step where an alarm would be true, or no negative: no step AUROC")
        return None
    result.auroc = weighted_auroc(pairs, positives, negatives, np.ones(len(scores)))
    n_pos = int((positives > 0).sum())
    if n_pos < 2:
        result.note(f"too few seeds with a collapse for a bootstrap CI of the step AUROC: {n_pos}")
        return None
    draws = run_bootstrap(pairs, positives, negatives, rng, reps)
    result.auroc_ci = percentile_ci(draws)
    if result.auroc_ci is None:
        result.note("no step-AUROC CI: most bootstrap draws lacked collapsed or calm steps")
    return draws


def _outcome_auroc(result: DetectorResult, runs: Sequence[ScoredRun], column: str) -> None:
    """AUROC of the window maximum (onset → first evaluation after it): collapsed vs not."""
    maxima = [window_max(r.values(column), r.steps, *r.outcome_window()) for r in runs]
    scores = np.nan_to_num(np.asarray(maxima, dtype=float), nan=-np.inf)
    labels = np.asarray([r.collapsed for r in runs], dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not (n_pos >= 1 and n_neg >= 1):
        result.note(too_few("the outcome AUROC (runs with an onset)", n_pos, n_neg))
        return
    finite = np.where(np.isposinf(scores), np.finfo(float).max, scores)
    result.outcome_auroc = auroc(finite, labels)


def dose_runs(judged: Sequence[ScoredRun]) -> list[ScoredRun]:
    """The runs under a perturbation kind given at several doses (labels) in the workload, of
    kinds where some of those runs collapse and some do not (sham and none never count)."""
    by_kind: dict[str, list[ScoredRun]] = defaultdict(list)
    for run in judged:
        kind = run.record.perturbation_kind
        if run.onset_step is not None and kind not in ("none", "sham"):
            by_kind[kind].append(run)
    out = []
    for runs in by_kind.values():
        doses = {r.record.perturbation for r in runs}
        outcomes = {r.collapsed for r in runs}
        if len(doses) > 1 and outcomes == {True, False}:
            out += runs
    return out


def _dose_auroc(result: DetectorResult, judged: Sequence[ScoredRun], column: str) -> None:
    """The outcome AUROC between doses of one perturbation that do and do not collapse: does
    the score right after onset tell the runs that will collapse from those under a milder
    dose of the same thing (hard negatives), or only that something was done?"""
    runs = dose_runs(judged)
    if not runs:
        return
    maxima = [window_max(r.values(column), r.steps, *r.outcome_window()) for r in runs]
    scores = np.nan_to_num(np.asarray(maxima, dtype=float), nan=-np.inf)
    finite = np.where(np.isposinf(scores), np.finfo(float).max, scores)
    result.outcome_auroc_doses = auroc(finite, np.asarray([r.collapsed for r in runs], bool))
