"""The audit runner on the toy workload: local pool, resume, failure isolation (Ray: see
test_ray_backend.py)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from stabilitybench.cli import app
from stabilitybench.store import RunStore

from .conftest import toy_spec

runner = CliRunner()
RUN_FILES = {"run.json", "telemetry.parquet", "evals.parquet", "events.parquet"}
RUN_JSON_FIELDS = {
    "run_id",
    "label",
    "audit",
    "workload",
    "kind",
    "knobs",
    "perturbation",
    "seed",
    "spec",
    "status",
    "started",
    "finished",
    "wall_s",
    "attempts",
    "outcome",
    "error",
}


def _audit(spec: Path, out: Path, *extra: str) -> Any:
    return runner.invoke(app, ["audit", str(spec), "--out", str(out), "--no-report", *extra])


def _check_complete(store: RunStore, expected_runs: int) -> list[dict[str, Any]]:
    """Every run done once, with exactly its four files, all readable; no temporary leftovers."""
    infos = store.infos()
    assert len(infos) == expected_runs
    assert not list(store.root.rglob("*.tmp"))
    for info in infos:
        run_dir = store.run_dir(info.run_id)
        assert {p.name for p in run_dir.iterdir()} == RUN_FILES
        assert info.status == "done", info
        assert set(json.loads((run_dir / "run.json").read_text())) >= RUN_JSON_FIELDS
        data = store.load(info.run_id)
        steps = info.spec["workload"]["total_steps"]
        assert list(data.telemetry["step"]) == list(range(steps))
        assert data.evals["step"].iloc[0] == 0
        assert info.outcome.steps == steps
    return infos


def test_local_pool_runs_the_grid_and_a_rerun_skips_it(write_spec: Any, tmp_path: Path) -> None:
    out = tmp_path / "audit"
    spec = write_spec(toy_spec())
    result = _audit(spec, out, "--workers", "2")
    assert result.exit_code == 0, result.output
    assert "all 4 runs done" in result.output
    store = RunStore.open(out)
    infos = _check_complete(store, 4)
    audit = store.audit()
    assert audit.name == "toy-test" and sorted(audit.run_ids) == sorted(store.run_ids())
    perturbed = [i for i in infos if i.perturbation.kind == "lr_spike"]
    assert len(perturbed) == 2
    assert perturbed[0].perturbation.params == {"at": 0.5, "factor": 50, "duration": 5}
    for info in perturbed:  # the spike is recorded as an event over steps 30..34
        events = store.table(info.run_id, "events")
        assert (events["start_step"].iloc[0], events["end_step"].iloc[0]) == (30, 34)
    evals = store.query("SELECT perf, val_loss FROM evals")
    assert len(evals) == 4 * 7 and (evals["perf"] == -evals["val_loss"]).all()

    again = _audit(spec, out, "--workers", "2")
    assert again.exit_code == 0, again.output
    assert "4 of 4 runs already done" in again.output
    assert [i.started for i in store.infos()] == [i.started for i in infos]
    assert all(i.attempts == 1 for i in store.infos())


def test_a_different_spec_is_refused_for_an_existing_audit(
    write_spec: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stabilitybench.audit.backends import LocalBackend

    # The first audit only has to leave its folder behind; its runs need not execute.
    monkeypatch.setattr(LocalBackend, "run", lambda self, tasks, on_result: None)
    out = tmp_path / "audit"
    assert _audit(write_spec(toy_spec(seeds=[0])), out).exit_code == 1  # 2 runs unfinished
    before = sorted(p.name for p in out.rglob("*"))
    result = _audit(write_spec(toy_spec(seeds=[0, 1]), name="other.yaml"), out)
    assert result.exit_code == 2
    assert "different spec" in " ".join(result.output.split())
    assert sorted(p.name for p in out.rglob("*")) == before


def test_a_spec_that_changes_only_how_warnings_are_scored_resumes_the_audit(
    write_spec: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`warning` scores the runs and trains nothing: the audit resumes, its record takes the new
    settings (what `evaluate` then reads), and a change to the runs is still refused."""
    from stabilitybench.audit.backends import LocalBackend
    from stabilitybench.store import RunStore

    monkeypatch.setattr(LocalBackend, "run", lambda self, tasks, on_result: None)
    out = tmp_path / "audit"
    assert _audit(write_spec(toy_spec(seeds=[0])), out).exit_code == 1
    first = RunStore(out).audit()
    spec = toy_spec(seeds=[0], warning={"horizon": 20, "target_false_alarms": 2.0})
    spec["workloads"][0]["warning"] = {"sph": 5}
    result = _audit(write_spec(spec, name="rescored.yaml"), out)
    assert result.exit_code == 1 and "different spec" not in result.output  # resumed
    after = RunStore(out).audit()
    assert after.spec_hash != first.spec_hash and after.run_ids == first.run_ids
    assert after.spec["warning"] == {"horizon": 20, "target_false_alarms": 2.0}
    assert after.spec["workloads"][0]["warning"] == {"sph": 5}
    changed = toy_spec(seeds=[0], warning={"horizon": 20, "target_false_alarms": 2.0})
    changed["workloads"][0]["total_steps"] = 80
    refused = _audit(write_spec(changed, name="changed.yaml"), out)
    assert refused.exit_code == 2 and "different spec" in " ".join(refused.output.split())


