"""The gradient-coherence guard on hand-made series: a drop below the run's own recent range,
in robust σ (median and MAD·1.4826 of the last 100 logged values, 20 of warm-up)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from stabilitybench.detectors.coherence import CoherenceDetector, coherence_drop_scores


def _online(table: pd.DataFrame) -> list[float]:
    detector = CoherenceDetector()
    detector.reset()
    return [detector.update(row) for row in table.to_dict("records")]


def test_a_sharp_drop_after_a_flat_stretch_scores_in_units_of_the_least_scale() -> None:
    values = np.full(61, 0.5)
    values[60] = 0.2
    scores = coherence_drop_scores(values)
    # a flat history has MAD 0: its scale is the floor, 0.01; (0.5 − 0.2) / 0.01 = 30
    assert scores[60] == pytest.approx(30.0) and scores[:60].tolist() == [0.0] * 60
    table = pd.DataFrame({"step": np.arange(61), "grad_cos_ema": values})
    assert CoherenceDetector().alarms(table).tolist() == [False] * 60 + [True]


def test_a_wiggle_at_noise_level_scores_about_one_sigma() -> None:
    history = np.tile([0.4, 0.6], 20)  # median 0.5, every deviation 0.1: MAD 0.1
    scores = coherence_drop_scores(np.append(history, [0.35, 0.8]))
    assert scores[40] == pytest.approx(0.15 / (1.4826 * 0.1))  # 1.01σ below
    # the next history, 41 values with the 0.35, has median 0.4 and MAD 0.05 (the 21st of
    # 0, …, 0, 0.05, 0.2, …); a rise scores negative
    assert scores[41] == pytest.approx((0.4 - 0.8) / (1.4826 * 0.05))
    assert not CoherenceDetector().native(scores).any()


def test_the_warm_up_and_the_window() -> None:
    early = np.full(30, 0.5)
    early[10] = -0.9  # the 11th value: fewer than 20 logged before it
    assert coherence_drop_scores(early)[10] == 0.0
    level = np.concatenate([np.zeros(100), np.ones(101)])
    scores = coherence_drop_scores(level)
    # at 150 the last 100 values are 50 zeros and 50 ones: median 0.5, MAD 0.5
    assert scores[150] == pytest.approx(-0.5 / (1.4826 * 0.5))
    assert scores[200] == 0.0  # the zeros have left the window


def test_a_missing_value_is_skipped_and_a_non_finite_one_is_an_alarm() -> None:
    values = np.append(np.tile([0.4, 0.6], 20), [0.35])
    gappy = np.insert(values, [5, 25], np.nan)
    scores = coherence_drop_scores(gappy)
    assert np.isnan(scores[5]) and np.isnan(scores[26])
    np.testing.assert_array_equal(scores[~np.isnan(gappy)], coherence_drop_scores(values))
    broken = values.copy()
    broken[30] = -np.inf
    scores = coherence_drop_scores(broken)
    assert scores[30] == math.inf
    assert scores[-1] == pytest.approx(coherence_drop_scores(np.delete(values, 30))[-1])


def test_the_score_is_the_larger_drop_of_the_two_cosines() -> None:
    n = 61
    ema = np.full(n, 0.5)
    ema[60] = 0.2  # 30σ
    prev = np.tile([0.1, 0.3], n)[:n]  # MAD 0.1
    prev[60] = 0.05  # (0.2 − 0.05) / 0.14826 ≈ 1.01σ
    table = pd.DataFrame({"step": np.arange(n), "grad_cos_ema": ema, "grad_cos_prev": prev})
    # not logged at the first step (as the probe: no previous gradient), so a later gap is not
    # taken for a divergence (`columns.mark_nonfinite`)
    table.loc[0, "grad_cos_ema"] = np.nan
    scores = CoherenceDetector().score(table)
    assert scores[60] == pytest.approx(30.0)
    table.loc[60, "grad_cos_ema"] = np.nan  # not logged there: the other cosine decides
    assert CoherenceDetector().score(table)[60] == pytest.approx(0.15 / 0.14826)
    assert CoherenceDetector().signals(table) == ["grad_cos_ema", "grad_cos_prev"]


def test_online_equals_offline_with_gaps_and_a_divergence() -> None:
    rng = np.random.default_rng(0)
    n = 400
    table = pd.DataFrame(
        {
            "step": np.arange(n),
            "grad_cos_ema": 0.6 + 0.02 * rng.standard_normal(n),
            "grad_cos_prev": 0.3 + 0.1 * rng.standard_normal(n),
            "nonfinite_grads": np.zeros(n),
        }
    )
    table.loc[0, ["grad_cos_ema", "grad_cos_prev"]] = np.nan  # no previous gradient yet
    table.loc[::7, "grad_cos_prev"] = np.nan
    table.loc[250:, "grad_cos_ema"] -= 0.3  # coherence collapses
    table.loc[390, ["grad_cos_ema", "nonfinite_grads"]] = [np.nan, 3.0]  # a divergence
    offline = CoherenceDetector().score(table)
    np.testing.assert_allclose(_online(table), offline, rtol=1e-12, atol=0)
    assert offline[250] > 6 and offline[390] == math.inf
    assert not CoherenceDetector().native(offline[:250]).any()
