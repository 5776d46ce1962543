"""`stabilitybench watch`: the live view of an audit's runs, read from what they have written."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from audit.conftest import toy_spec  # tests/audit/conftest.py
from stabilitybench.cli import app
from stabilitybench.detectors.base import DetectorSettings, detector_class
from stabilitybench.store import RunInfo, RunStore
from stabilitybench.streaming import ParquetSink
from stabilitybench.types import RunStatus
from stabilitybench.watch import (
    GuardAction,
    detector_view,
    guard_actions,
    read_snapshot,
    render,
    resolve_target,
)

WIDE = {"COLUMNS": "300"}  # every column fits: cells are not folded in the output
ZCLIP_SKIP = {"label": "zclip:skip", "detector": "zclip", "action": "skip"}


def _invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(app, ["watch", *args], env=env or WIDE)


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and modification time."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def toy_audit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real toy audit: one seed, none and a big LR spike, unguarded and guarded (4 runs)."""
    root = tmp_path_factory.mktemp("watch")
    spec = toy_spec(seeds=[0], guards=["none", {"detector": "zclip", "action": "skip"}])
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = root / "audit"
    result = CliRunner().invoke(
        app, ["audit", str(path), "--out", str(out), "--no-report", "--workers", "1"]
    )
    assert result.exit_code == 0, result.output
    return out


def _telemetry_rows(steps: range) -> list[dict[str, Any]]:
    """Calm telemetry, then a gradient-norm spike over the last three steps."""
    rng = np.random.default_rng(0)
    rows = []
    for step in steps:
        spike = step >= 37
        rows.append(
            {
                "step": step,
                "loss": 2.0 - 0.01 * step,
                "grad_norm": (500.0 if spike else 1.0) + 0.05 * float(rng.standard_normal()),
                "update_ratio": 0.001,
            }
        )
    return rows


def _guard_event(step: int) -> dict[str, Any]:
    params = {"action": "skip", "detector": "zclip", "score": 9.0, "guard": "skip"}
    return {
        "kind": "guard",
        "name": "skip",
        "dimension": "guard",
        "params": json.dumps(params),
        "start_step": step,
        "end_step": step,
    }


@pytest.fixture
def running_audit(tmp_path: Path) -> Path:
    """An audit folder written by hand with one run still going: run.json says `running`, and
    its telemetry and events so far are part files (as a streaming sink leaves them)."""
    store = RunStore(tmp_path / "audit")
    store.write_audit({"name": "hand"})
    writer = store.writer("run-a")
    writer.start(
        RunInfo(
            run_id="run-a",
            label="toy/lr_spike/guard=zclip:skip/seed0",
            kind="toy",
            spec={"workload": {"name": "toy", "kind": "toy", "total_steps": 100}},
            guard=ZCLIP_SKIP,
        )
    )
    writer.write_rows(_telemetry_rows(range(0, 20)))
    writer.write_rows(_telemetry_rows(range(20, 40)))
    events = ParquetSink(writer.run_dir / "events.parquet")
    events.write_rows([_guard_event(37), _guard_event(38)])
    return store.root


def _run_dir(audit: Path) -> Path:
    (run_dir,) = (audit / "runs").iterdir()
    return run_dir


# -- the typed snapshot ----------------------------------------------------------------------------
def test_a_finished_audit_gives_each_run_its_latest_values_scores_and_guard_actions(
    toy_audit: Path,
) -> None:
    snapshot = read_snapshot(resolve_target(toy_audit))
    store = RunStore.open(toy_audit)
    assert snapshot.title == "toy-test" and snapshot.finished
    assert snapshot.counts[RunStatus.DONE.value] == 4 and len(snapshot.runs) == 4
    for run in snapshot.runs:
        telemetry = store.table(run.run_id, "telemetry")
        assert run.progress == (60, 60)
        assert run.tables.values["loss"] == pytest.approx(telemetry["loss"].iloc[-1])
        assert run.tables.values["grad_norm"] == pytest.approx(telemetry["grad_norm"].iloc[-1])
        zclip = next(d for d in run.tables.detectors if d.name == "zclip")
        alarms = detector_class("zclip").create(DetectorSettings()).alarms(telemetry)
        assert zclip.alarm == alarms[-1]
        assert zclip.alarms == int(alarms[0]) + int((alarms[1:] & ~alarms[:-1]).sum())
        names = {d.name for d in run.tables.detectors}
        assert not names & {"msm", "pca", "clock", "random"}  # fitted and controls left out
        events = store.table(run.run_id, "events")
        expected = sorted(events.loc[events["kind"] == "guard", "start_step"].astype(int))
        assert [a.step for a in run.tables.actions or ()] == expected
    guarded = [r for r in snapshot.runs if r.guard_label == "zclip:skip"]
    assert len(guarded) == 2 and any(r.tables.actions for r in guarded)


