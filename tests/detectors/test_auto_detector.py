"""The self-calibrating detector on hand-made series: a rise above the run's own recent range, in
robust σ (median and MAD·1.4826 of the last 128 logged values, 50 of warm-up), the largest over
the signals, held for 3 rows; a non-finite value at once."""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import numpy as np
import pandas as pd
import pytest

from stabilitybench.detectors.auto import AutoDetector, persistent, rise_scores
from stabilitybench.detectors.base import detector_classes
from stabilitybench.errors import StabilityBenchError

SIGMA = 1.4826 * 0.1  # the robust σ of a series cycling 0.9, 1.0, 1.1 (MAD 0.1)


def _cycle(n: int) -> np.ndarray:
    """0.9, 1.0, 1.1, … : median 1.0 and MAD 0.1 over any window, a few outliers or not."""
    return np.resize([0.9, 1.0, 1.1], n)


def _online(detector: AutoDetector, table: pd.DataFrame) -> np.ndarray:
    detector.reset()
    return np.array([detector.update(row) for row in table.to_dict("records")])


def test_registered_before_the_fitted_baseline_and_the_controls() -> None:
    names = list(detector_classes())
    assert names.index("coherence") < names.index("auto") < names.index("pca")
    assert names[-2:] == ["clock", "random"]
    cls = detector_classes()["auto"]
    assert cls.online and not cls.fitted and not cls.control


def test_a_flat_noisy_run_never_alarms() -> None:
    rng = np.random.default_rng(0)
    n = 2000
    table = pd.DataFrame(
        {
            "step": np.arange(n),
            "loss": 2.0 + 0.05 * rng.standard_normal(n),
            "grad_norm": 1.0 + 0.1 * rng.standard_normal(n),
            "update_ratio": 1e-3 * (1 + 0.1 * rng.standard_normal(n)),
        }
    )
    detector = AutoDetector()
    scores = detector.score(table)
    assert (scores[:50] == 0.0).all()  # the warm-up: nothing scored yet
    assert not detector.alarms(table).any()
    assert np.nanmax(scores) < 4.0


def test_a_sustained_ten_sigma_jump_alarms_after_persist_rows_and_is_named() -> None:
    values = _cycle(130)
    values[100:] = 1.0 + 10 * SIGMA
    table = pd.DataFrame({"step": np.arange(130), "grad_norm": values, "loss": _cycle(130)})
    rises = rise_scores(values)
    # the median and MAD stay 1.0 and 0.1 while the jumped values are few: 10σ each row
    assert rises[100:103] == pytest.approx([10.0] * 3)
    detector = AutoDetector()
    scores = detector.score(table)
    assert scores[101] == pytest.approx(rises[99])  # the least of rows 99, 100, 101
    alarms = detector.alarms(table)
    assert not alarms[:102].any() and alarms[102]  # the third jumped row
    assert detector.attribution(table, 102) == "grad_norm (+10.0σ)"


def test_a_single_row_spike_does_not_alarm() -> None:
    values = _cycle(200)
    values[120] = 100.0
    table = pd.DataFrame({"step": np.arange(200), "grad_norm": values})
    assert rise_scores(values)[120] > 100
    detector = AutoDetector()
    assert not detector.alarms(table).any()
    assert detector.score(table)[120] < 2.0


def test_a_non_finite_loss_scores_inf_at_once() -> None:
    table = pd.DataFrame({"step": np.arange(80), "loss": _cycle(80), "grad_norm": _cycle(80)})
    table.loc[70, "loss"] = np.inf
    detector = AutoDetector()
    scores = detector.score(table)
    assert scores[70] == math.inf and detector.alarms(table)[70]
    assert scores[71] < 6.0  # no persistence of a divergence either: it is not in the window
    assert detector.attribution(table, 70) == "loss (non-finite)"
    table.loc[5, "grad_norm"] = -np.inf  # in the warm-up too, whatever its sign
    assert detector.score(table)[5] == math.inf


