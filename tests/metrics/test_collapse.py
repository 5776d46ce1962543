"""Collapse, irreversibility and recovery on hand-made curves with hand-worked answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stabilitybench.metrics.collapse import (
    analyze_collapse,
    collapse_index,
    final_performance,
    progress,
    progress_scale,
    recovery_index,
    reference_levels,
)

STEPS = [0, 10, 20, 30, 40, 50, 60, 70]
# perf_0 = 0; the last 3 evaluations before onset (step 40) are 5, 9, 10 → perf_pre = 8, q = perf / 8.
RECOVERS = [0.0, 5.0, 9.0, 10.0, 11.0, 3.6, 6.0, 10.5]  # q: …, 1.375, 0.45, 0.75, 1.3125
STAYS_DOWN = [0.0, 5.0, 9.0, 10.0, 11.0, 3.6, 6.0, 7.0]  # last q = 0.875 < 0.9


def test_reference_levels_and_progress_by_hand() -> None:
    perf_0, perf_pre = reference_levels(STEPS, RECOVERS, onset_step=40, k=3)
    assert (perf_0, perf_pre) == (0.0, 8.0)
    q = progress([0.0, 4.0, 8.0, -np.inf, np.nan], perf_0, perf_pre)
    np.testing.assert_allclose(q[:3], [0.0, 0.5, 1.0])
    assert np.isneginf(q[3]) and np.isnan(q[4])


def test_collapse_then_recovery() -> None:
    result = analyze_collapse(STEPS, RECOVERS, onset_step=40)
    assert result.collapsed is True and result.irreversible is False
    assert result.collapse_step == 10  # evaluation at step 50, onset at 40
    assert result.recovery_steps == 20  # q re-crosses 0.9 at step 70
    assert result.min_progress == pytest.approx(0.45)
    assert not result.diverged and not result.progress_undefined


def test_run_that_never_recovers_is_irreversible() -> None:
    result = analyze_collapse(STEPS, STAYS_DOWN, onset_step=40)
    assert result.collapsed and result.irreversible
    assert result.collapse_step == 10 and result.recovery_steps is None


def test_run_that_never_drops_below_the_threshold_does_not_collapse() -> None:
    perf = [0.0, 5.0, 9.0, 10.0, 11.0, 4.1, 6.0, 7.0]  # lowest q = 4.1 / 8 = 0.5125 >= 0.5
    result = analyze_collapse(STEPS, perf, onset_step=40)
    assert result.collapsed is False and result.irreversible is False
    assert result.collapse_step is None
    # A stricter threshold turns the same curve into an irreversible collapse.
    strict = analyze_collapse(STEPS, perf, onset_step=40, threshold=0.6)
    assert strict.collapsed and strict.irreversible and strict.collapse_step == 10


def test_non_finite_loss_is_an_irreversible_collapse() -> None:
    perf = [0.0, 5.0, 9.0, 10.0, 11.0, -np.inf]
    result = analyze_collapse(STEPS[:6], perf, onset_step=40)
    assert result.collapsed and result.irreversible and result.diverged
    assert result.collapse_step == 10
    assert math.isinf(result.min_progress)
    # Nothing after a divergence can count as recovery.
    assert recovery_index([1.0, 0.2, -np.inf, 1.0], 1) is None


def test_nan_evaluation_is_skipped_not_a_collapse() -> None:
    perf = list(RECOVERS)
    perf[4] = float("nan")
    result = analyze_collapse(STEPS, perf, onset_step=40)
    assert result.n_missing_evals == 1
    assert result.collapse_step == 10 and result.recovery_steps == 20
    assert collapse_index([np.nan, 0.2], [True, True]) == 1


def test_divergence_before_onset_has_negative_collapse_step() -> None:
    result = analyze_collapse([0, 10, 20], [0.0, 5.0, -np.inf], onset_step=40)
    assert result.collapsed and result.irreversible and result.collapse_step == -20


def test_no_learning_before_onset_uses_the_relative_scale() -> None:
    # perf_0 = perf_pre = -2: progress undefined, q = 1 + (perf + 2) / 2.
    origin, scale, undefined = progress_scale(-2.0, -2.0)
    assert undefined and (origin, scale) == (-4.0, 2.0)
    steps = [0, 10, 20, 30, 40, 50]
    dropped = analyze_collapse(steps, [-2.0, -2.0, -2.0, -2.0, -2.0, -3.5], onset_step=40)
    assert dropped.progress_undefined and dropped.collapsed and dropped.collapse_step == 10
    assert dropped.min_progress == pytest.approx(0.25)
    held = analyze_collapse(steps, [-2.0, -2.0, -2.0, -2.0, -2.0, -2.5], onset_step=40)
    assert held.progress_undefined and held.collapsed is False


def test_no_onset_cannot_be_judged_unless_diverged() -> None:
    assert analyze_collapse(STEPS, RECOVERS, onset_step=None).collapsed is None
    diverged = analyze_collapse([0, 10], [0.0, -np.inf], onset_step=None)
    assert diverged.collapsed and diverged.irreversible


def test_env_steps_are_counted_from_the_onset_env_step() -> None:
    env = [s * 100 for s in STEPS]
    result = analyze_collapse(STEPS, RECOVERS, onset_step=40, env_steps=env, onset_env_step=4000)
    assert result.collapse_env_steps == 1000 and result.recovery_env_steps == 2000


def test_final_performance() -> None:
    assert final_performance([1.0, 2.0, 3.0, np.nan, 6.0]) == pytest.approx(11 / 3)
    assert final_performance([1.0, 2.0, -np.inf]) == -np.inf
    assert math.isnan(final_performance([np.nan]))
