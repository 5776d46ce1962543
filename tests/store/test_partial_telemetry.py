"""A run killed mid-training: its telemetry up to the last flush is in the store, marked partial."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from stabilitybench.cli import app
from stabilitybench.store import RunStore


def test_a_crashed_runs_telemetry_loads_as_partial(tmp_path: Path) -> None:
    spec = {
        "name": "crash",
        "seeds": [0],
        "workloads": [
            {
                "name": "toy",
                "kind": "toy",
                "total_steps": 260,
                "eval": {"every": 100, "batches": 1},
                "knobs": {"lr": 0.01, "hidden": 8, "crash_at_step": [None, 250]},
            }
        ],
        "perturbations": ["none"],
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "audit"
    args = ["audit", str(spec_path), "--out", str(out), "--workers", "1", "--no-report"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output  # the crashed run failed (its worker got SIGKILL)
    store = RunStore.open(out)
    by_status = {info.status.value: info.run_id for info in store.infos()}
    assert set(by_status) == {"done", "failed"}
    crashed = store.load(by_status["failed"])
    assert crashed.telemetry_partial
    # The toy workload flushes every 100 steps: rows 0..199 reached the disk before step 250.
    assert crashed.telemetry["step"].tolist() == list(range(200))
    assert not (store.run_dir(crashed.run_id) / "telemetry.parquet").exists()
    finished = store.load(by_status["done"])
    assert not finished.telemetry_partial and len(finished.telemetry) == 260
    counts = store.query(
        "SELECT partial, count(*) AS n, max(step) AS last FROM telemetry GROUP BY partial "
        "ORDER BY partial"
    )
    assert counts.to_dict("records") == [
        {"partial": False, "n": 260, "last": 259},
        {"partial": True, "n": 200, "last": 199},
    ]
    runs = store.query("SELECT DISTINCT run_id FROM telemetry WHERE partial")
    assert runs["run_id"].tolist() == [crashed.run_id]