def test_a_running_run_is_read_from_its_part_files(running_audit: Path) -> None:
    snapshot = read_snapshot(resolve_target(_run_dir(running_audit)))
    (run,) = snapshot.runs
    assert run.info.status == RunStatus.RUNNING and not snapshot.finished
    assert run.progress == (40, 100)
    assert run.tables.values["loss"] == pytest.approx(2.0 - 0.39)
    zclip = next(d for d in run.tables.detectors if d.name == "zclip")
    assert zclip.alarm and zclip.alarms == 1
    assert run.tables.actions == (GuardAction(37, "skip"), GuardAction(38, "skip"))


def test_a_run_is_scored_again_only_when_a_part_file_arrives(running_audit: Path) -> None:
    target = resolve_target(running_audit)
    first = read_snapshot(target)
    again = read_snapshot(target, first)
    assert again.runs[0].tables is first.runs[0].tables  # no new part: nothing re-read
    RunStore(running_audit).writer("run-a").write_rows(_telemetry_rows(range(40, 50)))
    later = read_snapshot(target, again)
    assert later.runs[0].tables is not first.runs[0].tables
    assert later.runs[0].progress == (50, 100)


def test_runs_that_share_a_prefix_show_its_progress(tmp_path: Path) -> None:
    """While a shared prefix trains (`share_prefix`), its runs have written nothing of their
    own: each shows the prefix's telemetry under `.prefix/<first run>/`, marked as shared."""
    from stabilitybench.io import write_json
    from stabilitybench.store import PREFIX_DIR, PREFIX_MEMBERS, RunWriter

    store = RunStore(tmp_path / "audit")
    store.write_audit({"name": "shared"})
    spec = {"workload": {"name": "toy", "kind": "toy", "total_steps": 100}}
    for run_id in ("run-a", "run-b", "run-c"):
        store.writer(run_id).start(RunInfo(run_id=run_id, label=run_id, kind="toy", spec=spec))
    prefix = store.root / PREFIX_DIR / "run-a"
    prefix.mkdir(parents=True)
    write_json(prefix / PREFIX_MEMBERS, ["run-a", "run-b"])
    RunWriter(prefix).write_rows(_telemetry_rows(range(0, 30)))
    runs = {r.run_id: r for r in read_snapshot(resolve_target(store.root)).runs}
    assert runs["run-a"].shared and runs["run-b"].shared and not runs["run-c"].shared
    assert runs["run-a"].progress == runs["run-b"].progress == (30, 100)
    assert runs["run-c"].progress == (None, 100)
    table = io.StringIO()
    Console(file=table, width=300).print(render(read_snapshot(resolve_target(store.root))))
    assert table.getvalue().count("(shared prefix)") == 2
    # After the fork a run writes its own tables, and shows them.
    store.writer("run-b").write_rows(_telemetry_rows(range(0, 35)))
    runs = {r.run_id: r for r in read_snapshot(resolve_target(store.root)).runs}
    assert not runs["run-b"].shared and runs["run-b"].progress == (35, 100)


def test_running_runs_come_first_then_the_latest_finished(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "audit")
    store.write_audit({"name": "order"})
    for index in range(8):
        status = RunStatus.RUNNING if index == 3 else RunStatus.DONE
        run_id = f"run-{index}"
        store.writer(run_id).write_info(
            RunInfo(run_id=run_id, label=run_id, status=status, started=index, finished=index)
        )
    store.writer("run-p").write_info(RunInfo(run_id="run-p", label="run-p"))
    snapshot = read_snapshot(resolve_target(store.root))
    assert [r.run_id for r in snapshot.runs] == [
        "run-3",
        "run-7",
        "run-6",
        "run-5",
        "run-4",
        "run-2",
    ]
    everything = read_snapshot(resolve_target(store.root), show_all=True)
    assert len(everything.runs) == 9 and everything.runs[-1].run_id == "run-p"
    assert not everything.finished  # a pending run is not finished


def test_detector_view_counts_alarm_episodes_and_reads_the_latest_finite_score() -> None:
    scores = np.array([np.nan, 1.0, 5.0, 6.0, 2.0, 7.0, np.nan])
    alarms = np.array([False, False, True, True, False, True, False])
    view = detector_view("zclip", scores, alarms)
    assert (view.score, view.alarm, view.alarms) == (7.0, True, 2)
    empty = detector_view("eos", np.full(3, np.nan), np.zeros(3, bool))
    assert np.isnan(empty.score) and not empty.alarm and empty.alarms == 0


def test_guard_actions_are_the_guard_rows_of_the_events_table() -> None:
    events = pd.DataFrame(
        {
            "kind": ["lr_spike", "guard", "guard"],
            "name": ["lr_spike", "rollback", "skip"],
            "start_step": [30, 40, 32],
        }
    )
    assert guard_actions(events) == (GuardAction(32, "skip"), GuardAction(40, "rollback"))
    assert guard_actions(pd.DataFrame()) == ()