def test_dry_run_prints_the_grid_and_writes_nothing(write_spec: Any, tmp_path: Path) -> None:
    out = tmp_path / "audit"
    result = runner.invoke(
        app,
        ["audit", str(write_spec(toy_spec())), "--out", str(out), "--dry-run"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "4 runs" in result.output and "estimated cost" in result.output
    assert result.output.count("lr_spike(at=0.5,factor=50,duration=5)") == 2
    assert "guard" not in result.output  # no guard column for an unguarded grid
    assert not out.exists()
    guarded = toy_spec()
    guarded["workloads"][0]["guards"] = ["none", {"detector": "zclip", "action": "skip"}]
    result = runner.invoke(
        app,
        ["audit", str(write_spec(guarded, name="g.yaml")), "--out", str(out), "--dry-run"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "8 runs" in result.output and result.output.count("zclip:skip") == 4
    assert not out.exists()


def test_the_estimate_follows_the_cost_knobs() -> None:
    from stabilitybench.audit.runner import estimate_run_seconds

    lm = {"name": "lm", "kind": "lm", "size": "small", "total_steps": 1000, "knobs": {}}
    full = estimate_run_seconds(lm)
    quarter = estimate_run_seconds({**lm, "knobs": {"batch_size": 4, "block_size": 128}})
    assert 0.25 < quarter / full < 0.3  # a quarter of the tokens, plus the fixed share
    sac = {"name": "sac", "kind": "rl", "algo": "sac", "env": "Pendulum-v1", "total_steps": 8000}
    halved = {**sac, "knobs": {"train_freq": 2, "batch_size": [256, 128]}}  # swept: first value
    assert 0.5 < estimate_run_seconds(halved) / estimate_run_seconds(sac) < 0.6
    ppo = {**sac, "name": "ppo", "algo": "ppo", "knobs": {"batch_size": 4}}
    assert estimate_run_seconds(ppo) == estimate_run_seconds({**ppo, "knobs": {}})
    # No gradient steps before `learning_starts`; TD3's larger networks cost more per update.
    late = {**sac, "knobs": {"learning_starts": 4000}}
    assert 0.5 < estimate_run_seconds(late) / estimate_run_seconds(sac) < 0.6
    assert 1.8 < estimate_run_seconds({**sac, "algo": "td3"}) / estimate_run_seconds(sac) < 2.2


# Median wall time per run of the paper audits when they ran two at a time on 2 cores with nothing
# else beside them (share_prefix runs count their prefix, as run.json's `started` does). The
# five-seed `results/paper_rl_sac` is not one of them: it ran beside two full test suites (median
# 841 s), a load the estimate does not model; its first three seeds, alone, took the 520 s here.
MEASURED_RL_RUNS = [
    # results/paper_rl_ppo (40 runs)
    (
        {
            "algo": "ppo",
            "env": "HalfCheetah-v5",
            "total_steps": 300000,
            "eval": {"every": 15000, "episodes": 3},
            "knobs": {"ent_coef": 0.01, "normalize": True},
        },
        337,
    ),
    # results/paper_rl_td3 at 50k env steps (40 runs, commit 5c34a43)
    (
        {
            "algo": "td3",
            "env": "HalfCheetah-v5",
            "total_steps": 50000,
            "eval": {"every": 2500, "episodes": 3},
            "knobs": {
                "action_noise": 0.1,
                "batch_size": 128,
                "train_freq": 2,
                "learning_starts": 5000,
            },
        },
        489,
    ),
    # results/paper_rl_sac, seeds 0-2 (24 runs, commit 412aef1)
    (
        {
            "algo": "sac",
            "env": "HalfCheetah-v5",
            "total_steps": 60000,
            "eval": {"every": 2500, "episodes": 3},
            "knobs": {
                "ent_coef": "auto_0.1",
                "batch_size": 128,
                "train_freq": 1,
                "learning_starts": 10000,
            },
        },
        520,
    ),
]


@pytest.mark.parametrize(("workload", "measured_s"), MEASURED_RL_RUNS, ids=["ppo", "td3", "sac"])
def test_the_rl_estimate_matches_the_paper_audits_runs(
    workload: dict[str, Any], measured_s: float
) -> None:
    from stabilitybench.audit.runner import estimate_run_seconds

    ratio = estimate_run_seconds({"kind": "rl", "name": "w", **workload}) / measured_s
    assert 0.85 < ratio < 1.15, ratio


def test_failing_runs_are_isolated_and_summarised(write_spec: Any, tmp_path: Path) -> None:
    spec = toy_spec(perturbations=["none"])
    spec["workloads"][0]["knobs"]["fail_at_step"] = [None, 7]
    out = tmp_path / "audit"
    result = _audit(write_spec(spec), out, "--workers", "2")
    assert result.exit_code == 1, result.output
    assert "2 of 4 runs failed" in result.output
    store = RunStore.open(out)
    by_status: dict[str, list[dict[str, Any]]] = {}
    for info in store.infos():
        by_status.setdefault(info.status, []).append(info)
    assert {k: len(v) for k, v in by_status.items()} == {"done": 2, "failed": 2}
    for info in by_status["failed"]:
        assert info.knobs["fail_at_step"] == 7
        assert "Traceback" in info.error and "fail_at_step=7 reached" in info.error
    status = runner.invoke(app, ["status", str(out)], env={"COLUMNS": "200"})
    assert status.exit_code == 0
    assert status.output.count("fail_at_step=7 reached") == 2


def test_non_finite_loss_is_a_collapse_not_a_failure(write_spec: Any, tmp_path: Path) -> None:
    spec = toy_spec(seeds=[0], perturbations=[{"kind": "weight_noise", "at": 20, "scale": 1e20}])
    out = tmp_path / "audit"
    result = _audit(write_spec(spec), out, "--workers", "1")
    assert result.exit_code == 0, result.output
    (info,) = RunStore.open(out).infos()
    assert info.status == "done"
    assert info.outcome.diverged is True and info.outcome.final_perf == -math.inf
    assert info.outcome.steps < 60
    evals = RunStore.open(out).table(info.run_id, "evals")
    assert evals["perf"].iloc[-1] == -math.inf


def test_a_worker_killed_by_the_os_fails_its_run_only(write_spec: Any, tmp_path: Path) -> None:
    spec = toy_spec(perturbations=["none"])
    spec["workloads"][0]["knobs"]["crash_at_step"] = [None, 5]
    out = tmp_path / "audit"
    result = _audit(write_spec(spec), out, "--workers", "1")
    assert result.exit_code == 1, result.output
    infos = RunStore.open(out).infos()
    assert sorted(i.status for i in infos) == ["done", "done", "failed", "failed"]
    for info in infos:
        if info.status == "failed":
            assert info.knobs["crash_at_step"] == 5
            assert "worker process died" in info.error


def test_resume_after_sigkill_finishes_every_run_exactly_once(
    write_spec: Any, tmp_path: Path
) -> None:
    spec = toy_spec(seeds=[0, 1, 2])
    spec["workloads"][0]["total_steps"] = 150
    spec_path = write_spec(spec)
    out = tmp_path / "audit"
    command = [
        str(Path(sys.executable).parent / "stabilitybench"),
        "audit",
        str(spec_path),
        "--out",
        str(out),
        "--workers",
        "1",
        "--no-report",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    store = RunStore(out)
    deadline = time.time() + 60
    try:
        while time.time() < deadline and process.poll() is None:
            if any(i.status == "done" for i in _safe_infos(store)):
                break
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the audit finished before it could be killed"
    before = {i.run_id: i for i in _safe_infos(store)}
    finished_before = {r for r, i in before.items() if i.status == "done"}
    assert 1 <= len(finished_before) < 6

    result = _audit(spec_path, out, "--workers", "2")
    assert result.exit_code == 0, result.output
    infos = _check_complete(store, 6)
    for info in infos:
        if info.run_id in finished_before:  # not run again
            assert info.attempts == 1 and info.started == before[info.run_id].started
        elif info.run_id in before and before[info.run_id].status == "running":  # killed, redone
            assert info.attempts == 2


def _live_processes_of_session(session: int) -> list[int]:
    """The pids, not zombies, of the processes in session `session` (Linux /proc)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, sid = fields[0], int(fields[3])
        if sid == session and state != "Z":
            live.append(int(stat.parent.name))
    return live


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG)")
def test_killing_the_audit_process_alone_ends_its_workers(write_spec: Any, tmp_path: Path) -> None:
    # `kill PID` of an audit started with `nohup … &` reaches the audit process only; its
    # workers (through its fork server) must not train on, or a resumed audit would train the
    # same runs beside them (and they would record those runs as failed over the new attempts).
    spec = toy_spec(seeds=[0, 1], perturbations=["none"])
    spec["workloads"][0]["total_steps"] = 10_000_000
    out = tmp_path / "audit"
    command = [
        str(Path(sys.executable).parent / "stabilitybench"),
        *("audit", str(write_spec(spec)), "--out", str(out), "--workers", "2", "--no-report"),
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    store = RunStore(out)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and process.poll() is None:
            running = [i for i in _safe_infos(store) if i.status == "running"]
            if len(running) == 2 and len(_live_processes_of_session(process.pid)) >= 4:
                break  # the audit, its fork server and two workers
            time.sleep(0.1)
        assert process.poll() is None, "the audit ended before it could be killed"
        process.send_signal(signal.SIGKILL)  # the audit process only, not its group
        process.wait()
        deadline = time.time() + 30
        while time.time() < deadline and _live_processes_of_session(process.pid):
            time.sleep(0.1)
        assert _live_processes_of_session(process.pid) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    # The runs it was training are left `running`: a resumed audit trains them again.
    assert sorted(i.status for i in store.infos()) == ["running", "running"]


def test_a_superseded_attempt_does_not_record_its_end(tmp_path: Path) -> None:
    from stabilitybench.store import RunInfo, RunWriter

    old, new = RunWriter(tmp_path / "run"), RunWriter(tmp_path / "run")
    old.start(RunInfo(run_id="run"))
    new.start(RunInfo(run_id="run"))  # an audit resumed while the first attempt lived on
    old.fail("its folder was cleared under it")
    assert new.read_info().status == "running" and new.read_info().attempts == 2
    new.finish({})
    old.fail("too late")
    # A run recorded done carries no error, whatever an earlier writer left in run.json.
    stale = RunWriter(tmp_path / "stale")
    stale.start(RunInfo(run_id="stale"))
    stale.update_info(error="left by a superseded attempt")
    stale.finish({})
    assert stale.read_info().error is None
    info = new.read_info()
    assert info.status == "done" and info.error is None and info.attempts == 2


def _safe_infos(store: RunStore) -> list[dict[str, Any]]:
    try:
        return store.infos()
    except (OSError, json.JSONDecodeError):
        return []


def test_the_lm_estimate_counts_the_vocabulary_and_the_probes() -> None:
    # The measured rates (tiny GPT-2, 16 x 64 tokens, 400 steps, two runs at a time on 2 cores):
    # 43.7 s on bytes, 64.6 s on 2,048 BPE tokens, 69.3 s with the stability probes too.
    from stabilitybench.audit.runner import estimate_run_seconds

    def seconds(**extra: object) -> float:
        config = {
            "name": "w",
            "kind": "lm",
            "size": "tiny",
            "total_steps": 400,
            "eval": {"every": 400, "batches": 1},
            "knobs": {"batch_size": 16, "block_size": 64},
            **extra,
        }
        return estimate_run_seconds(config)

    byte, bpe = seconds(), seconds(tokenizer="bpe")
    probed = seconds(tokenizer="bpe", probes="stability")
    assert (bpe - byte) / 400 == pytest.approx(2.8e-8 * 1024 * 1792, rel=1e-2)  # + its eval
    assert 1.3 < bpe / byte < 1.7 and probed / bpe == pytest.approx(1.09, rel=0.02)
    assert seconds(tokenizer={"kind": "bpe", "vocab_size": 256 + 1}) > byte
