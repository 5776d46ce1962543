"""The low-dimensional dynamics report on telemetry built to live on a known plane.

Six telemetry columns, written in the monitor's transformed units (log10 for norms and rates,
signed log10 for the loss, as-is for cosines): a base level + a * u + b * v + tiny noise, with
u_j = cos(2 pi j / 6), v_j = sin(2 pi j / 6). Every column then has the same spread (u_j**2 +
v_j**2 = 1), so the monitor's robust standardization divides all by the same sigma, u and v stay
orthogonal (sum_j cos sin = 0), and w = (1, ..., 1) / sqrt(6) is orthogonal to the plane.

Hand-worked levels (standardized units, sigma = 0.1, noise 0.001 -> 0.01 per column):
- two components explain ~100% (each ~50%): n_components_90 == 2;
- the healthy in-subspace distance is chi with 2 dof: 99th percentile sqrt(9.21) = 3.03;
- the healthy residual is 0.01 * chi with 4 dof: 99th percentile 0.01 * sqrt(13.28) = 0.036.
Collapsing runs fluctuate at half that scale (no chance exceedances) and move 0.1 standardized
units per step from step 400 on; they collapse at 600.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from stabilitybench.errors import StabilityBenchError
from stabilitybench.evaluation.manifold import ManifoldResult, manifold_report

COLUMNS = ["loss", "grad_norm", "update_ratio", "param_norm", "grad_cos_ema", "grad_cos_prev"]
KINDS = ["signed_log", "log", "log", "log", "identity", "identity"]
BASE = np.array([0.6, 0.0, -3.0, 1.8, 0.3, 0.1])  # transformed units
SIGMA = 0.1  # spread of each column on healthy runs (transformed units)
NOISE = 0.001
ANGLES = 2 * np.pi * np.arange(6) / 6
U = np.cos(ANGLES)  # |U| = |V| = sqrt(3), U . V = 0
V = np.sin(ANGLES)
W = np.ones(6) / np.sqrt(6)  # orthogonal to U and V
ONSET, COLLAPSE, WINDOW = 400, 600, 100
RATE = 0.1 * SIGMA  # 0.1 standardized units per step


def _table(transformed: np.ndarray) -> pd.DataFrame:
    """(n, 6) transformed values → a telemetry table of raw values (inverse transforms)."""
    raw = {}
    for j, (column, kind) in enumerate(zip(COLUMNS, KINDS, strict=True)):
        f = transformed[:, j]
        if kind == "log":
            raw[column] = 10.0**f
        elif kind == "signed_log":
            raw[column] = np.sign(f) * (10.0 ** np.abs(f) - 1.0)
        else:
            raw[column] = f
    return pd.DataFrame({"step": np.arange(len(transformed)), **raw})


def _on_plane(rng: np.random.Generator, n: int, scale: float = 1.0) -> np.ndarray:
    """(n, 6) transformed rows on the plane span(U, V) around BASE, plus tiny noise."""
    a = rng.normal(0.0, SIGMA * scale, n)[:, None]
    b = rng.normal(0.0, SIGMA * scale, n)[:, None]
    return BASE + a * U + b * V + rng.normal(0.0, NOISE * scale, (n, 6))


def _healthy(n_runs: int = 4, n_rows: int = 500, seed: int = 0) -> list[pd.DataFrame]:
    rng = np.random.default_rng(seed)
    return [_table(_on_plane(rng, n_rows)) for _ in range(n_runs)]


def _drift(n: int, direction: np.ndarray) -> np.ndarray:
    """(n, 6): RATE per step along the unit `direction` from step ONSET on."""
    steps = np.arange(n)
    return np.maximum(steps - ONSET, 0)[:, None] * RATE * direction


def _leaving(seed: int = 1, n: int = 800) -> pd.DataFrame:
    """A run that grows off the plane (along W) from step 400."""
    rng = np.random.default_rng(seed)
    return _table(_on_plane(rng, n, scale=0.5) + _drift(n, W))


def _within(seed: int = 2, n: int = 800) -> pd.DataFrame:
    """A run that moves within the plane (along U) from step 400, and leaves it far only
    after its collapse (rows the report must never read)."""
    rng = np.random.default_rng(seed)
    x = _on_plane(rng, n, scale=0.5) + _drift(n, U / np.sqrt(3))
    x[COLLAPSE:] += 100 * SIGMA * W
    return _table(x)


def _report(collapsing: list[tuple[pd.DataFrame, int, int | None]], **kwargs) -> ManifoldResult:
    return manifold_report(_healthy(), collapsing, window=WINDOW, **kwargs)


def test_healthy_telemetry_on_a_plane_needs_two_components() -> None:
    result = _report([(_leaving(), COLLAPSE, ONSET)])
    assert result.n_components_90 == 2
    assert result.features == sorted(COLUMNS)  # the extractor keeps its columns sorted
    assert result.n_features == 6
    assert result.explained_variance_ratio[0] == pytest.approx(0.5, abs=0.05)
    assert result.explained_variance_ratio[1] > 0.999
    assert len(result.explained_variance_ratio) == 6
    assert (result.n_healthy_runs, result.n_collapsed_runs) == (4, 1)


def test_a_run_leaving_the_plane_shows_in_the_residual_200_steps_early() -> None:
    result = _report([(_leaving(), COLLAPSE, ONSET)])
    # residual at step 599: 0.1 * 199 = 19.9 standardized units; / 0.036 ≈ 550
    assert result.residual_ratio_median is not None
    assert 400 < result.residual_ratio_median < 700
    # step 401 is already 0.1 off the plane (≈ 3 times the healthy 99th percentile)
    assert result.residual_lead_median is not None
    assert abs(result.residual_lead_median - 200) <= 3
    assert result.residual_runs_exceeding == 1
    # in the plane it stays at half the healthy spread: ≈ 1.6 / 3.03
    assert result.subspace_ratio_median is not None
    assert result.subspace_ratio_median < 1.0
    assert result.subspace_lead_median is None
    assert result.subspace_runs_exceeding == 0


def test_a_run_moving_within_the_plane_shows_in_the_subspace_not_the_residual() -> None:
    result = _report([(_within(), COLLAPSE, ONSET)])
    # at step 599: 19.9 standardized units along a component of variance 3 → 19.9 / sqrt(3)
    # = 11.5 Mahalanobis units; / 3.03 ≈ 3.8 (plus the run's own fluctuation)
    assert result.subspace_ratio_median is not None
    assert 3.3 < result.subspace_ratio_median < 4.6
    # above 3.03 once 0.1 (t - 400) / sqrt(3) > 3.03, at t ≈ 452: lead ≈ 148
    assert result.subspace_lead_median is not None
    assert 120 < result.subspace_lead_median < 175
    # the residual stays at half the healthy noise; the far rows after the collapse are not read
    assert result.residual_ratio_median is not None
    assert result.residual_ratio_median < 1.0
    assert result.residual_lead_median is None


def test_medians_are_over_collapsed_runs() -> None:
    collapsing = [(_leaving(seed), COLLAPSE, ONSET) for seed in (1, 3, 5)]
    result = _report(collapsing)
    assert result.n_collapsed_runs == 3
    assert result.residual_runs_exceeding == 3
    assert result.residual_lead_median is not None
    assert abs(result.residual_lead_median - 200) <= 3


def test_an_unknown_onset_reads_every_row_before_the_collapse() -> None:
    result = _report([(_leaving(), COLLAPSE, None)])
    assert result.residual_lead_median is not None
    assert abs(result.residual_lead_median - 200) <= 3


def test_no_collapsing_runs_gives_none_with_a_note() -> None:
    result = _report([])
    assert result.n_components_90 == 2
    assert result.subspace_ratio_median is None
    assert result.residual_ratio_median is None
    assert result.subspace_lead_median is None
    assert result.residual_lead_median is None
    assert any("no collapsed runs" in note for note in result.notes)


def test_too_few_healthy_rows_gives_none_with_a_note() -> None:
    result = manifold_report(
        _healthy(n_runs=1, n_rows=5), [(_leaving(), COLLAPSE, ONSET)], window=WINDOW
    )
    assert result.n_components_90 is None
    assert result.residual_ratio_median is None
    assert any("too few finite healthy rows" in note for note in result.notes)


def test_no_healthy_runs_gives_none_with_a_note() -> None:
    result = manifold_report([], [(_leaving(), COLLAPSE, ONSET)], window=WINDOW)
    assert result.n_components_90 is None
    assert result.n_features == 0
    assert any("no healthy runs" in note for note in result.notes)


def test_a_constant_feature_is_noted_and_any_change_of_it_is_residual() -> None:
    healthy = [t.assign(update_norm=0.5) for t in _healthy()]
    # a run on the plane whose update norm doubles from step 400: log10(2) / 0.05 (the smallest
    # unit of deviation) = 6 standardized units off the manifold; healthy residual 0.036
    within = _table(_on_plane(np.random.default_rng(4), 800, scale=0.5))
    within["update_norm"] = np.where(within["step"] >= ONSET, 1.0, 0.5)
    result = manifold_report(healthy, [(within, COLLAPSE, ONSET)], window=WINDOW)
    assert "update_norm" in result.features
    assert result.n_features == 7
    assert result.n_components_90 == 2
    assert any("constant" in note and "update_norm" in note for note in result.notes)
    assert result.residual_ratio_median is not None
    assert result.residual_ratio_median > 100
    assert result.residual_lead_median == COLLAPSE - ONSET


def test_no_varying_feature_gives_none_with_a_note() -> None:
    healthy = [pd.DataFrame({"step": range(100), "loss": 2.0}) for _ in range(2)]
    result = manifold_report(healthy, [(_leaving(), COLLAPSE, ONSET)], window=WINDOW)
    assert result.n_components_90 is None
    assert result.residual_ratio_median is None
    assert any("no telemetry feature varies" in note for note in result.notes)


def test_controls_and_knobs_are_not_features() -> None:
    healthy = [t.assign(lr=1e-3) for t in _healthy()]
    result = manifold_report(
        healthy, [(_leaving(), COLLAPSE, ONSET)], window=WINDOW, knobs=("grad_cos_prev",)
    )
    assert "lr" not in result.features
    assert "grad_cos_prev" not in result.features
    assert result.n_features == 5


def test_non_finite_rows_are_skipped_and_noted() -> None:
    leaving = _leaving()
    leaving.loc[450, "loss"] = math.inf
    result = _report([(leaving, COLLAPSE, ONSET)])
    assert result.residual_lead_median is not None
    assert abs(result.residual_lead_median - 200) <= 3
    assert any("1 non-finite rows of collapsed runs skipped" in note for note in result.notes)


def test_a_run_without_rows_before_its_collapse_is_noted() -> None:
    result = _report([(_leaving(), ONSET, ONSET)])
    assert result.residual_ratio_median is None
    assert any("no finite row in their window" in note for note in result.notes)


def test_in_sample_or_held_out_percentiles_are_stated() -> None:
    in_sample = _report([(_leaving(), COLLAPSE, ONSET)])
    assert any("in-sample" in note for note in in_sample.notes)
    held_out = _report([(_leaving(), COLLAPSE, ONSET)], held_out=True)
    assert any("held-out" in note for note in held_out.notes)
    assert held_out.n_components_90 == 2
    assert held_out.residual_lead_median is not None
    assert abs(held_out.residual_lead_median - 200) <= 3


@pytest.mark.parametrize(("window", "variance"), [(0, 0.9), (100, 0.0), (100, 1.5)])
def test_a_bad_window_or_variance_is_one_clear_error(window: int, variance: float) -> None:
    with pytest.raises(StabilityBenchError, match=r"window|variance"):
        manifold_report(_healthy(), [], window=window, variance=variance)