def test_a_narrow_terminal_gets_the_detectors_in_one_column(running_audit: Path) -> None:
    snapshot = read_snapshot(resolve_target(running_audit))

    def text(width: int | None) -> str:
        console = Console(file=io.StringIO(), width=400, color_system=None)
        console.print(render(snapshot, width))
        return console.file.getvalue()  # type: ignore[attr-defined]

    wide, narrow = text(None), text(100)
    assert "zclip" in wide.splitlines()[1] and "detectors" not in wide.splitlines()[1]
    assert "detectors" in narrow.splitlines()[1] and "● zclip" in narrow


# -- the command ----------------------------------------------------------------------------------
def test_watch_once_shows_every_run_of_a_toy_audit_and_writes_nothing(toy_audit: Path) -> None:
    before = _files(toy_audit)
    result = _invoke(str(toy_audit), "--once")
    assert result.exit_code == 0, result.output
    store = RunStore.open(toy_audit)
    for info in store.infos():
        assert info.label in result.output
    assert "toy-test: 4 done" in result.output
    assert result.output.count("60/60") == 4
    assert "zclip" in result.output and "coherence" in result.output
    guarded = next(i for i in store.infos() if i.guard and i.perturbation.kind == "lr_spike")
    events = store.table(guarded.run_id, "events")
    skips = events[events["kind"] == "guard"]
    assert f"zclip:skip {len(skips)}, skip @{int(skips['start_step'].max())}" in result.output
    assert _files(toy_audit) == before


def test_watch_once_on_a_running_run_folder(running_audit: Path) -> None:
    before = _files(running_audit)
    result = _invoke(str(_run_dir(running_audit)), "--once")
    assert result.exit_code == 0, result.output
    assert "toy/lr_spike/guard=zclip:skip/seed0" in result.output
    assert "running" in result.output and "40/100" in result.output
    assert "1.61" in result.output  # the latest loss
    assert "● " in result.output  # zclip alarms at the latest step
    assert "zclip:skip 2, skip @38" in result.output
    assert _files(running_audit) == before


@pytest.mark.parametrize("kind", ["empty folder", "missing", "runs folder"])
def test_a_folder_that_is_neither_an_audit_nor_a_run_is_one_line_and_exit_2(
    kind: str, running_audit: Path, tmp_path: Path
) -> None:
    path = {
        "empty folder": tmp_path / "empty",
        "missing": tmp_path / "missing",
        "runs folder": running_audit / "runs",
    }[kind]
    if kind == "empty folder":
        path.mkdir()
    before = _files(tmp_path)
    result = _invoke(str(path), "--once")
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert str(path) in message and "Traceback" not in result.output
    expected = "no such folder" if kind == "missing" else "neither an audit folder"
    assert expected in message
    assert _files(tmp_path) == before


def test_a_bad_interval_is_a_user_error(running_audit: Path) -> None:
    result = _invoke(str(running_audit), "--interval", "0")
    assert result.exit_code == 2 and "--interval" in result.output


def test_ctrl_c_stops_watching_quietly(
    running_audit: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("stabilitybench.watch.sleep", interrupted)
    result = _invoke(str(running_audit))
    assert result.exit_code == 0, result.output
    assert "stopped watching" in result.output and "Traceback" not in result.output
    assert "Aborted" not in result.output


def test_watch_refreshes_until_every_run_has_finished(
    running_audit: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = RunStore(running_audit).writer("run-a")
    waits: list[float] = []

    def the_run_goes_on(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 1:
            writer.write_rows(_telemetry_rows(range(40, 100)))
        else:
            writer.finish({"steps": 100})

    monkeypatch.setattr("stabilitybench.watch.sleep", the_run_goes_on)
    result = _invoke(str(running_audit), "--interval", "0.5")
    assert result.exit_code == 0, result.output
    assert waits == [0.5, 0.5]
    assert "every run has finished (hand: 1 done)" in result.output
    assert "100/100" in result.output  # the last view


def test_a_finished_audit_ends_at_once_unless_follow(
    toy_audit: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[float] = []

    def wait(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr("stabilitybench.watch.sleep", wait)
    result = _invoke(str(toy_audit))
    assert result.exit_code == 0 and "every run has finished" in result.output and not waits
    followed = _invoke(str(toy_audit), "--follow")
    assert followed.exit_code == 0 and len(waits) == 2
    assert "stopped watching" in followed.output


def test_watch_loads_no_training_framework(toy_audit: Path) -> None:
    probe = (
        "import sys\n"
        "from stabilitybench.cli import app\n"
        "sys.argv = ['stabilitybench', 'watch', sys.argv[1], '--once']\n"
        "try:\n    app()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "heavy = ('torch', 'transformers', 'stable_baselines3', 'ray', 'lightning',"
        " 'matplotlib', 'scipy')\n"
        "print(sorted(m for m in heavy if m in sys.modules), file=sys.__stderr__)\n"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-c", probe, str(toy_audit)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "[]", result.stderr
