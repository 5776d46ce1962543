"""One audit process per folder: two real processes, and a holder killed with SIGKILL."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from stabilitybench.audit.lock import LOCK_FILE
from stabilitybench.cli import app
from stabilitybench.store import RunStore

from .conftest import toy_spec

runner = CliRunner()
CLI = str(Path(sys.executable).parent / "stabilitybench")
HOLD = """
import sys, time
from stabilitybench.audit.lock import AuditLock
lock = AuditLock(sys.argv[1]); lock.acquire(); print("held", flush=True); time.sleep(120)
"""


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _wait_for_holder(
    lock_file: Path, process: subprocess.Popen[Any], seconds: float = 60
) -> dict[str, Any]:
    deadline = time.time() + seconds
    while time.time() < deadline and process.poll() is None:
        try:
            holder: dict[str, Any] = json.loads(lock_file.read_text())
            return holder
        except (OSError, ValueError):
            time.sleep(0.05)
    raise AssertionError("the first process never took the lock")


def test_a_second_audit_is_refused_naming_the_holder_and_a_dead_holder_frees_the_folder(
    write_spec: Any, tmp_path: Path
) -> None:
    out = tmp_path / "audit"
    spec = write_spec(toy_spec(seeds=[0]))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, env=_env(), text=True
    )
    try:
        info = _wait_for_holder(out / LOCK_FILE, holder)
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
        result = subprocess.run(
            [CLI, "audit", str(spec), "--out", str(out), "--no-report"],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=120,
        )
        message = " ".join(result.stderr.split())
        assert result.returncode == 2, result.stdout + result.stderr
        assert message.startswith("error: --out:") and "in use by another audit" in message
        assert (
            f"pid {holder.pid} on host {socket.gethostname()}, started {info['started']}" in message
        )
        assert "Traceback" not in message
        assert [p.name for p in out.iterdir()] == [LOCK_FILE]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up: the OS drops the lock
        holder.wait()
    result = runner.invoke(app, ["audit", str(spec), "--out", str(out), "--no-report"])
    assert result.exit_code == 0, result.output
    assert RunStore.open(out).status_counts()["done"] == 2
    assert (out / LOCK_FILE).read_text() == ""  # released: nobody holds it


def test_an_audit_holds_the_lock_while_its_runs_execute_and_a_second_touches_no_run(
    write_spec: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The test below without its two overlapping processes: a second audit of the folder starts
    # from inside the first one's backend, just before the first one's runs execute.
    from stabilitybench.audit.backends import LocalBackend
    from stabilitybench.audit.runner import run_audit_cli
    from stabilitybench.errors import StabilityBenchError

    out = tmp_path / "audit"
    spec = write_spec(toy_spec(seeds=[0]))
    refusals: list[str] = []
    run_every_task = LocalBackend.run

    def run_after_a_second_audit(self: LocalBackend, tasks: Any, on_result: Any) -> None:
        with pytest.raises(StabilityBenchError) as refused:
            run_audit_cli(spec, out, report=False, console=Console(file=io.StringIO()))
        refusals.append(" ".join(str(refused.value).split()))
        run_every_task(self, tasks, on_result)

    monkeypatch.setattr(LocalBackend, "run", run_after_a_second_audit)
    args = ["audit", str(spec), "--out", str(out), "--no-report", "--workers", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (message,) = refusals
    assert message.startswith("--out:") and "in use by another audit" in message
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
    runs = RunStore.open(out).runs_frame()
    assert list(runs["status"]) == ["done", "done"] and list(runs["attempts"]) == [1, 1]


@pytest.mark.slow
def test_two_audit_commands_at_once_run_every_run_once(write_spec: Any, tmp_path: Path) -> None:
    # Slow: two real audits that must overlap (the test above checks the same in one process).
    out = tmp_path / "audit"
    spec = toy_spec(seeds=[0])
    spec["workloads"][0]["total_steps"] = 300
    spec_path = write_spec(spec)
    command = [CLI, "audit", str(spec_path), "--out", str(out), "--no-report", "--workers", "1"]
    first = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env()
    )
    try:
        info = _wait_for_holder(out / LOCK_FILE, first)
        second = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=120)
        still_running = first.poll() is None
    finally:
        first.wait(timeout=300)
    assert first.returncode == 0
    assert still_running, "the first audit ended before the second started; make it longer"
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"pid {info['pid']}" in " ".join(second.stderr.split())
    infos = RunStore.open(out).infos()
    assert len(infos) == 2 and {i.status for i in infos} == {"done"}
    assert [i.attempts for i in infos] == [1, 1]  # before the lock: 2 on every run


def test_a_filesystem_without_locks_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import fcntl

    from stabilitybench.audit.lock import AuditLock
    from stabilitybench.errors import StabilityBenchError

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(
        StabilityBenchError, match=r"cannot lock .*audit.lock .*file locks \(flock\)"
    ):
        AuditLock(tmp_path / "audit").acquire()
