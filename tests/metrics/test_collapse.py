"""Collapse, irreversibility and recovery on hand-made curves with hand-worked answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stabilitybench.metrics.collapse import (
    CENSORED,
    NOT_LEARNED,
    NOT_TESTABLE,
    UNCONFIRMED,
    Calibration,
    analyze_collapse,
    calibrate,
    calibrate_fall_back,
    confirmed_drops,
    evaluation_noise,
    final_performance,
    progress,
    robust_level,
)


def test_progress_by_hand() -> None:
    q = progress([0.0, 4.0, 8.0, -np.inf, np.nan], 0.0, 8.0)
    np.testing.assert_allclose(q[:3], [0.0, 0.5, 1.0])
    assert np.isneginf(q[3]) and np.isnan(q[4])


# The calibrated rule, by hand. Evaluations every 10 steps, onset at 40. P_pre is the median of
# the last 3 evaluations before onset but the first (5, 9, 10 → 9); the floor is the first (0):
# gain 9. With σ = 0.5 and baselines that dropped at most 1.0, a collapse is a drop below P_pre
# of more than max(0.5·9, 3·0.5, 1.0) = 4.5 at two evaluations in a row; a recovery, a drop of at
# most max(0.1·9, 1.0) = 1.0 at two in a row.
TEN = [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]
CAL = Calibration(noise=0.5, baseline_drop=1.0, n_baselines=3)
LEARNED = [0.0, 5.0, 9.0, 10.0, 11.0]


def _judge(perf: list[float], **kw: object) -> object:
    return analyze_collapse(TEN[: len(perf)], perf, onset_step=40, calibration=CAL, **kw)  # type: ignore[arg-type]


def test_reference_level_is_robust_and_never_the_first_evaluation() -> None:
    assert robust_level(TEN, [*LEARNED, 3.0], onset_step=40, k=3) == 9.0
    # only the first evaluation precedes onset: no level
    assert math.isnan(robust_level([0, 10], [7.0, 8.0], onset_step=5, k=3))


def test_a_drop_held_at_two_evaluations_is_a_collapse_and_a_return_a_recovery() -> None:
    result = _judge([*LEARNED, 3.0, 4.0, 8.5, 8.8, 9.5])  # drops 6, 5, then 0.5, 0.2, -0.5
    assert result.collapsed is True and result.irreversible is False and result.reason is None
    assert result.collapse_step == 10  # timed at the evaluation at step 50 (no dense signal)
    assert result.collapse_eval_at == 50 and result.recovery_steps == 20  # back at step 70
    assert (result.perf_0, result.perf_pre, result.drop_threshold) == (0.0, 9.0, 4.5)


def test_a_noise_level_dip_is_not_a_collapse() -> None:
    one_eval = _judge([*LEARNED, 3.0, 8.0, 9.0, 9.0, 9.0])  # a 6 drop, but only once
    assert one_eval.collapsed is False and one_eval.irreversible is False
    small = _judge([*LEARNED, 5.0, 5.0, 9.0, 9.0, 9.0])  # 4 twice: under 4.5
    assert small.collapsed is False
    # baselines that dropped by 7 with nothing done raise the bar above a 6 drop
    noisy = Calibration(noise=0.5, baseline_drop=7.0, n_baselines=3)
    held = analyze_collapse(TEN, [*LEARNED, 3.0, 3.0, 3.0, 3.0, 3.0], 40, calibration=noisy)
    assert held.collapsed is False and held.drop_threshold == 7.0


def test_a_collapse_is_confirmed_by_not_having_recovered() -> None:
    # a 6 drop, then 3 (under half the gain, 4.5, but beyond what nothing-done runs show,
    # max(3·0.5, 1.0) = 1.5): still away from healthy, so the collapse at 50 is confirmed; it
    # never comes back within 1.0, so it is irreversible
    partial = _judge([*LEARNED, 3.0, 6.0, 7.0, 7.0, 7.0])
    assert partial.collapsed is True and partial.irreversible is True
    assert partial.collapse_eval_at == 50
    # the same 6 drop followed by a return within 1.5 is a noise-level dip
    assert _judge([*LEARNED, 3.0, 7.6, 9.0, 9.0, 9.0]).collapsed is False


def test_a_collapse_without_a_return_is_irreversible_only_with_room_left() -> None:
    down = _judge([*LEARNED, 3.0, 4.0, 3.5, 4.0, 3.0])
    assert down.collapsed and down.irreversible is True and down.recovery_steps is None
    late = _judge([*LEARNED, 9.0, 9.0, 9.0, 3.0, 4.0])  # confirmed at the last evaluation
    assert late.collapsed is True and late.irreversible is None and late.reason == CENSORED


def test_a_drop_at_the_last_evaluation_is_unconfirmed() -> None:
    result = _judge([*LEARNED, 9.0, 9.0, 9.0, 9.0, 3.0])
    assert result.collapsed is None and result.reason == UNCONFIRMED


def test_a_run_that_had_not_learned_is_not_judged() -> None:
    result = _judge([0.0, 0.5, 0.2, 0.4, 0.3, -3.0, -3.0, -3.0])  # gain 0.4 < 3σ = 1.5
    assert result.collapsed is None and result.reason == NOT_LEARNED
    assert result.progress_undefined


def test_non_finite_loss_is_an_irreversible_collapse_at_once() -> None:
    result = _judge([*LEARNED, -np.inf])
    assert result.collapsed and result.irreversible and result.diverged
    assert result.collapse_step == 10 and math.isinf(result.min_progress)
    # even on a run that had not learned, and without baselines to calibrate on
    bare = analyze_collapse(TEN[:6], [0.0, 0.1, 0.1, 0.1, 0.1, -np.inf], onset_step=40)
    assert bare.collapsed and bare.irreversible


def test_without_unperturbed_runs_of_other_seeds_a_run_is_not_testable() -> None:
    result = analyze_collapse(TEN, [*LEARNED, 3.0, 3.0, 3.0, 3.0, 3.0], onset_step=40)
    assert result.collapsed is None and result.reason == NOT_TESTABLE
    assert calibrate([], 40) is None


def test_nan_evaluation_is_skipped_not_a_collapse() -> None:
    perf = [*LEARNED, 3.0, float("nan"), 4.0, 8.5, 8.8, 9.5]
    result = analyze_collapse([*TEN, 100], perf, onset_step=40, calibration=CAL)
    assert result.n_missing_evals == 1
    assert result.collapsed and result.collapse_step == 10 and result.recovery_steps == 30


def test_divergence_before_onset_has_negative_collapse_step() -> None:
    result = analyze_collapse([0, 10, 20], [0.0, 5.0, -np.inf], onset_step=40, calibration=CAL)
    assert result.collapsed and result.irreversible and result.collapse_step == -20


def test_no_onset_cannot_be_judged_unless_diverged() -> None:
    assert analyze_collapse(TEN[:5], LEARNED, onset_step=None).collapsed is None
    diverged = analyze_collapse([0, 10], [0.0, -np.inf], onset_step=None)
    assert diverged.collapsed and diverged.irreversible


def test_env_steps_are_counted_from_the_onset_env_step() -> None:
    env = [s * 100 for s in TEN]
    result = _judge([*LEARNED, 3.0, 4.0, 8.5, 8.8, 9.5], env_steps=env, onset_env_step=4000)
    assert result.collapse_env_steps == 1000 and result.recovery_env_steps == 2000


def test_calibration_from_baselines_by_hand() -> None:
    # Changes after the first evaluation: +1, -1, +1, -1 → IQR 2 → σ = 2 / 1.349 / √2.
    steady = (np.array(TEN[:6]), np.array([0.0, 5.0, 6.0, 5.0, 6.0, 5.0]))
    assert evaluation_noise([steady]) == pytest.approx(2 / 1.349 / np.sqrt(2))
    # P_pre 6 (median of 5, 6, 5... last 3 before 40: 5, 6, 5 → 5); drops held twice from 40 on.
    dips = (np.array(TEN[:7]), np.array([0.0, 5.0, 6.0, 5.0, 2.0, 1.0, 4.0]))
    cal = calibrate([steady, dips], 40, quantile=1.0)
    assert cal is not None and cal.n_baselines == 2
    assert cal.baseline_drop == pytest.approx(3.0)  # dips: drops 3, 4, 1 → held 3, 1 → 3
    np.testing.assert_allclose(confirmed_drops(np.array([3.0, 4.0, 1.0]), 2), [3.0, 1.0])


def test_final_performance() -> None:
    assert final_performance([1.0, 2.0, 3.0, np.nan, 6.0]) == pytest.approx(11 / 3)
    assert final_performance([1.0, 2.0, -np.inf]) == -np.inf
    assert math.isnan(final_performance([np.nan]))


def test_a_run_without_an_onset_is_judged_by_its_fall_back_from_its_best_level() -> None:
    # best so far 10 (after the first evaluation), floor 0: falling back by more than
    # max(0.5·10, 3·0.5, 1.0) = 5 at two evaluations in a row is a collapse; within 1 a recovery
    steps = [0, 10, 20, 30, 40, 50, 60, 70, 80]
    fell = analyze_collapse(steps, [0, 5, 9, 10, 10, 3, 3, 9.5, 10], None, calibration=CAL)
    assert fell.collapsed is True and fell.irreversible is False
    assert (fell.collapse_at, fell.perf_pre, fell.drop_threshold) == (50, 10.0, 5.0)
    assert fell.collapse_step is None and fell.recovery_steps == 20  # back at step 70
    # a run that learns slower than the healthy runs never falls back: not a collapse
    slow = analyze_collapse(steps, [0, 1, 2, 3, 4, 5, 6, 7, 8], None, calibration=CAL)
    assert slow.collapsed is False
    flat = analyze_collapse(
        steps, [0, 0.1, 0.2, 0.1, 0.2, 0.1, 0.2, 0.1, 0.2], None, calibration=CAL
    )
    assert flat.collapsed is None and flat.reason == NOT_LEARNED
    # healthy runs that fall back by 8 with nothing done make a fall back of 7 ordinary
    rough = Calibration(noise=0.5, baseline_drop=8.0, n_baselines=3)
    assert (
        analyze_collapse(steps, [0, 5, 9, 10, 10, 3, 3, 9.5, 10], None, calibration=rough).collapsed
        is False
    )


def test_the_fall_back_calibration_from_healthy_runs_by_hand() -> None:
    steps = np.array([0, 10, 20, 30, 40, 50])
    dips = (steps, np.array([0.0, 4.0, 8.0, 5.0, 6.0, 8.0]))  # from 8: falls 3 then 2 → held 2
    cal = calibrate_fall_back([dips], quantile=1.0)
    assert cal is not None and cal.baseline_drop == pytest.approx(2.0)
    assert calibrate_fall_back([]) is None
