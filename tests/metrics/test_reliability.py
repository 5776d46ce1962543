"""Chan et al. 2020 reliability metrics on tiny arrays with hand-worked answers."""

from __future__ import annotations

import numpy as np
import pytest

from stabilitybench.metrics import reliability as rel


def test_differences_plain_and_per_step() -> None:
    np.testing.assert_allclose(rel.differences([1, 3, 2, 6]), [2, -1, 4])
    np.testing.assert_allclose(rel.differences([1, 3, 2, 6], steps=[0, 2, 4, 6]), [1, -0.5, 2])


def test_iqr_and_curve_range() -> None:
    assert rel.iqr([1, 2, 3, 4, 5]) == pytest.approx(2.0)
    # 95th percentile of [0, 5, 10] is 5 + 0.9·5 = 9.5; minus the first value 0.
    assert rel.curve_range([0, 10, 5]) == pytest.approx(9.5)


def test_dispersion_across_time_by_hand() -> None:
    # diffs [1, -2, 4, 0]; windows of 2: IQR([1,-2]) = 1.5, IQR([-2,4]) = 3, IQR([4,0]) = 2.
    assert rel.dispersion_across_time([0, 1, -1, 3, 3], window=2) == pytest.approx(6.5 / 3)
    # A window longer than the curve is one window: IQR of all diffs [1,-2,4,0] = 1.75 − (−0.5).
    assert rel.dispersion_across_time([0, 1, -1, 3, 3], window=10) == pytest.approx(2.25)
    # A straight line has no dispersion once detrended.
    assert rel.dispersion_across_time(np.arange(20.0)) == pytest.approx(0.0)


def test_cvar_tails_by_hand() -> None:
    values = np.arange(1.0, 21.0)
    # 10th percentile = 2.9 → mean(1, 2); 90th percentile = 18.1 → mean(19, 20).
    assert rel.cvar(values, 0.1, "lower") == pytest.approx(1.5)
    assert rel.cvar(values, 0.1, "upper") == pytest.approx(19.5)
    assert rel.risk_across_runs(values, alpha=0.1) == pytest.approx(1.5)


def test_drawdown_and_risks_by_hand() -> None:
    curve = [1.0, 3.0, 2.0, 5.0, 1.0]
    np.testing.assert_allclose(rel.drawdown(curve), [0, 0, 1, 0, 4])
    # drawdowns sorted [0,0,0,1,4]; 80th percentile = 1.6 → mean of {4}.
    assert rel.long_term_risk(curve, alpha=0.2) == pytest.approx(4.0)
    # diffs [2,-1,3,-4]; 25th percentile = −1.75 → mean of {−4}.
    assert rel.short_term_risk(curve, alpha=0.25) == pytest.approx(-4.0)


def test_dispersion_across_runs_without_filter_by_hand() -> None:
    curves = [[0, 1, 2], [1, 1, 1], [2, 3, 4], [3, 0, 0]]
    np.testing.assert_allclose(rel.dispersion_across_runs(curves, cutoff=None), [1.5, 0.75, 1.75])


def test_lowpass_filter_removes_fast_jitter_and_keeps_levels() -> None:
    n = 60
    jitter = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    offsets = np.array([0.0, 1.0, 2.0, 3.0])[:, None]
    curves = offsets + jitter[None, :]
    filtered = rel.lowpass_filter(curves, cutoff=0.1)
    np.testing.assert_allclose(filtered, np.broadcast_to(offsets, curves.shape), atol=0.05)
    # After filtering, the across-runs IQR is that of the offsets (1.5), not inflated by jitter.
    np.testing.assert_allclose(rel.dispersion_across_runs(curves, cutoff=0.1), 1.5, atol=0.05)
    # A constant curve stays constant, and a slow trend passes through the default cutoff.
    np.testing.assert_allclose(rel.lowpass_filter(np.full((1, 12), 2.0)), 2.0, atol=1e-9)
    ramp = np.linspace(0.0, 1.0, 40)[None, :]
    np.testing.assert_allclose(rel.lowpass_filter(ramp)[:, 5:-5], ramp[:, 5:-5], atol=0.02)


def test_finite_prefix_cuts_at_divergence_and_drops_nan() -> None:
    np.testing.assert_allclose(rel.finite_prefix([1, np.nan, 2, -np.inf, 3]), [1, 2])