def test_rise_by_hand_warm_up_floor_and_gaps() -> None:
    flat = np.append(np.full(60, 2.0), [2.5, 1.0])
    rises = rise_scores(flat)
    # MAD 0: the scale is the floor, 5 % of the median 2.0: (2.5 − 2.0) / 0.1 = 5; a fall is 0
    assert rises[60] == pytest.approx(5.0) and rises[61] == 0.0
    early = np.append(np.full(30, 2.0), 50.0)
    assert rise_scores(early)[30] == 0.0  # the 31st value: fewer than 50 before it
    gappy = np.insert(flat, [10, 61], np.nan)
    scores = rise_scores(gappy)
    assert np.isnan(scores[10]) and np.isnan(scores[62])
    np.testing.assert_array_equal(scores[~np.isnan(gappy)], rises)


def test_persistence_by_hand() -> None:
    raw = np.array([0.0, 7.0, np.nan, 8.0, 9.0, 1.0, np.inf, 2.0])
    np.testing.assert_array_equal(
        persistent(raw, 3), [0.0, 0.0, np.nan, 0.0, 7.0, 1.0, np.inf, 1.0]
    )
    np.testing.assert_array_equal(persistent(raw, 1), raw)


def test_the_signals_it_reads_the_pre_clip_norm_first() -> None:
    n = 130
    table = pd.DataFrame(
        {
            "step": np.arange(n),
            "grad_norm": _cycle(n),  # clipped: flat
            "grad_norm_raw": _cycle(n),
            "actor/update_ratio": _cycle(n),
            "critic/adam_rms_max": _cycle(n),
            "attn_logit_max": _cycle(n),
            "out_logit_max": _cycle(n),
        }
    )
    detector = AutoDetector()
    assert detector.signals(table) == [
        "grad_norm_raw",
        "actor/update_ratio",
        "critic/adam_rms_max",
        "attn_logit_max",
        "out_logit_max",
    ]
    for column, named in [
        ("grad_norm_raw", "grad_norm_raw"),
        ("critic/adam_rms_max", "adam_rms_max"),
        ("attn_logit_max", "attn_logit_max"),
        ("out_logit_max", "out_logit_max"),
        ("actor/update_ratio", "update_ratio"),
    ]:
        jumped = table.copy()
        jumped.loc[100:, column] = 1.0 + 8 * SIGMA
        alarms = detector.alarms(jumped)
        assert alarms[102] and not alarms[:102].any(), column
        assert detector.attribution(jumped, 102) == f"{named} (+8.0σ)", column
    nothing = pd.DataFrame({"step": np.arange(5), "lr": np.ones(5)})
    assert np.isnan(detector.score(nothing)).all() and detector.attribution(nothing, 3) is None


def test_online_equals_offline_row_by_row_with_gaps_and_divergences() -> None:
    rng = np.random.default_rng(3)
    n = 600
    table = pd.DataFrame(
        {
            "step": np.arange(n),
            "loss": 3 - np.linspace(0, 1, n) + 0.05 * rng.standard_normal(n),
            "grad_norm": np.exp(0.2 * rng.standard_normal(n)),
            "update_ratio": 1e-3 * np.exp(0.1 * rng.standard_normal(n)),
            "adam_rms_max": 1 + 0.1 * rng.random(n),
            "attn_logit_max": np.where(np.arange(n) % 10 == 0, 5 + rng.random(n), np.nan),
        }
    )
    table.loc[0, "adam_rms_max"] = np.nan
    table.loc[300:330, "grad_norm"] *= 4.0
    table.loc[450, "loss"] = np.inf
    table.loc[500:505, "update_ratio"] = np.nan
    for options in (
        {},
        {"window": 8, "warmup": 8, "persist": 1},
        {"persist": 5, "window": 40, "warmup": 20},
    ):
        detector = AutoDetector(**options)
        offline = detector.score(table)
        np.testing.assert_allclose(_online(detector, table), offline, rtol=1e-12, atol=0)
        np.testing.assert_allclose(_online(detector, table), offline, rtol=1e-12, atol=0)
    alarms = AutoDetector().alarms(table)
    assert alarms[302] and alarms[302:331].sum() > 20 and not alarms[:302].any()


