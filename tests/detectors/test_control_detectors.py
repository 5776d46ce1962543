"""The control detectors on hand-made tables: the clock since the onset, a reproducible random
score; both registered last and marked as controls."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stabilitybench.detectors.base import detector_classes
from stabilitybench.detectors.controls import (
    ClockDetector,
    RandomDetector,
    splitmix64_uniform,
    stream_seed,
)


def _online(detector: ClockDetector | RandomDetector, table: pd.DataFrame) -> list[float]:
    detector.reset()
    return [detector.update(row) for row in table.to_dict("records")]


def _window_table() -> pd.DataFrame:
    """Steps 100..599; a perturbation window over steps 300..309 (the flag off again after)."""
    steps = np.arange(100, 600)
    return pd.DataFrame(
        {"step": steps, "loss": 2.0 - steps / 1000, "perturbed": (steps >= 300) & (steps < 310)}
    )


def test_the_controls_are_registered_last_and_marked() -> None:
    classes = detector_classes()
    assert list(classes)[-2:] == ["clock", "random"]
    assert [n for n, c in classes.items() if c.control] == ["clock", "random"]
    assert not any(c.fitted for c in (ClockDetector, RandomDetector))


def test_the_clock_counts_steps_since_the_first_perturbed_row() -> None:
    table = _window_table()
    scores = ClockDetector().score(table)
    steps = table["step"].to_numpy()
    assert scores[steps < 300].tolist() == [0.0] * 200
    # steps since the onset at step 300, still counting after the window closed at 309
    assert scores[steps == 300][0] == 0.0 and scores[steps == 301][0] == 1.0
    assert scores[steps == 310][0] == 10.0 and scores[-1] == 599 - 300
    alarms = ClockDetector().native(scores)
    assert int(np.argmax(alarms)) == 201 and alarms[201:].all()  # from step 301 on
    np.testing.assert_array_equal(_online(ClockDetector(), table), scores)


def test_the_clock_is_zero_without_a_perturbation_and_uses_the_row_index_without_steps() -> None:
    table = _window_table()
    assert (ClockDetector().score(table.drop(columns="perturbed")) == 0).all()
    assert (ClockDetector().score(table.assign(perturbed=False)) == 0).all()
    flags = pd.Series([None, None, True, None, None], dtype=object)  # a flag logged sparsely
    rows = pd.DataFrame({"perturbed": flags})
    assert ClockDetector().score(rows).tolist() == [0.0, 0.0, 0.0, 1.0, 2.0]
    assert _online(ClockDetector(), rows) == [0.0, 0.0, 0.0, 1.0, 2.0]


def test_the_random_stream_is_splitmix64() -> None:
    # SplitMix64 seeded with 0 starts 0xe220a8397b1dcdaf (Vigna's reference implementation)
    first = splitmix64_uniform(0, np.asarray([0]))[0]
    assert first == (0xE220A8397B1DCDAF >> 11) * 2.0**-53
    # the seed is the bit pattern of the first row's loss (else grad_norm, else step, else 0)
    assert stream_seed({"loss": 1.0, "step": 0}) == 0x3FF0000000000000
    assert stream_seed({"loss": float("nan"), "grad_norm": 2.0}) == 0x4000000000000000
    assert stream_seed({"step": 0}) == 0 and stream_seed({}) == 0


def test_the_random_control_is_reproducible_per_run_and_uniform() -> None:
    n = 100_000
    table = pd.DataFrame({"step": np.arange(n), "loss": np.full(n, 2.5)})
    scores = RandomDetector().score(table)
    np.testing.assert_array_equal(RandomDetector().score(table), scores)
    other = RandomDetector().score(table.assign(loss=2.5000001))
    assert not np.allclose(other, scores)
    assert (scores >= 0).all() and (scores < 1).all()
    ks = np.max(np.abs(np.sort(scores) - (np.arange(n) + 0.5) / n))
    assert ks < 1.36 / np.sqrt(n)  # the 5% Kolmogorov–Smirnov bound for a uniform sample
    lag1 = np.corrcoef(scores[:-1], scores[1:])[0, 1]
    assert abs(lag1) < 4 / np.sqrt(n)
    alarms = int(RandomDetector().native(scores).sum())
    assert abs(alarms - n / 1000) < 4 * np.sqrt(n / 1000)  # one step in 1,000


def test_the_random_control_runs_online_as_offline() -> None:
    table = _window_table().iloc[::3]  # steps 100, 103, …: a row's number follows its step
    scores = RandomDetector().score(table)
    assert _online(RandomDetector(), table) == pytest.approx(scores.tolist(), abs=0)
    seed = stream_seed({"loss": float(table["loss"].iloc[0])})
    np.testing.assert_array_equal(scores, splitmix64_uniform(seed, table["step"].to_numpy()))
