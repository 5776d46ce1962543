"""The evaluation protocol's own functions on tiny hand-built runs, with answers worked by hand."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from stabilitybench.detectors.base import BaseDetector
from stabilitybench.evaluation.alarms import (
    auroc,
    first_true_warning,
    pair_counts,
    run_bootstrap,
    warning_window,
    weighted_auroc,
)
from stabilitybench.evaluation.evaluate import WorkloadRuns, evaluate_detector, macro_average
from stabilitybench.evaluation.protocol import HELD_OUT, IN_SAMPLE, ScoredRun, Thresholds
from stabilitybench.evaluation.results import DetectorResult
from stabilitybench.metrics.alarms import alarm_events
from stabilitybench.metrics.collapse import CollapseResult
from stabilitybench.metrics.records import Onset, run_record
from stabilitybench.settings import CollapseSettings
from stabilitybench.store import RunData


class _Score(BaseDetector):
    """A detector whose score is the `score` column (never registered)."""

    name = "score"
    title = "test score"


def test_alarm_events_are_up_crossings_and_a_gap_does_not_end_an_alarm() -> None:
    nan = math.nan
    scores = np.array([2.0, 2.0, 0.0, 3.0, nan, nan, 3.0, 0.0, nan, 5.0])
    assert np.flatnonzero(alarm_events(scores, 1.0)).tolist() == [0, 3, 9]
    assert not alarm_events(np.full(4, nan), 0.0).any()


def test_a_true_warning_is_an_alarm_with_the_collapse_within_the_horizon() -> None:
    steps = np.arange(100)
    # collapse at 60, H = 10: alarms at steps 50..59 are warnings (60 in (t, t + 10])
    assert np.flatnonzero(warning_window(steps, 60, 10)).tolist() == list(range(50, 60))
    events = np.zeros(100, dtype=bool)
    events[[20, 49, 55, 58, 60]] = True
    assert first_true_warning(events, steps, 60, 10) == 55  # 49 is 11 steps early: too early
    assert first_true_warning(events, steps, 60, 11) == 49
    assert first_true_warning(events, steps, 21, 10) == 20  # 21 is in (20, 30]: lead 1
    events[20] = False
    assert first_true_warning(events, steps, 21, 10) is None


def test_pair_counts_give_the_step_auroc_and_weights_replicate_runs() -> None:
    rng = np.random.default_rng(0)
    scores = [rng.normal(size=n) for n in (30, 20, 25)]
    scores[0][:10] += 1.5
    scores[2][[0, 1]] = scores[1][[3, 4]]  # ties between runs count 1/2
    labels = [np.arange(30) < 10, np.zeros(20, bool), np.arange(25) < 5]
    pairs, pos, neg = pair_counts(scores, labels)
    assert pos.tolist() == [10, 0, 5] and neg.tolist() == [20, 20, 20]
    flat, flat_labels = np.concatenate(scores), np.concatenate(labels)
    assert weighted_auroc(pairs, pos, neg, np.ones(3)) == pytest.approx(auroc(flat, flat_labels))
    # run 0 twice, run 1 once, run 2 not at all: the same as concatenating those copies
    copies = [scores[0], scores[0], scores[1]]
    copy_labels = [labels[0], labels[0], labels[1]]
    assert weighted_auroc(pairs, pos, neg, np.array([2.0, 1.0, 0.0])) == pytest.approx(
        auroc(np.concatenate(copies), np.concatenate(copy_labels))
    )
    draws = run_bootstrap(pairs, pos, neg, np.random.default_rng(1), reps=200)
    finite = draws[np.isfinite(draws)]
    assert finite.size > 100 and ((finite >= 0) & (finite <= 1)).all()


def _run(
    seed: int,
    spikes: dict[int, float],
    *,
    healthy: bool = False,
    collapse_at: int | None = None,
    onset: int | None = 40,
    workload: str = "w",
    n: int = 100,
) -> ScoredRun:
    """A scored run of n steps: zeros, `spikes` {step: score}; judged runs collapse at
    `collapse_at` (None: they do not), their perturbation starting at `onset`."""
    scores = np.zeros(n)
    for step, value in spikes.items():
        scores[step] = value
    kind = "none" if healthy else "lr_spike"
    info = {
        "run_id": f"{workload}-{seed}-{kind}-{collapse_at}-{sorted(spikes)}",
        "workload": workload,
        "seed": seed,
        "status": "done",
        "healthy": healthy,
        "perturbation": {"kind": kind, "label": kind, "params": {}},
    }
    frame = pd.DataFrame({"step": np.arange(n), "score": scores})
    run = RunData(info["run_id"], info, frame, pd.DataFrame(), pd.DataFrame(), scores=frame)
    start = None if healthy else onset
    record = run_record(
        info, None, Onset(start, None, "events" if start else None), CollapseSettings()
    )
    if not healthy:
        collapse = CollapseResult(
            collapsed=collapse_at is not None,
            irreversible=collapse_at is not None,
            collapse_step=None if collapse_at is None or start is None else collapse_at - start,
            collapse_env_steps=None,
            recovery_steps=None,
            recovery_env_steps=None,
            diverged=False,
            progress_undefined=False,
            onset_step=start,
            perf_0=0.0,
            perf_pre=1.0,
            min_progress=0.0,
            n_missing_evals=0,
            collapse_at=collapse_at,
            first_eval_after_onset=50,
        )
        record = replace(record, collapse=collapse)
    return ScoredRun(run, record)


def _workload(workload: str = "w") -> WorkloadRuns:
    healthy = [
        _run(s, {50: v}, healthy=True, workload=workload) for s, v in ((0, 2), (1, 4), (2, 6))
    ]
    judged = [
        _run(0, {45: 10, 46: 10, 47: 10}, collapse_at=60, workload=workload),  # warned 15 early
        _run(1, {30: 10, 70: 10}, collapse_at=80, workload=workload),  # 30: too early; 70: 10
        _run(2, {}, collapse_at=41, workload=workload),  # 1 step after onset: no lead possible
        _run(0, {50: 10, 52: 10}, workload=workload),  # never collapses: two false alarms
        _run(1, {}, collapse_at=90, workload=workload),  # collapses unwarned
    ]
    return WorkloadRuns(healthy=healthy, judged=judged)


def test_prospective_warning_figures_by_hand() -> None:
    split = _workload()
    # target 0.001 / 1k: each held-out threshold clears the other seeds' largest spike:
    # seeds 0, 1 → just above 6; seed 2 → just above 4, so seed 2's healthy spike 6 alarms
    result, draws = evaluate_detector(_Score, split, 0.001, 20, np.random.default_rng(0), 200)
    assert result.event_recall == pytest.approx(2 / 3)  # 2 of the 3 collapses with room
    assert result.lead_time_median == 12.5 and result.lead_time_iqr == [11.25, 13.75]  # 15, 10
    assert result.false_alarms_per_1k == pytest.approx(1000 / 300)  # 1 in 300 healthy steps
    assert result.false_alarms_per_1k_not_collapsed == pytest.approx(20.0)  # 2 in 100 steps
    assert any("1 collapses came within 1 step" in n for n in result.notes)
    # outcome AUROC, max over [onset 40, 50]: collapsed 10, 0, 0, 0 vs not collapsed 10
    assert result.outcome_auroc == pytest.approx(0.5 / 4)
    # step AUROC: every step before a collapse (the no-lead run left out), positive in the
    # 20 steps before it, against the reference implementation on the same steps
    flat, labels = [], []
    for run in [*split.healthy, split.judged[0], split.judged[1], *split.judged[3:]]:
        steps, values = run.steps, run.values("score")
        keep = np.ones(len(steps), bool) if run.collapse_at is None else steps < run.collapse_at
        label = np.zeros(len(steps), bool)
        if run.collapse_at is not None:
            label = (steps >= run.collapse_at - 20) & (steps < run.collapse_at)
        flat.append(values[keep])
        labels.append(label[keep])
    assert result.auroc == pytest.approx(auroc(np.concatenate(flat), np.concatenate(labels)))
    assert result.auroc_ci is not None and result.auroc_ci[0] <= result.auroc <= 1.0
    assert draws is not None and len(draws) == 200


def test_macro_average_is_the_mean_over_workloads_not_a_pool() -> None:
    a = DetectorResult(event_recall=1.0, lead_time_median=10.0, lead_time_iqr=[5.0, 15.0])
    b = DetectorResult(event_recall=0.0, lead_time_iqr=None, auroc=0.8, outcome_auroc=0.6)
    macro = macro_average({"a": a, "b": b}, {})
    assert macro.event_recall == 0.5 and macro.lead_time_median == 10.0
    assert macro.lead_time_iqr == [5.0, 15.0] and macro.auroc == 0.8
    assert "lead_time_median: the mean of 1 of 2 workloads" in macro.notes
    assert macro.false_alarms_per_1k is None
    assert "false_alarms_per_1k: no workload has a value" in macro.notes
    draws = {"a": np.array([0.5, 0.7]), "b": np.array([0.9, 0.9])}
    a.auroc, b.auroc = 0.6, 0.9
    macro = macro_average({"a": a, "b": b}, draws)
    assert macro.auroc == pytest.approx(0.75)
    assert macro.auroc_ci == pytest.approx([0.7 + 0.1 * 0.025, 0.8 - 0.1 * 0.025])


def _healthy(seed: int, spike: float, workload: str = "w") -> ScoredRun:
    return _run(seed, {4: spike}, healthy=True, workload=workload, n=10)


def test_thresholds_are_calibrated_per_held_out_seed() -> None:
    # Each healthy run: 10 steps, zeros and one spike. At 60 false alarms per 1,000 steps two
    # runs (20 steps) allow one up-crossing, so the threshold must clear the lower spike of the
    # other two seeds. Candidates are quantiles (p = 0.5, 0.5025, …, 1) of the 20 pooled values
    # (18 zeros, a, b with a < b): the first above a sits at position 19·0.9475 = 18.0025,
    # i.e. a + 0.0025·(b − a).
    runs = [_healthy(0, 5.0), _healthy(1, 3.0), _healthy(2, 7.0)]
    thresholds = Thresholds("score", runs, target=60.0)
    assert thresholds.of(runs[0]) == pytest.approx(3.0 + 0.0025 * 4)  # others: 3, 7
    assert thresholds.of(runs[1]) == pytest.approx(5.0 + 0.0025 * 2)  # others: 5, 7
    assert thresholds.of(runs[2]) == pytest.approx(3.0 + 0.0025 * 2)  # others: 5, 3
    assert thresholds.calibration == HELD_OUT
    assert thresholds.events(runs[0]).tolist() == [False] * 4 + [True] + [False] * 5
    assert thresholds.median(runs) == pytest.approx(3.01)


def test_a_workload_with_one_seed_is_calibrated_in_sample() -> None:
    runs = [_healthy(0, 5.0, "a"), _healthy(0, 3.0, "b"), _healthy(1, 4.0, "b")]
    thresholds = Thresholds("score", runs, target=60.0)
    # workload a: only seed 0 → its own 10 steps; one up-crossing is 100 per 1k > 60, so the
    # threshold is the largest value plus a margin
    assert thresholds.of(runs[0]) == pytest.approx(5.0 + 5e-6)
    assert math.isfinite(thresholds.of(runs[1]))
    assert thresholds.calibration == IN_SAMPLE
