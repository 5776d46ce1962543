"""`--backend ray` on a local Ray instance: the same tables as the local pool, lost workers.

These are the quick checks of what the two-node cluster test (slow, test_ray_cluster.py)
exercises: identical telemetry on Ray and the local pool; a task lost with its worker retried
once, then recorded failed; `--ray-address` reaching `ray.init` (patched). A rerun that resumes
a killed audit without redoing finished runs is backend-independent: test_runner.py.

Starting Ray costs seconds, so the audits here share one instance, started and stopped by a
`RayBackend` as an audit's own would be (the audits' backends find it running and leave it be).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from stabilitybench.audit.backends import RAY_TASK_RETRIES, RayBackend
from stabilitybench.cli import app
from stabilitybench.store import RunStore

from .conftest import toy_spec

runner = CliRunner()


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """A local Ray instance for the module, opened and closed by the backend's own code."""
    ray = pytest.importorskip("ray")
    backend = RayBackend(workers=2)
    backend.open()
    try:
        assert ray.is_initialized()
        yield ray
    finally:
        backend.close()
    assert not ray.is_initialized()  # the backend shuts down the Ray it started


def _audit(spec: Path, out: Path, *extra: str) -> Any:
    return runner.invoke(app, ["audit", str(spec), "--out", str(out), "--no-report", *extra])


def test_ray_and_local_backends_record_identical_telemetry(
    local_ray: Any, write_spec: Any, tmp_path: Path
) -> None:
    spec = write_spec(toy_spec(seeds=[3]))
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert _audit(spec, local, "--workers", "2").exit_code == 0
    result = _audit(spec, remote, "--backend", "ray", "--workers", "2")
    assert result.exit_code == 0, result.output
    assert local_ray.is_initialized()  # an audit leaves a Ray it did not start running
    local_store, ray_store = RunStore.open(local), RunStore.open(remote)
    assert local_store.run_ids() == ray_store.run_ids()
    for run_id in local_store.run_ids():
        for table in ("telemetry", "evals", "events"):
            pd.testing.assert_frame_equal(
                local_store.table(run_id, table), ray_store.table(run_id, table)
            )


def test_runs_that_share_a_prefix_on_ray_are_the_local_runs(
    local_ray: Any, write_spec: Any, tmp_path: Path
) -> None:
    # `share_prefix` forks inside the Ray worker as it does inside a pool worker.
    from .test_share_prefix import PERTURBATIONS, TD3, _spec

    spec = write_spec({**_spec(TD3, share_prefix=True), "perturbations": PERTURBATIONS[:3]})
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert _audit(spec, local, "--workers", "1").exit_code == 0
    result = _audit(spec, remote, "--backend", "ray", "--workers", "1")
    assert result.exit_code == 0, result.output
    local_store, ray_store = RunStore.open(local), RunStore.open(remote)
    assert local_store.run_ids() == ray_store.run_ids()
    for run_id in local_store.run_ids():
        assert ray_store.info(run_id).shared_prefix is not None
        for table in ("telemetry", "evals", "events"):
            pd.testing.assert_frame_equal(
                local_store.table(run_id, table), ray_store.table(run_id, table)
            )


def test_a_ray_task_whose_worker_dies_is_retried_once_then_recorded_failed(
    local_ray: Any, write_spec: Any, tmp_path: Path
) -> None:
    spec = toy_spec(seeds=[0], perturbations=["none"])
    spec["workloads"][0]["knobs"]["crash_at_step"] = [None, 5]  # SIGKILLs its own worker
    out = tmp_path / "audit"
    result = _audit(write_spec(spec), out, "--backend", "ray", "--workers", "2")
    assert result.exit_code == 1, result.output
    assert "1 of 2 runs failed" in " ".join(result.output.split())
    runs = RunStore.open(out).runs_frame()
    by_crash = {json.loads(r.knobs)["crash_at_step"]: r for r in runs.itertuples()}
    assert (by_crash[None].status, by_crash[None].attempts) == ("done", 1)
    crashed = by_crash[5]
    assert crashed.status == "failed" and crashed.attempts == 1 + RAY_TASK_RETRIES
    assert crashed.error.startswith("Ray task failed"), crashed.error


def test_ray_address_is_passed_to_ray_init_and_the_driver_disconnects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ray = pytest.importorskip("ray")
    calls: list[Any] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **options: calls.append(options))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    with socket.create_server(("127.0.0.1", 0)) as head:  # something listens: reachable
        address = f"127.0.0.1:{head.getsockname()[1]}"
        backend = RayBackend(workers=2, address=address)
        backend.open()
    backend.close()
    (options, shutdown) = calls
    assert options["address"] == address and "num_cpus" not in options  # the cluster's CPUs
    assert shutdown == "shutdown"


def test_audit_passes_backend_workers_and_ray_address_to_the_runner(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from stabilitybench.audit import runner as audit_runner

    seen: dict[str, Any] = {}

    def fake_run_audit_cli(spec: Path, out: Path, **options: Any) -> int:
        seen.update(spec=spec, out=out, **options)
        return 0

    monkeypatch.setattr(audit_runner, "run_audit_cli", fake_run_audit_cli)
    args = ["audit", "spec.yaml", "--out", str(tmp_path / "a"), "--backend", "ray"]
    result = runner.invoke(
        app, [*args, "--workers", "3", "--ray-address", "10.0.0.1:6379", "--no-report"]
    )
    assert result.exit_code == 0, result.output
    assert seen["spec"] == Path("spec.yaml") and seen["out"] == tmp_path / "a"
    assert (seen["backend"], seen["workers"], seen["ray_address"]) == ("ray", 3, "10.0.0.1:6379")
    assert seen["report"] is False and seen["dry_run"] is False
