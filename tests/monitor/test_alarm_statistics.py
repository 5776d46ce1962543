"""The evaluation protocol's own functions on tiny hand-built runs, with answers worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from stabilitybench.metrics.collapse import CollapseConfig
from stabilitybench.metrics.records import Onset, run_record
from stabilitybench.monitor.alarms import Trial, alarm_stats
from stabilitybench.monitor.protocol import HELD_OUT, IN_SAMPLE, ScoredRun, Thresholds
from stabilitybench.store import RunData


def _alarms(n: int, at: list[int]) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    out[at] = True
    return out


def _trial(collapsed: bool) -> Trial:
    steps = np.arange(40)
    return Trial(
        steps,
        None,
        onset=10,
        collapsed=collapsed,
        collapse_at=20 if collapsed else None,
        collapse_at_env=None,
    )


def test_recall_precision_lead_time_and_false_alarms_by_hand() -> None:
    trials = [_trial(True), _trial(True), _trial(False), _trial(False)]
    alarms = [
        _alarms(40, [5, 14]),  # the alarm at 5 is before onset; 14 warns 6 steps early: a hit
        _alarms(40, [25]),  # after the collapse at 20: lead -5, not a warning
        _alarms(40, [12]),  # an alarm on a run that never collapses
        _alarms(40, []),
    ]
    healthy = [_alarms(1000, [100, 101, 102, 500]), _alarms(1000, [])]  # 2 up-crossings
    stats = alarm_stats(trials, alarms, healthy)
    assert stats.recall == 0.5  # 1 of 2 collapses warned
    assert stats.precision == 0.5  # 1 warning among 2 alarmed runs (the late one not counted)
    assert stats.lead_time_median == 0.5  # median of [6, -5]
    assert stats.lead_time_iqr == [-2.25, 3.25]  # -5 + 11/4, -5 + 3·11/4
    assert stats.false_alarms_per_1k == 1.0  # 2 events in 2,000 healthy steps
    assert stats.lead_time_env_steps_median is None and stats.notes == []  # an LM audit


def test_nothing_to_estimate_is_none_with_a_note() -> None:
    stats = alarm_stats([_trial(False)], [_alarms(40, [])], [])
    assert stats.recall is None and stats.precision is None and stats.lead_time_median is None
    assert stats.false_alarms_per_1k is None
    assert "too few runs for recall: 0 collapsed, 1 recovered" in stats.notes
    assert "no alarms on perturbed runs" in stats.notes
    assert any("0 baseline runs" in n for n in stats.notes)


def _healthy(seed: int, spike: float, workload: str = "w") -> ScoredRun:
    scores = np.zeros(10)
    scores[4] = spike
    info = {"run_id": f"{workload}{seed}", "workload": workload, "seed": seed, "status": "done"}
    frame = pd.DataFrame({"step": np.arange(10), "score": scores})
    run = RunData(info["run_id"], info, frame, pd.DataFrame(), pd.DataFrame(), scores=frame)
    return ScoredRun(run, run_record(info, None, Onset(), CollapseConfig()))


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
    assert thresholds.alarms(runs[0]).tolist() == [False] * 4 + [True] + [False] * 5
    assert thresholds.median(runs) == pytest.approx(3.01)


def test_a_workload_with_one_seed_is_calibrated_in_sample() -> None:
    runs = [_healthy(0, 5.0, "a"), _healthy(0, 3.0, "b"), _healthy(1, 4.0, "b")]
    thresholds = Thresholds("score", runs, target=60.0)
    # workload a: only seed 0 → its own 10 steps; one up-crossing is 100 per 1k > 60, so the
    # threshold is the largest value plus a margin
    assert thresholds.of(runs[0]) == pytest.approx(5.0 + 5e-6)
    assert math.isfinite(thresholds.of(runs[1]))
    assert thresholds.calibration == IN_SAMPLE
