"""IQM, stratified bootstrap CIs, probability of improvement (cross-checked with rliable), rates."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
from scipy import stats

from stabilitybench.metrics.intervals import (
    iqm,
    probability_of_improvement,
    spearman,
    spearman_ci,
    stratified_bootstrap_ci,
    wilson_interval,
)

REPS = 2000


def _scores(seed: int, runs: int, tasks: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(runs, tasks)) * np.arange(1, tasks + 1)


def test_iqm_by_hand_and_against_rliable() -> None:
    from rliable import metrics

    # 8 values: drop the 2 lowest and 2 highest → mean(3, 4, 5, 6).
    assert iqm([8, 1, 7, 2, 6, 3, 5, 4]) == pytest.approx(4.5)
    scores = _scores(0, 10, 3)
    assert iqm(scores) == pytest.approx(float(metrics.aggregate_iqm(scores)), rel=1e-12)


def test_stratified_bootstrap_matches_rliable(rly: ModuleType) -> None:
    from rliable import metrics

    scores = _scores(1, 12, 2)
    ours = stratified_bootstrap_ci(scores, iqm, rng=np.random.default_rng(0), reps=REPS)
    np.random.seed(0)  # rliable draws from NumPy's global generator
    _, intervals = rly.get_interval_estimates(
        {"x": scores}, lambda x: np.array([metrics.aggregate_iqm(x)]), reps=REPS
    )
    theirs = intervals["x"][:, 0]
    width = theirs[1] - theirs[0]
    assert ours[0] < iqm(scores) < ours[1]
    # Different random draws: the bounds agree to within a few % of the interval's width.
    np.testing.assert_allclose(ours, theirs, atol=0.06 * width)


def test_bootstrap_is_reproducible_and_degenerate_cases() -> None:
    scores = _scores(2, 6, 1)[:, 0]
    first = stratified_bootstrap_ci(scores, rng=np.random.default_rng(3), reps=200)
    second = stratified_bootstrap_ci(scores, rng=np.random.default_rng(3), reps=200)
    assert first == second
    assert stratified_bootstrap_ci([2.5], rng=np.random.default_rng(0), reps=50) == (2.5, 2.5)
    assert all(np.isnan(stratified_bootstrap_ci([], rng=np.random.default_rng(0), reps=50)))


def test_probability_of_improvement_by_hand_and_against_rliable() -> None:
    from rliable import metrics

    # Pairs (x, y): (1,2)×2 → 0, (2,2)×2 → ½ each, (3,2)×2 → 1 each: 3 / 6.
    assert probability_of_improvement([1, 2, 3], [2, 2]) == pytest.approx(0.5)
    assert probability_of_improvement([5, 6], [1, 2]) == pytest.approx(1.0)
    x, y = _scores(4, 7, 3) + 0.5, _scores(5, 9, 3)
    assert probability_of_improvement(x, y) == pytest.approx(
        float(metrics.probability_of_improvement(x, y)), abs=1e-12
    )


def test_wilson_interval_known_values() -> None:
    low, high = wilson_interval(0, 5)
    assert low == 0.0 and high == pytest.approx(0.4345, abs=1e-4)
    low, high = wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(5, 5)[1] == 1.0 and wilson_interval(5, 5)[0] == pytest.approx(
        0.5655, abs=1e-4
    )
    assert all(np.isnan(wilson_interval(0, 0)))


def test_spearman_and_its_interval() -> None:
    x, y = [1, 2, 3, 4, 5], [5, 6, 7, 8, 7]
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
    rho, (low, high) = spearman_ci(
        np.arange(10), np.arange(10) ** 2, rng=np.random.default_rng(0), reps=200
    )
    assert rho == pytest.approx(1.0) and low == pytest.approx(1.0) and high == pytest.approx(1.0)
    assert np.isnan(spearman([1, 2, 3], [4, 4, 4]))
    noisy = np.random.default_rng(1).normal(size=30)
    rho, (low, high) = spearman_ci(np.arange(30), noisy, rng=np.random.default_rng(0), reps=500)
    assert low < rho < high and low < 0 < high
