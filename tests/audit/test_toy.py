"""The toy workload: follows the Workload contract, is deterministic, collapses under a big spike."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from stabilitybench.errors import StabilityBenchError
from stabilitybench.store import RunData, RunStore
from stabilitybench.types import RunSpec
from stabilitybench.workloads.base import build_workload

WORKLOAD = {
    "name": "toy",
    "kind": "toy",
    "total_steps": 300,
    "eval": {"every": 20, "batches": 2},
    "knobs": {},
}


def _run(store: RunStore, spec: RunSpec) -> RunData:
    writer = store.writer(spec.run_id)
    writer.start({"run_id": spec.run_id})
    writer.finish(build_workload(spec.workload).run(spec, writer))
    return store.load(spec.run_id)


def _final_progress(run: RunData, onset: int) -> float:
    """q at the end of the run: (perf − perf_0) / (perf_pre − perf_0), DESIGN.md's definition."""
    perf = run.evals.set_index("step")["perf"]
    perf_0 = perf.iloc[0]
    perf_pre = perf[perf.index < onset].iloc[-3:].mean()
    final = perf.iloc[-3:].mean()
    return float((final - perf_0) / (perf_pre - perf_0))


def test_toy_run_writes_the_contract_tables_and_is_deterministic(tmp_path: Path) -> None:
    spec = RunSpec(
        workload=WORKLOAD,
        perturbations=({"kind": "lr_spike", "at": 0.3, "factor": 3, "duration": 10},),
        seed=4,
    )
    first = _run(RunStore(tmp_path / "a"), spec)
    second = _run(RunStore(tmp_path / "b"), spec)
    pd.testing.assert_frame_equal(first.telemetry, second.telemetry)
    assert list(first.telemetry["step"]) == list(range(300))
    assert {"loss", "grad_norm", "lr", "perturbed"} <= set(first.telemetry.columns)
    assert first.telemetry["perturbed"].sum() == 10
    assert first.telemetry.loc[first.telemetry["perturbed"], "lr"].iloc[0] == pytest.approx(0.03)
    assert list(first.evals["step"]) == [0, *range(19, 300, 20)]
    assert (first.evals["perf"] == -first.evals["val_loss"]).all()
    assert (first.events["start_step"].iloc[0], first.events["end_step"].iloc[0]) == (90, 99)
    outcome = first.info.document()["outcome"]
    assert outcome["steps"] == 300 and outcome["diverged"] is False
    assert outcome["final_perf"] == pytest.approx(first.evals["perf"].iloc[-3:].mean())


def test_a_big_lr_spike_collapses_the_toy_and_a_small_one_does_not(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    for seed in (0, 1, 2):
        small, big = (
            _run(
                store,
                RunSpec(
                    workload=WORKLOAD,
                    seed=seed,
                    perturbations=({"kind": "lr_spike", "at": 0.3, "factor": f, "duration": 10},),
                ),
            )
            for f in (3, 50)
        )
        assert _final_progress(small, onset=90) > 0.9  # recovered
        assert _final_progress(big, onset=90) < 0.9  # collapsed and not recovered
        assert math.isfinite(big.info.outcome.final_perf)


def test_toy_validation_names_the_knob() -> None:
    spec = RunSpec(workload={**WORKLOAD, "knobs": {"dropout": 1.5}})
    with pytest.raises(
        StabilityBenchError, match=r"knobs\.dropout must be a number in \[0\.0, 1\.0\), got 1\.5"
    ):
        build_workload(spec.workload).validate(spec)
