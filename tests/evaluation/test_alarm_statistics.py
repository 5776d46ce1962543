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
    chance_recall,
    clock_recall_at,
    pair_counts,
    run_bootstrap,
    true_alarms,
    weighted_auroc,
)
from stabilitybench.evaluation.episodes import WorkloadRuns, evaluate_detector
from stabilitybench.evaluation.evaluate import macro_average
from stabilitybench.evaluation.protocol import HELD_OUT, IN_SAMPLE, ScoredRun, Thresholds
from stabilitybench.evaluation.results import DetectorResult
from stabilitybench.metrics.alarms import alarm_events, warning_mask
from stabilitybench.metrics.collapse import CollapseResult
from stabilitybench.metrics.records import Onset, run_record
from stabilitybench.settings import CollapseSettings, WarningSettings
from stabilitybench.store import RunData


class _Score(BaseDetector):
    """A detector whose score is the `score` column (never registered)."""

    name = "score"
    title = "test score"


def test_alarm_episodes_start_renew_every_sop_and_merge_short_gaps() -> None:
    nan = math.nan
    scores = np.array([2.0, 2.0, 0.0, 3.0, nan, nan, 3.0, 0.0, nan, 5.0])
    # one alarm per episode; NaN carries the state (3, nan, nan, 3 is one episode)
    assert np.flatnonzero(alarm_events(scores, 1.0)).tolist() == [0, 3, 9]
    assert not alarm_events(np.full(4, nan), 0.0).any()
    assert warning_mask(scores, 1.0).tolist() == [1, 1, 0, 1, 1, 1, 1, 0, 0, 1]
    # a gap of at most 1 step is merged: 0..6 is one episode, then 9
    assert np.flatnonzero(alarm_events(scores, 1.0, gap=1)).tolist() == [0, 9]
    # an episode on from step 3 to 20, renewed every 5 steps: 3, 8, 13, 18
    on = np.zeros(25)
    on[3:21] = 1.0
    assert np.flatnonzero(alarm_events(on, 0.5, sop=5)).tolist() == [3, 8, 13, 18]
    # renewals count the steps themselves (every other step logged: 6 steps apart is 3 rows)
    steps = np.arange(0, 50, 2)
    assert np.flatnonzero(alarm_events(on, 0.5, sop=6, steps=steps)).tolist() == [
        3,
        6,
        9,
        12,
        15,
        18,
    ]


