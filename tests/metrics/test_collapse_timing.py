"""Collapse timed to the step by a dense performance signal, on tiny hand-worked curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stabilitybench.metrics.collapse import (
    NO_DENSE_SIGNAL,
    Calibration,
    analyze_collapse,
    dense_crossing,
    dense_reference_levels,
)
from stabilitybench.metrics.dense import DenseSignal, ema, episode_return_signal, loss_signal
from stabilitybench.metrics.records import audit_records
from stabilitybench.metrics.summary import audit_notes
from stabilitybench.settings import CollapseSettings
from stabilitybench.store import RunStore

# These tests are about *timing*: one evaluation confirms a collapse (as before the calibrated
# rule), against baselines that show no noise and no drop.
CAL = Calibration(noise=0.0, baseline_drop=0.0, n_baselines=1)
ONE = CollapseSettings(confirm_evals=1, evals_after=0)
ONE_K2 = CollapseSettings(pre_evals=2, confirm_evals=1, evals_after=0)

STEPS = [0, 10, 20, 30, 40, 50, 60, 70]
# perf_0 = 0, P_pre = median(5, 9, 10) = 9 (evaluations at 10, 20, 30; onset 40): a drop of
# more than 4.5 is a collapse (3.6 at 50), back within 0.9 a recovery (10.5 at 70).
RECOVERS = [0.0, 5.0, 9.0, 10.0, 11.0, 3.6, 6.0, 10.5]
HEALTHY = [0.0, 5.0, 9.0, 10.0, 11.0, 10.0, 10.0, 10.0]


def _dense(levels: dict[int, float], end: int = 71) -> DenseSignal:
    """A signal on every step 0..end-1 holding each level from its step until the next."""
    steps = np.arange(end, dtype=float)
    starts = sorted(levels)
    perf = np.array([levels[max(s for s in starts if s <= t)] for t in range(end)], dtype=float)
    return DenseSignal(steps, perf, "loss_ema")


# The dense twin of RECOVERS: 0, 5, 9, 10 from steps 0, 10, 20, 30, so its own perf_0 = 0 and
# perf_pre = mean(5, 9, 10) = 8 (the values at the evaluations 10, 20, 30).
BEFORE = {0: 0.0, 10: 5.0, 20: 9.0, 30: 10.0}


def test_dense_crossing_before_the_confirming_evaluation() -> None:
    # Dense q = 3 / 8 = 0.375 < 0.5 from step 45: the collapse the evaluation at 50 confirms.
    dense = _dense({**BEFORE, 45: 3.0, 60: 10.5})
    assert dense_reference_levels(dense, STEPS, RECOVERS, onset_step=40) == (0.0, 8.0)
    r = analyze_collapse(STEPS, RECOVERS, onset_step=40, calibration=CAL, settings=ONE, dense=dense)
    assert r.collapsed and not r.irreversible and r.collapse_timing == "dense"
    assert (r.collapse_at, r.collapse_step) == (45, 5)
    assert (r.collapse_eval_at, r.collapse_eval_step) == (50, 10)
    assert r.recovery_steps == 25  # from the collapse step 45 to the evaluation at 70
    assert r.collapse_timing_note is None and r.dense_signal == "loss_ema"
    assert (r.dense_perf_0, r.dense_perf_pre) == (0.0, 8.0)


def test_a_dip_that_recovers_before_the_next_evaluation_is_not_timed() -> None:
    # A dip to q = 0.25 at steps 52-55 between healthy evaluations: no collapse, nothing timed.
    dip = _dense({**BEFORE, 52: 2.0, 56: 10.0})
    held = analyze_collapse(STEPS, HEALTHY, onset_step=40, calibration=CAL, settings=ONE, dense=dip)
    assert held.collapsed is False and held.collapse_at is None and held.collapse_timing is None
    # The same dip at 42-45 before a collapse confirmed at 60 (evaluation at 50: q = 1.25): the
    # collapse is the crossing at 55, after the evaluation at 50, not the dip before it.
    perf = [0.0, 5.0, 9.0, 10.0, 11.0, 10.0, 3.0, 3.0]
    dense = _dense({**BEFORE, 42: 2.0, 46: 10.0, 55: 3.0})
    r = analyze_collapse(STEPS, perf, onset_step=40, calibration=CAL, settings=ONE, dense=dense)
    assert (r.collapse_at, r.collapse_eval_at, r.collapse_timing) == (55, 60, "dense")


def test_non_finite_loss_is_a_collapse_at_that_step() -> None:
    # span 1: the average is the loss itself. Loss 4 → 2 (q = 1 with perf_0 = -4, perf_pre =
    # -2), then inf at step 7: the LM stopped there and recorded its -inf evaluation.
    loss = [4.0, 4.0, 2.0, 2.0, 2.0, 2.0, 2.0, np.inf]
    dense = loss_signal(np.arange(8), loss, span=1)
    assert dense is not None and dense.nonfinite.tolist() == [False] * 7 + [True]
    steps, perf = [0, 2, 4, 6, 7], [-4.0, -2.0, -2.0, -2.0, -np.inf]
    r = analyze_collapse(steps, perf, onset_step=5, calibration=CAL, settings=ONE_K2, dense=dense)
    assert r.collapsed and r.irreversible and r.diverged and r.collapse_timing == "nonfinite"
    assert (r.collapse_at, r.collapse_step, r.collapse_eval_at) == (7, 2, 7)
    # Without an onset only the divergence is judged: timed at the non-finite step.
    alone = analyze_collapse(steps, perf, onset_step=None, dense=dense)
    assert alone.collapsed and alone.collapse_at == 7 and alone.collapse_timing == "nonfinite"
    assert alone.collapse_step is None and alone.collapse_eval_step is None
    # The -inf evaluation itself marks the step when there is no dense signal.
    bare = analyze_collapse(steps, perf, onset_step=5, calibration=CAL, settings=ONE_K2)
    assert (bare.collapse_at, bare.collapse_timing) == (7, "nonfinite")


def test_no_dense_signal_falls_back_to_the_evaluation_and_says_so() -> None:
    r = analyze_collapse(STEPS, RECOVERS, onset_step=40, calibration=CAL, settings=ONE)
    assert (r.collapse_at, r.collapse_eval_at, r.collapse_step) == (50, 50, 10)
    assert r.collapse_timing == "evaluation" and r.collapse_timing_note == NO_DENSE_SIGNAL
    assert r.recovery_steps == 20 and r.dense_signal is None
    # Dense already below from step 38, before the evaluation at 40 said q = 1.375: no
    # crossing between 40 and 50, so the evaluation times it.
    early = analyze_collapse(
        STEPS,
        RECOVERS,
        onset_step=40,
        calibration=CAL,
        settings=ONE,
        dense=_dense({**BEFORE, 38: 3.0}),
    )
    assert early.collapse_timing == "evaluation" and early.collapse_at == 50
    assert early.collapse_timing_note == (
        "loss_ema: no dense crossing between the evaluations at steps 40 and 50"
    )


def test_crossings_stay_inside_the_window_and_after_onset() -> None:
    steps = np.arange(10)
    q = np.array([1, 1, 0.2, 1, 1, 0.2, 0.2, 1, np.nan, -np.inf])
    assert dense_crossing(steps, q, lo=-np.inf, hi=9) == 2
    assert dense_crossing(steps, q, lo=2, hi=9) == 5
    assert dense_crossing(steps, q, lo=5, hi=8) is None  # 6 continues the stretch from 5
    assert dense_crossing(steps, q, lo=5, hi=9) == 9  # NaN is never below; -inf always is
    assert dense_crossing(steps, q, lo=-np.inf, hi=9, bound=4) == 5


def test_loss_ema_by_hand() -> None:
    # span 3 → α = 0.5: 4, 3, (NaN: missing), inf: a divergence point the average steps over,
    # then 3 + 0.5 · (2 − 3) = 2.5.
    s = loss_signal([0, 1, 2, 3, 4], [4.0, 2.0, np.nan, np.inf, 2.0], span=3)
    assert s is not None and s.steps.tolist() == [0, 1, 3, 4]
    assert s.perf.tolist() == [-4.0, -3.0, -np.inf, -2.5]
    assert loss_signal([0, 1], [np.nan, np.nan]) is None


def test_episode_return_ema_weights_a_row_by_its_episodes() -> None:
    # α = 0.5; a row of 2 episodes moves the average 1 − 0.5² = 0.75 of the way: 15 → 3.75,
    # as two single episodes of return 0 would (15 → 7.5 → 3.75).
    np.testing.assert_allclose(ema([10.0, 20.0, 0.0], span=3, weights=[1, 1, 2]), [10, 15, 3.75])
    s = episode_return_signal([0, 5, 9], [10.0, 20.0, 0.0], [1, 1, 2], span=3)
    assert s is not None and s.source == "episode_return_ema"
    np.testing.assert_allclose(s.perf, [10.0, 15.0, 3.75])


def test_rl_collapse_timed_by_training_episode_returns() -> None:
    # PPO-like: evaluations at steps 0, 99, 199, 299, 399 (env 0…4000); episode returns land
    # on the first step of each rollout (0, 100, 200, …, 350), played by the policy just before.
    steps = [0, 99, 199, 299, 399]
    env = [0, 1000, 2000, 3000, 4000]
    perf = [10.0, 100.0, 200.0, 200.0, 40.0]  # perf_0 10, perf_pre mean(100, 200) = 150 (k=2)
    rows = [0, 100, 200, 250, 300, 350]
    returns = [10.0, 100.0, 200.0, 190.0, 180.0, 20.0]
    s = episode_return_signal(rows, returns, [5, 3, 1, 1, 1, 5], env_steps=[r * 10 for r in rows])
    assert s is not None
    # span 5 → α = 1/3. The signal at the evaluations: 10 (step 0), then the first row at or
    # after 99 and 199: 100 → 10 + (1 − (2/3)³)(90) = 73.33…, and 200 → 73.33 + 127/3 = 115.6.
    d0, dpre = dense_reference_levels(s, steps, perf, onset_step=250, k=2)
    level_100 = 10 + (1 - (2 / 3) ** 3) * 90
    level_200 = level_100 + (200 - level_100) / 3
    assert (d0, dpre) == pytest.approx((10.0, (level_100 + level_200) / 2))
    r = analyze_collapse(
        steps,
        perf,
        onset_step=250,
        calibration=CAL,
        settings=ONE_K2,
        env_steps=env,
        onset_env_step=2500,
        dense=s,
    )
    # q at 399 = (40 − 10) / 140 = 0.21: collapsed. Dense at 350: 5 episodes of 20 pull the
    # average below the threshold; the rows at 250 and 300 still sit above it.
    assert r.collapsed and r.irreversible and r.collapse_timing == "dense"
    assert (r.collapse_at, r.collapse_at_env, r.collapse_eval_at) == (350, 3500, 399)
    assert (r.collapse_step, r.collapse_env_steps) == (100, 1000)


def _store_run(
    store: RunStore,
    run_id: str,
    kind: str,
    evals: pd.DataFrame,
    telemetry: pd.DataFrame,
    events: list[dict[str, object]],
    seed: int = 0,
) -> None:
    writer = store.writer(run_id)
    pert_kind = str(events[0]["kind"]) if events else "none"
    writer.start(
        {
            "run_id": run_id,
            "workload": "w",
            "kind": kind,
            "knobs": {},
            "seed": seed,
            "perturbation": {"kind": pert_kind, "label": pert_kind, "params": {}},
        }
    )
    writer.write_table("evals", evals)
    writer.write_table("telemetry", telemetry)
    writer.write_events(events)
    writer.finish({})


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    store = RunStore(tmp_path / "a")
    store.root.mkdir()
    collapse = {"threshold": 0.5, "recovery": 0.9, "confirm_evals": 1, "evals_after": 0}
    store.write_audit({"name": "a", "spec": {"collapse": collapse}})
    return store


def _steady_baseline(store: RunStore, kind: str, evals: pd.DataFrame, level: float) -> None:
    """An unperturbed run of another seed that learned to `level` and stayed there: the
    calibration (no noise, no drop)."""
    steady = evals.assign(perf=[float(evals["perf"].iloc[0])] + [level] * (len(evals) - 1))
    _store_run(store, "base", kind, steady, pd.DataFrame({"step": [0]}), [], seed=1)


def test_records_time_an_lm_collapse_by_its_training_loss(store: RunStore) -> None:
    # Loss 4 at step 0, then 2, spiking to 3.5 from step 52 (onset); val loss = -perf at 0, 30,
    # …, 70 with 2 pre-onset evaluations: perf_0 = -4, perf_pre = -2, the collapse at 60.
    # Loss EMA (span 5, α = 1/3): 2 + 2 · (2/3)^t ≈ 2.000 at 40 and 50, so the dense perf_pre is
    # -2.000 and dense q < 0.5 once the EMA passes 3: after n spiked steps it is
    # 3.5 − 1.5 · (2/3)^n: 2.83 at n = 2 (step 53), 3.06 at n = 3 (step 54).
    collapse = {"pre_evals": 2, "confirm_evals": 1, "evals_after": 0}
    store.write_audit({"name": "a", "spec": {"collapse": collapse}})
    loss = np.where(np.arange(71) < 1, 4.0, 2.0)
    loss[52:] = 3.5
    steps = [0, 30, 40, 50, 60, 70]
    evals = pd.DataFrame({"step": steps, "perf": [-4.0, -2.0, -2.0, -2.0, -3.5, -3.5]})
    telemetry = pd.DataFrame({"step": np.arange(71), "loss": loss})
    spike = [{"kind": "lr_spike", "start_step": 52, "end_step": 70, "params": {}}]
    _store_run(store, "lm", "lm", evals, telemetry, spike)
    # The same curves under label noise: the loss in its window is measured on perturbed
    # batches, so the evaluation times the collapse.
    noise = [{"kind": "label_noise", "start_step": 52, "end_step": 70, "params": {}}]
    _store_run(store, "noisy", "lm", evals, telemetry, noise)
    _steady_baseline(store, "lm", evals, -2.0)
    records = {r.run_id: r for r in audit_records(store)}
    c = records["lm"].collapse
    assert c is not None and c.collapse_timing == "dense" and c.dense_signal == "loss_ema"
    assert c.dense_perf_pre == pytest.approx(-2.0, abs=1e-6)
    assert (c.collapse_at, c.collapse_step, c.collapse_eval_at) == (54, 2, 60)
    n = records["noisy"].collapse
    assert n is not None and (n.collapse_at, n.collapse_timing) == (60, "evaluation")
    assert n.collapse_timing_note == (
        "loss_ema: no dense crossing between onset (step 52) and the evaluation at step 60 "
        "(the loss in a label_noise window is measured on perturbed batches)"
    )
    entry = records["lm"].__json__()
    assert {k: entry[k] for k in ("collapse_step", "collapse_at", "collapse_eval_step")} == {
        "collapse_step": 2,
        "collapse_at": 54,
        "collapse_eval_step": 8,
    }
    assert entry["collapse_eval_at"] == 60 and entry["collapse_timing"] == "dense"
    assert entry["dense_signal"] == "loss_ema" and entry["collapse_timing_note"] is None


def test_records_read_episode_returns_and_not_an_rl_loss(store: RunStore) -> None:
    evals = pd.DataFrame(
        {"step": [0, 99, 199, 299], "env_step": [0, 1000, 2000, 3000], "perf": [10, 100, 100, 20]}
    )
    returns = pd.DataFrame(
        {
            "step": [0, 100, 200, 250],
            "env_step": [1000, 2000, 3000, 3000],
            "episode_return": [10.0, 100.0, 100.0, np.nan],
            "episodes": [5.0, 3.0, 2.0, np.nan],
            "loss": [np.nan, 0.5, 0.4, np.nan],
        }
    )
    noise = [{"kind": "reward_noise", "start_step": 150, "end_step": 299, "params": {}}]
    _store_run(store, "ppo", "rl", evals, returns, noise)
    _store_run(store, "old", "rl", evals, returns.drop(columns=["episode_return"]), noise)
    _steady_baseline(store, "rl", evals, 100.0)
    records = {r.run_id: r for r in audit_records(store)}
    c = records["ppo"].collapse
    assert c is not None and c.dense_signal == "episode_return_ema"
    # Onset 150: the evaluations before it are at 0 and 99; the signal stands at 10 (row 0) and
    # 10 + (1 − (2/3)³) · 90 = 73.3 (row 100, 3 episodes) there.
    level_100 = 100.0 - 90 * (2 / 3) ** 3
    assert (c.dense_perf_0, c.dense_perf_pre) == pytest.approx((10.0, (10.0 + level_100) / 2))
    # No crossing: the signal at 200 is 88.1, q = 2.5; the row at 250 has no episodes.
    assert (c.collapse_at, c.collapse_timing) == (299, "evaluation")
    assert c.collapse_timing_note == (
        "episode_return_ema: no dense crossing between the evaluations at steps 199 and 299"
    )
    old = records["old"].collapse  # an SB3 run from before episode returns were logged
    assert old is not None and old.dense_signal is None and old.collapse_timing == "evaluation"
    assert old.collapse_timing_note is not None and "episode_return" in old.collapse_timing_note
    assert "2 of 2 collapse(s) timed at their confirming evaluation, not to the step" in " ".join(
        audit_notes(list(records.values()))
    )


def test_store_reads_only_the_dense_columns_it_has(store: RunStore) -> None:
    evals = pd.DataFrame({"step": [0, 10], "perf": [0.0, 1.0]})
    telemetry = pd.DataFrame({"step": [0, 1], "loss": [2.0, 1.0], "grad_norm": [3.0, 4.0]})
    _store_run(store, "r", "lm", evals, telemetry, [])
    frame = store.table("r", "telemetry", columns=["step", "loss", "episode_return"])
    assert list(frame.columns) == ["step", "loss"] and frame["loss"].tolist() == [2.0, 1.0]
    assert list(store.table("nope", "telemetry", columns=["step"]).columns) == []
