"""Stability scores and dose-response points, worked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from stabilitybench.metrics.stability import (
    collapse_rate_by,
    stability_before_final,
    stability_score,
    within_group_rank,
)


def test_stability_score_by_hand() -> None:
    # No collapse, dispersion 0.1 → D = 0.5: 0.75·1 + 0.25·0.5.
    assert stability_score(False, False, None, None, 0.1) == pytest.approx(0.875)
    # Recovered after 20 of the 80 steps left → C = 0.75; dispersion 0 → D = 1.
    assert stability_score(True, False, 20, 80, 0.0) == pytest.approx(0.8125)
    # Irreversible without a usable dispersion → C alone = 0.
    assert stability_score(True, True, None, None, float("nan")) == 0.0
    assert stability_score(None, None, None, None, None) == 1.0


def test_stability_before_the_final_window_by_hand() -> None:
    # the last 3 evaluations are left out; before them: gain 4 − 0 = 4, largest drawdown 4 → 2
    perf = [0.0, 4.0, 2.0, 3.0, 9.0, 9.0, 9.0]
    assert stability_before_final(perf) == pytest.approx(1 - 2 / 4)
    assert stability_before_final([0.0, 1.0, -np.inf, 5.0, 5.0, 5.0]) == 0.0  # diverged there
    assert stability_before_final([0.0, 1.0, 5.0, 5.0]) is None  # too few before the end
    assert stability_before_final([3.0, 2.0, 1.0, 0.0, 5.0, 5.0, 5.0]) is None  # never gained


def test_collapse_rate_by_dose() -> None:
    points = collapse_rate_by([3, 50, 50, 50, 10, 10], [False, True, True, None, False, True])
    assert [(p.x, p.collapse_rate, p.n, p.n_collapsed) for p in points] == [
        (3.0, 0.0, 1, 0),
        (10.0, 0.5, 2, 1),
        (50.0, 1.0, 2, 2),
    ]
    assert points[1].ci == pytest.approx([0.0945, 0.9055], abs=1e-4)  # Wilson, 1 of 2


def test_within_group_rank() -> None:
    ranks = within_group_rank([10.0, 30.0, 20.0, -1.0, np.nan], ["a", "a", "a", "b", "b"])
    np.testing.assert_allclose(ranks[:4], [0.0, 1.0, 0.5, 0.5])
    assert np.isnan(ranks[4])
