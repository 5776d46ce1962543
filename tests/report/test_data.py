"""Reading runs for the report: time axes, windows, collapse points, role-prefixed columns."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from stabilitybench.metrics.collapse import Calibration
from stabilitybench.metrics.records import event_onset, run_record
from stabilitybench.report.data import (
    collapse_at_step,
    collapse_point,
    perf_series,
    telemetry_series,
    window_spans,
)
from stabilitybench.settings import CollapseSettings
from stabilitybench.store import RunData


def rl_run() -> RunData:
    """An RL run with two optimizers (actor is the clock): 8 env steps per optimizer step."""
    steps = np.arange(20)
    telemetry = pd.DataFrame(
        {
            "step": steps,
            "env_step": steps * 8,
            "actor/grad_norm": np.linspace(1.0, 2.0, 20),
            "critic/grad_norm": np.full(20, 9.0),
            "actor/update_ratio": np.full(20, 1e-3),
        }
    )
    evals = pd.DataFrame(
        {"step": [4, 9, 14, 19], "env_step": [40, 80, 120, 160], "perf": [1.0, 2.0, 0.2, 0.4]}
    )
    events = pd.DataFrame(
        {
            "kind": ["reward_noise"],
            "name": ["reward_noise"],
            "dimension": ["signal"],
            "params": ["{}"],
            "start_step": [10],
            "end_step": [12],
            "start_env_step": [None],
            "end_env_step": [None],
        }
    )
    info = {
        "run_id": "r",
        "kind": "rl",
        "perturbation": {"kind": "reward_noise", "label": "reward_noise()"},
    }
    return RunData(run_id="r", info=info, telemetry=telemetry, evals=evals, events=events)


def test_rl_runs_use_environment_steps_and_the_clock_optimizer() -> None:
    run = rl_run()
    perf = perf_series(run)
    assert perf["x"].tolist() == [40.0, 80.0, 120.0, 160.0]
    telemetry = telemetry_series(run)
    assert telemetry["x"].tolist() == (np.arange(20) * 8.0).tolist()
    np.testing.assert_allclose(
        telemetry["grad_norm"], np.linspace(1.0, 2.0, 20)
    )  # actor's, not critic's
    assert "update_ratio" in telemetry.columns and "msd" not in telemetry.columns
    # events carry no env steps here: mapped through telemetry (step 10 → 80, step 12 → 96)
    assert window_spans(run) == [(80.0, 96.0)]


def test_collapse_step_from_the_record_is_where_the_collapse_evaluation_is() -> None:
    run = rl_run()
    info = {**run.info.document(), "status": "done", "workload": "w"}
    # one evaluation confirms; baselines of other seeds with no noise and no drop
    one = CollapseSettings(confirm_evals=1, evals_after=0)
    calm = Calibration(noise=0.0, baseline_drop=0.0, n_baselines=1)
    record = run_record(info, run.evals, event_onset(run.events), one, calibration=calm)
    # onset 10; progress from perf_0 = 1 to perf_pre = 2 (the evaluation at step 9): the
    # evaluation at step 14 (perf 0.2, q = -0.8) is the collapse, 4 steps after onset
    assert record.collapse is not None and record.collapse.collapse_step == 4
    assert collapse_at_step(run, record) == 14.0
    assert collapse_point(run, record) == (120.0, 0.2)  # the evaluation at optimizer step 14
    held = run_record(info, run.evals.iloc[:2], event_onset(run.events), one, calibration=calm)
    assert collapse_point(run, held) is None  # no evaluation after onset: not judged
    # without a summary, only a divergence is a known collapse
    assert collapse_at_step(run, None) is None
    run.evals.loc[3, "perf"] = -math.inf
    assert collapse_at_step(run, None) == math.inf
    assert collapse_point(run, None) == (160.0, -math.inf)


def test_long_telemetry_is_binned() -> None:
    n = 5000
    run = RunData(
        run_id="l",
        info={"kind": "lm"},
        telemetry=pd.DataFrame({"step": np.arange(n), "grad_norm": np.ones(n)}),
        evals=pd.DataFrame(),
        events=pd.DataFrame(),
        scores=pd.DataFrame({"step": np.arange(n), "msd": np.arange(n, dtype=float)}),
    )
    frame = telemetry_series(run)
    assert len(frame) == 400
    # each bin averages consecutive steps: the first bin holds steps 0..12 (5000/400 = 12.5)
    assert frame["msd"].iloc[0] == frame["x"].iloc[0] == np.mean(np.arange(13))
