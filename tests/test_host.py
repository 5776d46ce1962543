"""The machine a run trained on (`host`): recorded in run.json, summarised by `export`."""

from __future__ import annotations

import torch

from stabilitybench.host import MACHINE_KEYS, distinct_hosts, host_info, machine_of
from stabilitybench.store import RunInfo, RunWriter


def test_host_info_names_the_cpu_and_torchs_kernels() -> None:
    info = host_info()
    assert info["cpu"] and info["machine"] and info["cores"] >= 1
    assert info["torch"] == torch.__version__
    assert info["torch_cpu"] == torch.backends.cpu.get_cpu_capability()
    assert info["torch_threads"] == torch.get_num_threads()


def test_a_started_run_records_its_host(tmp_path) -> None:
    writer = RunWriter(tmp_path / "run")
    writer.start(RunInfo(run_id="run"))
    writer.finish({})
    recorded = writer.read_info().host
    assert recorded is not None and machine_of(recorded) == machine_of(host_info())


def test_distinct_hosts_counts_runs_per_machine_and_the_unknown() -> None:
    here = host_info()
    other = {**here, "cpu": "Another CPU", "torch_cpu": "AVX2"}
    threads = {**here, "torch_threads": 7}  # not a machine difference
    hosts = distinct_hosts([here, threads, other, None])
    assert hosts[0] == {**{k: here.get(k) for k in MACHINE_KEYS}, "runs": 2}
    assert {"unknown": True, "runs": 1} in hosts
    assert {**{k: other.get(k) for k in MACHINE_KEYS}, "runs": 1} in hosts
    assert len(hosts) == 3
