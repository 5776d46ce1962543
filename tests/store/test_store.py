"""RunStore / RunWriter: atomic files, run life cycle, DuckDB views."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
from typer.testing import CliRunner

from stabilitybench import RunStore, StabilityBenchError
from stabilitybench.cli import app
from stabilitybench.io import write_json


def _make_audit(root) -> RunStore:  # type: ignore[no-untyped-def]
    store = RunStore(root)
    store.write_audit({"name": "demo", "spec": {}, "version": "0"})
    for i, status in enumerate(["done", "done", "failed"]):
        writer = store.writer(f"run{i}")
        writer.start(
            {
                "run_id": f"run{i}",
                "workload": "toy",
                "seed": i,
                "perturbation": {"kind": "none", "label": "none"},
                "knobs": {"lr": 0.1},
            }
        )
        writer.write_table(
            "telemetry", pd.DataFrame({"step": [0, 1, 2], "grad_norm": [1.0, 2.0, 3.0 + i]})
        )
        writer.write_table("evals", pd.DataFrame({"step": [0, 2], "perf": [-1.0, -0.5]}))
        writer.write_events(
            [
                {
                    "kind": "lr_spike",
                    "name": "lr_spike",
                    "dimension": "optimization",
                    "params": {"factor": 10},
                    "start_step": 1,
                    "end_step": 1,
                }
            ]
        )
        if status == "done":
            writer.finish({"final_perf": -0.5})
        else:
            writer.fail("Traceback ...\nRuntimeError: boom")
    return store


def test_life_cycle_and_loading(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = _make_audit(tmp_path / "a")
    assert store.run_ids() == ["run0", "run1", "run2"]
    assert store.status_counts() == {"pending": 0, "running": 0, "done": 2, "failed": 1}
    run = store.load("run1")
    assert run.status == "done" and run.info.document()["outcome"] == {"final_perf": -0.5}
    assert run.info.wall_s is not None and run.info.wall_s >= 0 and run.info.attempts == 1
    assert run.telemetry["grad_norm"].tolist() == [1.0, 2.0, 4.0]
    assert json.loads(run.events["params"].iloc[0]) == {"factor": 10}
    assert [r.run_id for r in store.iter_runs()] == ["run0", "run1"]
    assert "boom" in (store.info("run2").error or "")


def test_restart_clears_partial_output_and_counts_attempts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = _make_audit(tmp_path / "a")
    writer = store.writer("run2")
    (writer.run_dir / ".telemetry.parquet.x.tmp").write_bytes(b"half")
    writer.start({"run_id": "run2"})
    assert sorted(p.name for p in writer.run_dir.iterdir()) == ["run.json"]
    assert store.info("run2").attempts == 2 and store.info("run2").status == "running"


def test_atomic_write_leaves_old_file_on_failure(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "x.json"
    write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["x.json"]


def test_query_views(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = _make_audit(tmp_path / "a")
    df = store.query(
        "SELECT run_id, max(grad_norm) AS g FROM telemetry GROUP BY run_id ORDER BY run_id"
    )
    assert df["run_id"].tolist() == ["run0", "run1", "run2"]
    assert df["g"].tolist() == [3.0, 4.0, 5.0]
    runs = store.query("SELECT run_id, status, seed FROM runs WHERE status = 'failed'")
    assert runs.to_dict("records") == [{"run_id": "run2", "status": "failed", "seed": 2}]
    joined = store.query(
        "SELECT count(*) AS n FROM evals JOIN runs USING (run_id) WHERE status='done'"
    )
    assert int(joined["n"].iloc[0]) == 4
    assert len(store.query("SELECT * FROM scores")) == 0
    with pytest.raises(StabilityBenchError, match="query failed"):
        store.query("SELECT nope FROM telemetry")


def test_open_rejects_a_folder_that_is_not_an_audit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StabilityBenchError, match="not a StabilityBench audit"):
        RunStore.open(tmp_path)
    with pytest.raises(StabilityBenchError, match="no such folder"):
        RunStore.open(tmp_path / "missing")


def test_cli_version_help_status_query(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from stabilitybench import __version__

    runner = CliRunner()
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for verb in ("audit", "status", "query", "summary", "monitor", "report"):
        assert verb in result.output
    store = _make_audit(tmp_path / "a")
    result = runner.invoke(app, ["status", str(store.root)])
    assert result.exit_code == 0 and "boom" in result.output
    result = runner.invoke(
        app, ["query", str(store.root), "SELECT count(*) AS n FROM telemetry", "--json"]
    )
    assert result.exit_code == 0 and json.loads(result.output) == [{"n": 9}]
    result = runner.invoke(app, ["query", str(tmp_path), "SELECT 1"])
    assert result.exit_code == 2 and "not a StabilityBench audit" in result.output
    result = runner.invoke(app, ["query", str(store.root), "SELEC 1"])
    assert result.exit_code == 2 and "query failed" in result.output


def test_runs_without_a_status_count_as_pending_each(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = RunStore(tmp_path / "a")
    for run_id in ("x", "y", "z"):
        write_json(store.run_dir(run_id) / "run.json", {"run_id": run_id})
    assert store.status_counts() == {"pending": 3, "running": 0, "done": 0, "failed": 0}
    assert [i.run_id for i in store.infos()] == ["x", "y", "z"]
