"""`--backend ray` on a real two-node Ray cluster on this machine, with a node lost mid-audit.

Slow (a cluster to start, a node to lose, two audits): its parts are checked quickly elsewhere.
Identical tables on Ray and the local pool, a lost worker's task retried once, `--ray-address`
reaching `ray.init`: test_ray_backend.py; a rerun that resumes a killed audit without redoing
finished runs: test_runner.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from stabilitybench.cli import app
from stabilitybench.store import RunStore

from .conftest import toy_spec

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

runner = CliRunner()
CLI = str(Path(sys.executable).parent / "stabilitybench")


@pytest.fixture
def two_nodes() -> Iterator[tuple[Any, Any]]:
    """A head node and a second node joining it (Ray's own multi-node-on-one-host harness)."""
    cluster = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    try:
        second = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster, second
    finally:
        cluster.shutdown()


def _infos(store: RunStore) -> list[dict[str, Any]]:
    try:
        return store.infos()
    except (OSError, json.JSONDecodeError):
        return []


@pytest.mark.slow
def test_audit_on_a_two_node_cluster_survives_losing_a_node_and_matches_the_local_pool(
    two_nodes: tuple[Any, Any], write_spec: Any, tmp_path: Path
) -> None:
    cluster, second = two_nodes
    spec = toy_spec(seeds=[0, 1])
    spec["workloads"][0]["total_steps"] = 300
    spec_path = write_spec(spec)
    out = tmp_path / "ray"
    command = [CLI, "audit", str(spec_path), "--out", str(out), "--no-report"]
    audit = subprocess.Popen(
        [*command, "--backend", "ray", "--ray-address", cluster.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
    )
    store = RunStore(out)
    deadline = time.time() + 240
    try:  # wait until both nodes have a run in flight, then kill every process of the second
        while time.time() < deadline and audit.poll() is None:
            if sum(i.status == "running" for i in _infos(store)) >= 2:
                break
            time.sleep(0.05)
        assert audit.poll() is None, audit.communicate()[0]
        before = {i.run_id: i for i in _infos(store)}
        cluster.remove_node(second, allow_graceful=False)
        output, _ = audit.communicate(timeout=300)
    finally:
        if audit.poll() is None:
            audit.kill()
            audit.wait()
    done_before = {r for r, i in before.items() if i.status == "done"}
    if audit.returncode != 0:  # a run lost with the node may be `failed`: a rerun resumes it
        assert audit.returncode == 1, output
        again = subprocess.run(
            [*command, "--backend", "ray", "--ray-address", cluster.address],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert again.returncode == 0, again.stdout + again.stderr
        assert "resuming" in again.stdout
    infos = RunStore.open(out).infos()
    assert len(infos) == 4 and {i.status for i in infos} == {"done"}, infos
    assert len(list((out / "runs").iterdir())) == 4  # one record per run, never two
    for info in infos:
        assert 1 <= info.attempts <= 2
        if info.run_id in done_before:  # a finished run is kept, not redone
            assert info.attempts == 1 and info.started == before[info.run_id].started
    assert any(i.attempts == 2 for i in infos), "no run was in flight on the lost node"

    # the same seeds on the local pool record the same telemetry, evals and events
    local = tmp_path / "local"
    result = runner.invoke(app, ["audit", str(spec_path), "--out", str(local), "--no-report"])
    assert result.exit_code == 0, result.output
    local_store, ray_store = RunStore.open(local), RunStore.open(out)
    assert local_store.run_ids() == ray_store.run_ids()
    for run_id in local_store.run_ids():
        for table in ("telemetry", "evals", "events"):
            pd.testing.assert_frame_equal(
                local_store.table(run_id, table), ray_store.table(run_id, table)
            )
    assert not ray.is_initialized()
