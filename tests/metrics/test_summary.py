"""The audit summary on a small synthetic store, and the `summary` CLI command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from stabilitybench.cli import app
from stabilitybench.errors import StabilityBenchError
from stabilitybench.metrics.summary import summarize, summary_document
from stabilitybench.store import RunStore

STEPS = list(range(0, 201, 20))
ONSET = 100
# Before onset perf rises linearly from -1 to -0.2; perf_0 = -1, P_pre = median(-0.68, -0.52,
# -0.36) = -0.52, so the gain is 0.48: a drop of more than 0.24 at two evaluations in a row is a
# collapse (the baselines of the other seed show no noise and no drop).
RISE = {s: -1.0 + 0.8 * min(s / 100, 1.0) for s in STEPS}


def _curve(after: dict[int, float]) -> list[float]:
    return [after.get(s, RISE[s]) if s >= ONSET else RISE[s] for s in STEPS]


CURVES = {
    # (noise, perturbation factor or None, seed) → perf per evaluation
    (0.0, None, 0): [np.nan if s == 140 else RISE[s] for s in STEPS],  # one NaN evaluation
    (0.0, None, 1): _curve({}),
    (0.1, None, 0): _curve({}),
    (0.1, None, 1): _curve({}),
    (0.0, 50, 0): _curve({s: -1.1 for s in STEPS if s >= 120}),  # irreversible collapse
    (0.0, 50, 1): _curve({120: -np.inf}),  # diverges: the run stops at step 120
    (0.1, 50, 0): _curve({120: -0.9, 140: -0.9}),  # q 0.21 twice, back to 1.67 at 160
    (0.1, 50, 1): _curve({120: -0.4}),  # q = 1.25: no collapse
    (0.0, 3, 0): _curve({}),
}


def _write_run(
    store: RunStore, noise: float, factor: int | None, seed: int, status: str = "done"
) -> str:
    pert: dict[str, Any] = {"kind": "none"}
    if factor is not None:
        params = {"at": ONSET, "factor": factor, "duration": 5}
        pert = {
            "kind": "lr_spike",
            "label": f"lr_spike(at={ONSET},factor={factor},duration=5)",
            "params": params,
        }
    run_id = f"n{noise}-f{factor}-s{seed}"
    writer = store.writer(run_id)
    writer.start(
        {
            "run_id": run_id,
            "label": run_id,
            "audit": "synthetic",
            "workload": "toy",
            "kind": "toy",
            "knobs": {"noise": noise, "lr": 0.01},
            "perturbation": pert,
            "seed": seed,
            "spec": {"collapse": {"threshold": 0.5, "recovery": 0.9}},
        }
    )
    if status == "failed":
        writer.fail("Traceback ...\nRuntimeError: boom")
        return run_id
    perf = CURVES[(noise, factor, seed)]
    steps = STEPS
    if any(np.isneginf(perf)):
        cut = int(np.flatnonzero(np.isneginf(perf))[0]) + 1
        steps, perf = steps[:cut], perf[:cut]
    writer.write_table(
        "evals", pd.DataFrame({"step": steps, "env_step": [None] * len(steps), "perf": perf})
    )
    if factor is None:
        writer.write_events([])
    else:
        writer.write_events(
            [
                {
                    "kind": "lr_spike",
                    "name": "lr_spike",
                    "dimension": "optimization",
                    "params": {"factor": factor},
                    "start_step": ONSET,
                    "end_step": ONSET + 4,
                    "start_env_step": None,
                    "end_env_step": None,
                }
            ]
        )
    writer.finish({"final_perf": float(np.nanmean(perf[-3:]))})
    return run_id


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    store = RunStore(tmp_path / "audit")
    store.write_audit(
        {"name": "synthetic", "spec": {"collapse": {"threshold": 0.5, "recovery": 0.9}}}
    )
    for noise, factor, seed in CURVES:
        _write_run(store, noise, factor, seed)
    _write_run(store, 0.0, 50, 2, status="failed")
    return store


def _condition(result: dict[str, Any], noise: float, perturbation: str) -> dict[str, Any]:
    (match,) = [
        c
        for c in result["conditions"]
        if c["knobs"]["noise"] == noise and c["perturbation"].startswith(perturbation)
    ]
    return match


def _run(result: dict[str, Any], run_id: str) -> dict[str, Any]:
    (match,) = [r for r in result["runs"] if r["run_id"] == run_id]
    return match


def test_per_run_records(store: RunStore) -> None:
    result = summary_document(store, reps=200)
    assert json.loads(json.dumps(result, allow_nan=False)) == result  # strict JSON
    gone = _run(result, "n0.0-f50-s0")
    assert gone["collapsed"] and gone["irreversible"] and gone["collapse_step"] == 20
    assert gone["recovery_steps"] is None and gone["final_perf"] == pytest.approx(-1.1)
    assert gone["stability_score"] is not None and gone["stability_score"] <= 0.25
    back = _run(result, "n0.1-f50-s0")
    assert back["collapsed"] and not back["irreversible"]
    assert back["collapse_step"] == 20 and back["recovery_steps"] == 40
    diverged = _run(result, "n0.0-f50-s1")
    assert diverged["diverged"] and diverged["irreversible"] and diverged["final_perf"] is None
    baseline = _run(result, "n0.0-fNone-s0")
    assert baseline["onset_step"] == ONSET and baseline["onset_source"] == "matched_seed"
    assert baseline["collapsed"] is False and baseline["n_missing_evals"] == 1
    assert baseline["final_perf"] == pytest.approx(-0.2)
    assert baseline["perf_pre"] == pytest.approx(-0.52)
    failed = _run(result, "n0.0-f50-s2")
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: boom"
    assert failed["collapsed"] is None
    for record in result["runs"]:
        for key in (
            "run_id",
            "workload",
            "knobs",
            "perturbation",
            "seed",
            "status",
            "collapsed",
            "irreversible",
            "collapse_step",
            "recovery_steps",
            "final_perf",
            "stability_score",
        ):
            assert key in record


def test_condition_aggregates(store: RunStore) -> None:
    result = summary_document(store, reps=200)
    assert len(result["conditions"]) == 5
    spike = _condition(result, 0.0, "lr_spike(at=100,factor=50")
    assert spike["n_runs"] == 2 and spike["n_failed"] == 1  # the failed run is excluded
    assert spike["collapse_rate"] == 1.0 and spike["recovery_rate"] == 0.0
    assert spike["collapse_rate_ci"][0] == pytest.approx(0.3424, abs=1e-3)  # Wilson, 2 of 2
    assert spike["median_collapse_steps"] == 20
    assert spike["final_perf_iqm"] == pytest.approx(-1.1)  # the diverged run is not finite
    assert spike["n_final_perf_nonfinite"] == 1
    assert spike["prob_improvement_vs_baseline"] == pytest.approx(0.0)
    buffered = _condition(result, 0.1, "lr_spike(at=100,factor=50")
    assert buffered["collapse_rate"] == 0.5 and buffered["recovery_rate"] == 1.0
    assert buffered["median_recovery_steps"] == 40
    base = _condition(result, 0.0, "none")
    assert base["collapse_rate"] == 0.0 and base["final_perf_iqm"] == pytest.approx(-0.2)
    assert base["collapse_rate_ci"] == pytest.approx([0.0, 0.6576], abs=1e-3)
    low, high = base["final_perf_iqm_ci"]
    assert low == pytest.approx(-0.2) and high == pytest.approx(-0.2)  # identical finals
    for condition in result["conditions"]:
        for key in (
            "workload",
            "knobs",
            "perturbation",
            "n_runs",
            "collapse_rate",
            "collapse_rate_ci",
            "median_collapse_steps",
            "recovery_rate",
            "final_perf_iqm",
            "final_perf_iqm_ci",
        ):
            assert key in condition
    assert any("failed" in note for note in result["audit"]["notes"])
    assert any("NaN" in note for note in result["audit"]["notes"])


def test_dose_response_and_decoupling(store: RunStore) -> None:
    result = summary_document(store, reps=200)
    (spike,) = result["dose_response"]["magnitude"]
    points = {p["x"]: (p["collapse_rate"], p["n"]) for p in spike["points"]}
    assert points == {3.0: (0.0, 1), 50.0: (0.75, 4)}
    assert spike["baseline_collapse_rate"] == 0.0
    (noise,) = [k for k in result["dose_response"]["knobs"] if k["knob"] == "noise"]
    assert [(p["x"], p["collapse_rate"], p["n"]) for p in noise["points"]] == [
        (0.0, 2 / 3, 3),
        (0.1, 0.5, 2),
    ]
    (toy,) = result["decoupling"]["per_workload"]
    assert toy["n"] == 9 and -1.0 <= toy["rho"] <= 1.0
    assert toy["ci"][0] <= toy["rho"] <= toy["ci"][1]
    # the same rule as the findings' claim 1: a verdict with the figure that decided it
    assert toy["verdict"] in {"supported", "not supported", "inconclusive"} and toy["reason"]
    assert result["decoupling"]["pooled"]["workload"] == "pooled"


def test_summary_is_reproducible(store: RunStore) -> None:
    assert summary_document(store, reps=100) == summary_document(store, reps=100)


def test_empty_and_unfinished_audits_raise(tmp_path: Path) -> None:
    empty = RunStore(tmp_path / "empty")
    empty.write_audit({"name": "empty"})
    with pytest.raises(StabilityBenchError, match="no runs"):
        summarize(empty)
    pending = RunStore(tmp_path / "pending")
    pending.write_audit({"name": "pending"})
    pending.writer("r1").update_info(run_id="r1", status="pending")
    with pytest.raises(StabilityBenchError, match="no finished runs"):
        summarize(pending)


def test_cli_summary_json_and_table(store: RunStore) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["summary", str(store.root), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert set(document) >= {"audit", "conditions", "runs", "decoupling", "dose_response"}
    assert document["audit"]["n_failed"] == 1 and document["audit"]["n_done"] == 9
    table = runner.invoke(app, ["summary", str(store.root)])
    assert table.exit_code == 0, table.output
    assert "synthetic" in table.stdout and "decoupling toy" in table.stdout
    assert "note: 1 failed run(s)" in table.stdout


def test_cli_summary_on_empty_audit_exits_2(tmp_path: Path) -> None:
    empty = RunStore(tmp_path / "empty")
    empty.write_audit({"name": "empty"})
    result = CliRunner().invoke(app, ["summary", str(empty.root), "--json"])
    assert result.exit_code == 2
    assert "no runs" in result.output