def test_a_true_alarm_has_the_collapse_start_within_sph_to_sph_plus_sop_after_it() -> None:
    # collapse starting at 60, SPH 5, SOP 10: alarms at t in [45, 55] are true
    t = np.arange(100)
    assert np.flatnonzero(true_alarms(t, 60, 5, 10)).tolist() == list(range(45, 56))
    assert np.flatnonzero(true_alarms(t, 60, 0, 10)).tolist() == list(range(50, 61))


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
    label: str | None = None,
    params: dict[str, object] | None = None,
) -> ScoredRun:
    """A scored run of n steps: zeros, `spikes` {step: score}; judged runs collapse at
    `collapse_at` (None: they do not), their perturbation starting at `onset`."""
    scores = np.zeros(n)
    for step, value in spikes.items():
        scores[step] = value
    kind = "none" if healthy else "lr_spike"
    info = {
        "run_id": f"{workload}-{seed}-{label or kind}-{collapse_at}-{sorted(spikes)}",
        "workload": workload,
        "seed": seed,
        "status": "done",
        "healthy": healthy,
        "perturbation": {"kind": kind, "label": label or kind, "params": params or {}},
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


def _settings(**given: float) -> WarningSettings:
    return WarningSettings.model_validate(
        {"target_false_alarms": 0.001, "horizon": 20, "sph": 2, "gap": 0, **given}
    )


def test_warning_figures_by_hand() -> None:
    split = _workload()
    # target 0.001 / 1k: each held-out threshold clears the other seeds' largest spike:
    # seeds 0, 1 → just above 6; seed 2 → just above 4, so seed 2's healthy spike 6 alarms.
    # SPH 2, SOP 20: an alarm at t is true for a collapse starting in [t + 2, t + 22].
    result, draws = evaluate_detector(_Score, split, _settings(), np.random.default_rng(0), 200)
    assert result.n_collapses == 3 and result.n_no_lead_possible == 1  # 41 − 40 < SPH
    assert result.event_recall == pytest.approx(2 / 3)  # 45 → 60 and 70 → 80; 90 unwarned
    assert result.lead_time_median == 12.5 and result.lead_time_iqr == [11.25, 13.75]  # 15, 10
    assert result.false_alarms_per_1k == pytest.approx(1000 / 300)  # 1 in 300 healthy steps
    assert result.time_in_warning == pytest.approx(1 / 300)
    # the run that did not collapse: 2 alarms (50, 52) in its 60 steps from the onset on
    assert result.false_alarms_per_1k_not_collapsed == pytest.approx(2000 / 60)
    # collapsed runs: the alarm at 30 (collapse at 80) is not true; 60 + 80 + 41 + 90 steps
    assert result.false_alarms_per_1k_collapsed == pytest.approx(1000 / 271)
    # chance: before their collapses the 3 runs are in warning 5 of 230 steps and start 3
    # episodes in the 225 steps out of warning
    assert result.chance_recall == pytest.approx(1 - (1 - 5 / 230) * math.exp(-3 / 225 * 20))
    assert result.chance_recall_p95 is not None and 0 <= result.chance_recall_p95 <= 1
    # clock: 2 alarms per 60 post-onset steps on the calm run; two alarms from onset + 18
    # (58, 78) warn of the collapses with room 60 − 2 − 40 = 18, 38 and 48 (18 <= room <= 58):
    # 3 of 3 (a clock that stays on waits until d = 20 and warns of 2)
    assert result.clock_recall == pytest.approx(1.0)
    # outcome AUROC, max over [onset 40, 50]: collapsed 10, 0, 0, 0 vs not collapsed 10
    assert result.outcome_auroc == pytest.approx(0.5 / 4)
    # step AUROC: positives at [c − 22, c − 2] of the collapses with room; negatives the
    # healthy runs' and the calm run's steps from the onset (40) on
    flat, labels = [], []
    for run in split.healthy:
        flat.append(run.values("score")[40:])
        labels.append(np.zeros(60, bool))
    for run in (split.judged[0], split.judged[1], split.judged[4]):
        c = run.collapse_at
        flat.append(run.values("score")[c - 22 : c - 1])
        labels.append(np.ones(21, bool))
    flat.append(split.judged[3].values("score")[40:])
    labels.append(np.zeros(60, bool))
    assert result.auroc == pytest.approx(auroc(np.concatenate(flat), np.concatenate(labels)))
    assert result.auroc_ci is not None and result.auroc_ci[0] <= result.auroc + 1e-9
    assert draws is not None and len(draws) == 200
    # merging gaps of up to 5 steps makes 50 and 52 one episode: one false alarm
    merged, _ = evaluate_detector(_Score, split, _settings(gap=5), np.random.default_rng(0), 20)
    assert merged.false_alarms_per_1k_not_collapsed == pytest.approx(1000 / 60)


def _long_run(seed: int, on_from: int | None, collapse_at: int | None, n: int = 1000) -> ScoredRun:
    """A run whose score is 1 from `on_from` to the end (0 before; never without)."""
    spikes = {} if on_from is None else dict.fromkeys(range(on_from, n), 1.0)
    return _run(seed, spikes, collapse_at=collapse_at, onset=300, n=n)


def test_a_warning_that_stays_on_is_credited_and_its_early_renewals_are_charged() -> None:
    healthy = [_run(s, {}, healthy=True, n=1000) for s in range(3)]
    judged = [_long_run(s, 470, 700) for s in range(3)]  # on from 230 steps before a collapse
    split = WorkloadRuns(healthy=healthy, judged=judged)
    rng = np.random.default_rng(0)
    wide, _ = evaluate_detector(_Score, split, _settings(horizon=300, sph=10), rng, 50)
    assert wide.event_recall == 1.0 and wide.lead_time_median == 230  # not capped by SOP
    assert wide.false_alarms_per_1k_collapsed == 0.0  # its one alarm (470) is true
    # SOP 100 < 230: alarms at 470, 570, 670; only 670 has the collapse in [680, 780]
    narrow, _ = evaluate_detector(_Score, split, _settings(horizon=100, sph=10), rng, 50)
    assert narrow.event_recall == 1.0 and narrow.lead_time_median == 230
    assert narrow.false_alarms_per_1k_collapsed == pytest.approx(1000 * 6 / 2100)  # 470, 570 ×3


def test_a_flickering_detector_earns_nothing_it_did_not_predict() -> None:
    # alarms every 40 steps in healthy and collapsing runs alike: it is "right" by chance only
    flicker = dict.fromkeys(range(5, 1000, 40), 1.0)
    healthy = [_run(s, flicker, healthy=True, n=1000) for s in range(3)]
    judged = [_run(s, flicker, collapse_at=650 + 7 * s, onset=300, n=1000) for s in range(6)]
    settings = _settings(horizon=20, sph=5, target_false_alarms=30.0)
    result, _ = evaluate_detector(
        _Score, WorkloadRuns(healthy, judged), settings, np.random.default_rng(1), 20
    )
    assert result.false_alarms_per_1k == pytest.approx(25.0)  # 25 alarms in 1,000 steps
    assert result.event_recall is not None and result.chance_recall_p95 is not None
    assert result.event_recall <= result.chance_recall_p95  # no better than shifted alarms
    assert result.event_recall == pytest.approx(result.chance_recall, abs=0.35)


def test_chance_recall_is_the_poisson_formula_and_matches_random_alarms() -> None:
    lam, sop = 0.004, 150
    assert chance_recall(lam, 0.0, sop) == pytest.approx(1 - math.exp(-lam * sop))
    assert chance_recall(lam, 0.25, sop) == pytest.approx(1 - 0.75 * math.exp(-lam * sop))
    # random point alarms at λ per step in 4,000 runs collapsing at 800: the share with an
    # alarm in [800 − SPH − SOP, 800 − SPH] is 1 − (1 − λ)^(SOP + 1) ≈ 1 − e^(−λ·SOP)
    rng = np.random.default_rng(3)
    alarms = rng.random((4000, 1000)) < lam
    hit = alarms[:, 800 - 10 - sop : 800 - 10 + 1].any(axis=1)
    assert hit.mean() == pytest.approx(1 - math.exp(-lam * sop), abs=0.03)


def test_the_clock_control_at_a_matched_false_alarm_rate() -> None:
    # collapses 280 steps after onset (300); calm runs go on to step 999 after the same onset
    collapses = [(300, 580)] * 4
    calm = [(300, 999)] * 4
    # from onset on, a clock renewed every 100 steps raises 7 alarms in 700 steps = 10 per 1k
    assert clock_recall_at(collapses, calm, 10.0, 10, 100) == 1.0
    # at 5 per 1k a clock that stays on must wait until only 3 alarms fit (d = 400 > 280 − 10)
    # and warns of nothing; but 3 alarms from onset + 170 (470, 570, 670) cost as much and
    # warn of every collapse (170 <= 270 <= 170 + 3·100): the best schedule counts
    assert clock_recall_at(collapses, calm, 5.0, 10, 100) == 1.0
    # one alarm on each calm run is 4 in 2,800 steps (1.43 per 1k): below that, no schedule
    assert clock_recall_at(collapses, calm, 1.4, 10, 100) == 0.0
    # at 1.5 per 1k one alarm per run: it covers one SOP, so of collapses 270 and 680 steps
    # after onset (less SPH) it warns of one
    assert clock_recall_at([(300, 580), (300, 990)], calm, 1.5, 10, 100) == 0.5
    assert clock_recall_at(collapses, [], 5.0, 10, 100) is None


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


def test_the_registered_clock_scores_what_a_clock_should() -> None:
    from stabilitybench.detectors.controls import ClockDetector

    def clock_run(seed: int, collapse_at: int | None, healthy: bool = False) -> ScoredRun:
        steps = np.arange(1000)
        table = pd.DataFrame({"step": steps, "perturbed": (steps >= 300) & (not healthy)})
        values = ClockDetector().score(table)
        spikes = {int(i): float(v) for i, v in enumerate(values) if v}
        return _run(seed, spikes, healthy=healthy, collapse_at=collapse_at, onset=300, n=1000)

    healthy = [clock_run(s, None, healthy=True) for s in range(3)]
    judged = [clock_run(s, 580) for s in range(3)] + [clock_run(s, None) for s in range(3)]
    settings = _settings(horizon=100, sph=10, target_false_alarms=1.0)
    result, _ = evaluate_detector(
        _Score, WorkloadRuns(healthy, judged), settings, np.random.default_rng(0), 20
    )
    # collapses a fixed 280 steps after onset: on from step 301, it warns of every one
    assert result.event_recall == 1.0 and result.lead_time_median == 279
    assert result.false_alarms_per_1k == 0.0  # healthy runs are never perturbed
    # on the runs that did not collapse it alarms at 301, 401, …, 901: 7 in 700 steps
    assert result.false_alarms_per_1k_not_collapsed == pytest.approx(10.0)
    assert result.clock_recall == 1.0  # the clock matched to itself


def test_the_outcome_auroc_between_doses_of_one_perturbation() -> None:
    def dosed(seed: int, label: str, peak: float, collapse_at: int | None) -> ScoredRun:
        run = _run(seed, {45: peak}, collapse_at=collapse_at, n=100)
        return ScoredRun(run.run, replace(run.record, perturbation=label))

    healthy = [_run(s, {}, healthy=True) for s in range(3)]
    strong = [dosed(s, "lr_spike×1000", 5.0 + s, 80) for s in range(3)]
    mild = [dosed(s, "lr_spike×300", p, None) for s, p in enumerate((1.0, 6.0, 8.0))]
    sham = [ScoredRun(r.run, replace(r.record, perturbation_kind="sham")) for r in mild[:1]]
    result, _ = evaluate_detector(
        _Score,
        WorkloadRuns(healthy, [*strong, *mild, *sham]),
        _settings(),
        np.random.default_rng(0),
        20,
    )
    # window maxima over [onset 40, 50]: collapsed 5, 6, 7 vs the milder dose 1, 6, 8: 5 beats
    # 1; 6 beats 1 and ties 6; 7 beats 1 and 6 → 4.5 of 9 pairs; the sham is not a dose
    assert result.outcome_auroc_doses == pytest.approx(4.5 / 9)
    # the sham is the control arm, not a hard negative: its alarms are counted apart
    assert result.false_alarms_per_1k_sham == pytest.approx(1000 / 60)  # its one spike
    assert result.false_alarms_per_1k_not_collapsed == pytest.approx(3000 / 180)  # 1, 6, 8
    # and without a milder dose there is nothing to compare
    alone, _ = evaluate_detector(
        _Score, WorkloadRuns(healthy, [*strong, *sham]), _settings(), np.random.default_rng(0), 20
    )
    assert alone.outcome_auroc_doses is None


def test_recipes_on_trial_count_from_the_spec_onset() -> None:
    # An audit of recipes (no perturbation, `collapse.onset`): the runs on trial take their
    # onset from the spec. The ones that do not diverge are the hard negatives, and the clock
    # control counts from that onset; a healthy run's spec onset is not an onset.
    def on_trial(run: ScoredRun) -> ScoredRun:
        record = replace(
            run.record,
            perturbation="none",
            perturbation_kind="none",
            onset=Onset(40, None, "spec"),
            on_trial=True,
        )
        return ScoredRun(run.run, record)

    healthy = [_run(s, {}, healthy=True) for s in range(3)]
    spec_healthy = ScoredRun(
        healthy[0].run, replace(healthy[0].record, onset=Onset(40, None, "spec"))
    )
    assert spec_healthy.onset_step is None
    diverge = [on_trial(_run(s, {70: 10.0}, collapse_at=80)) for s in range(3)]
    hold = [on_trial(_run(s, {45: 10.0, 70: 10.0}, collapse_at=None)) for s in range(3)]
    assert all(r.onset_step == 40 for r in [*diverge, *hold])
    result, _ = evaluate_detector(
        _Score, WorkloadRuns(healthy, [*diverge, *hold]), _settings(), np.random.default_rng(0), 20
    )
    assert result.event_recall == 1.0
    # two alarms in each hard negative's 60 steps from its onset on
    assert result.false_alarms_per_1k_not_collapsed == pytest.approx(1000 * 6 / 180)
    assert result.clock_recall is not None  # matched at that rate, not "no hard negative"
    # before: every onset was "events"-only and the recipes on trial had no hard negatives
    plain = [ScoredRun(r.run, replace(r.record, on_trial=False)) for r in hold]
    assert all(r.onset_step is None for r in plain)


def test_the_clock_knows_which_perturbation_began() -> None:
    """A detector that alarms on every ramp run, collapsed or not, and stays quiet after the
    spikes: matched over all the runs that did not collapse, a clock cannot be that quiet and
    warns of nothing; matched per perturbation, it warns of what the detector does."""
    healthy = [_run(s, {}, healthy=True) for s in range(3)]
    ramp, spike = {"duration": 40, "ramp": "geometric"}, {"duration": 2}
    ramps = [_run(s, {70: 10}, collapse_at=90, params={**ramp, "factor": 30}) for s in range(3)]
    # the same ramp at a lower dose: seen, but no collapse (the clock knows a ramp, not its dose)
    ramp_calm = _run(3, {70: 10}, params={**ramp, "factor": 10})
    spikes = [_run(s, {}, params={**spike, "factor": 10}) for s in range(2)]  # quiet after
    doomed = _run(4, {70: 10}, collapse_at=90, params={"duration": 20})  # every run collapses
    settings = _settings(horizon=20, sph=2, target_false_alarms=1.0)
    split = WorkloadRuns(healthy, [*ramps, ramp_calm, *spikes, doomed])
    result, _ = evaluate_detector(_Score, split, settings, np.random.default_rng(0), 20)
    assert result.event_recall == 1.0  # the alarm at 70 is 20 steps before each collapse at 90
    # 1 alarm in the 3 calm runs' 180 post-onset steps: a clock raises at least one per run
    assert result.false_alarms_per_1k_not_collapsed == pytest.approx(1000 / 180)
    # per perturbation: on the ramp, 1 alarm in 60 steps; a clock from step 80 (one alarm)
    # warns of the collapses at 90 (80 <= 90 - SPH); the `doomed` collapse is one a clock
    # that knows the perturbation predicts; the spikes have no collapse to warn of
    assert result.clock_recall == 1.0
    # only perturbations none of whose runs escaped collapse: nothing to match the clock on
    alone = WorkloadRuns(healthy, [doomed, *spikes])
    result, _ = evaluate_detector(_Score, alone, settings, np.random.default_rng(0), 20)
    assert result.clock_recall is None
    assert any("no hard negative of the same perturbation" in n for n in result.notes)