def test_a_thousand_rows_score_well_under_half_a_second() -> None:
    rng = np.random.default_rng(0)
    n = 1000
    table = pd.DataFrame(
        {
            "step": np.arange(n),
            **{c: 1 + 0.1 * rng.random(n) for c in ("loss", "grad_norm", "update_ratio")},
            **{c: 1 + 0.1 * rng.random(n) for c in ("adam_rms_max", "attn_logit_max")},
        }
    )
    detector = AutoDetector()
    start = time.perf_counter()
    detector.score(table)
    assert time.perf_counter() - start < 0.25


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"window": 4}, ["auto.window", ">= 8", "4"]),
        ({"window": 16.0}, ["auto.window", "integer"]),
        ({"warmup": 0}, ["auto.warmup", "from 1 to window (128)"]),
        ({"window": 20, "warmup": 30}, ["auto.warmup", "from 1 to window (20)", "30"]),
        ({"persist": 0}, ["auto.persist", ">= 1"]),
        ({"persist": True}, ["auto.persist"]),
        ({"z_thresh": 0}, ["auto.z_thresh", "> 0"]),
        ({"z_thresh": math.nan}, ["auto.z_thresh"]),
        ({"scale_floor": -0.1}, ["auto.scale_floor", ">= 0"]),
    ],
)
def test_options_out_of_range_are_one_clear_error(
    options: dict[str, Any], words: list[str]
) -> None:
    with pytest.raises(StabilityBenchError) as error:
        AutoDetector(**options)
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_the_native_rule_is_above_z_thresh() -> None:
    detector = AutoDetector(z_thresh=4.0)
    assert detector.native(np.array([4.0, 4.01, np.inf, np.nan])).tolist() == [
        False,
        True,
        True,
        False,
    ]


def test_a_rollback_keeps_what_a_signal_learned_after_its_warm_up_at_the_snapshot() -> None:
    """The tiny GPT-2's rollback loop: `adam_rms_max` jumps in its warm-up and then holds.
    Restored with a snapshot taken in the warm-up, the detector scored the held level as a rise
    again at the same offset after every restore; the signal's range is the run's, not the
    restored state's, so it keeps what it has learned since. Warmed-up signals are restored."""
    current = AutoDetector()
    level = [1.0 + 0.05 * (i % 3) if i < 40 else 6.5 for i in range(90)]
    rows = [{"loss": 3.0 + 0.01 * (i % 3), "adam_rms_max": v} for i, v in enumerate(level)]
    snapshot = None
    for i, row in enumerate(rows):
        if i == 30:
            snapshot = copy.deepcopy(current)
        current.update(row)
    assert snapshot is not None
    # Replayed from the snapshot as it was, the held level scores as a rise after the warm-up.
    replay = copy.deepcopy(snapshot)
    assert max(replay.update(rows[-1]) for _ in range(30)) > replay.z_thresh
    restored = copy.deepcopy(snapshot).rolled_back(current)
    assert max(restored.update(rows[-1]) for _ in range(30)) < restored.z_thresh
    # neither had the loss finished its warm-up: it keeps the current history too
    assert len(restored._states[0].history) == 90 + 30
    warmed = AutoDetector(warmup=10)
    for row in rows[:30]:
        warmed.update(row)
    later = copy.deepcopy(warmed)
    for row in rows[30:]:
        later.update(row)
    back = copy.deepcopy(warmed).rolled_back(later)
    # loss and adam_rms_max (WATCHED 0 and 3) had finished warm-up: restored, not taken
    assert [len(back._states[i].history) for i in (0, 3)] == [30, 30]
