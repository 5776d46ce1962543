"""An audit in slices (`audit --only`) merged into one findings folder (`stabilitybench merge`)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from stabilitybench.cli import app
from stabilitybench.store import RunStore

from .conftest import toy_spec

runner = CliRunner()


def two_level_spec(**overrides: Any) -> dict[str, Any]:
    """12 toy runs: two lr levels (0.01 the reference) x 2 perturbations x 3 seeds."""
    spec = toy_spec(seeds=[0, 1, 2])
    spec["workloads"][0]["knobs"] = {"lr": [0.01, 0.02], "hidden": 16}
    spec["workloads"][0]["reference"] = {"lr": 0.01}
    spec.update(overrides)
    return spec


def invoke(*args: str) -> Any:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The spec run whole, and in two slices (each exported --partial --refittable)."""
    root = tmp_path_factory.mktemp("merge")
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump(two_level_spec(), sort_keys=False))
    paths = {"spec": spec, "root": root}
    for name, only in (("high", "lr=0.02"), ("low", "lr=0.01")):
        audit = root / f"audit_{name}"
        result = invoke("audit", spec, "--out", audit, "--no-report", "--only", only)
        assert result.exit_code == 0, result.output
        assert "6 runs of the spec are outside it" in " ".join(result.output.split())
        part = root / f"part_{name}"
        fit = "--fit" if name == "high" else "--no-fit"  # a slice merge will fit anyway
        result = invoke("export", audit, "--out", part, "--partial", "--refittable", fit)
        assert result.exit_code == 0, result.output
        paths[f"audit_{name}"], paths[name] = audit, part
    whole = root / "audit_whole"
    result = invoke("audit", spec, "--out", whole, "--no-report")
    assert result.exit_code == 0, result.output
    paths["whole"] = whole
    return paths


def test_only_runs_the_slice_and_leaves_the_rest_pending(parts: dict[str, Path]) -> None:
    store = RunStore(parts["audit_high"])
    statuses = {i.knobs["lr"]: set() for i in store.infos()}
    for info in store.infos():
        statuses[info.knobs["lr"]].add(info.status.value)
    assert statuses == {0.02: {"done"}, 0.01: {"pending"}}
    # The folder is an audit of the whole spec: running the spec again finishes the rest.
    result = invoke("audit", parts["spec"], "--out", parts["audit_high"], "--dry-run")
    assert result.exit_code == 0, result.output
    assert "6 runs to do" in " ".join(result.output.split())


def test_a_refittable_part_keeps_every_telemetry_column(parts: dict[str, Path]) -> None:
    import pyarrow.parquet as pq

    store = RunStore(parts["audit_low"])
    run_id = next(i.run_id for i in store.infos() if i.status.value == "done")
    full = pq.read_schema(store.run_dir(run_id) / "telemetry.parquet").names
    kept = pq.read_schema(parts["low"] / "runs" / run_id / "telemetry.parquet").names
    assert kept == full
    assert json.loads((parts["low"] / "version.json").read_text())["refittable"] is True
    # a re-export keeps every column (it would drop what `merge` needs)
    again = parts["root"] / "again"
    assert invoke("export", parts["low"], "--out", again, "--partial").exit_code == 0
    assert pq.read_schema(again / "runs" / run_id / "telemetry.parquet").names == full
    assert json.loads((again / "version.json").read_text())["refittable"] is True
    # exported --no-fit: no monitor, so claim 3 says why it is not judged
    assert not (parts["low"] / "monitor" / "fit.json").exists()
    assert "claim 3" in (parts["low"] / "findings.md").read_text()


def test_merge_gives_the_whole_audits_verdicts(parts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = invoke("merge", parts["high"], parts["low"], "--spec", parts["spec"], "--out", out)
    assert result.exit_code == 0, result.output
    merged = RunStore(out)
    assert merged.is_findings_folder and len(merged.run_ids()) == 12
    assert {i.status.value for i in merged.infos()} == {"done"}
    # `healthy` comes from the merged spec's reference: lr 0.01 and nothing done.
    healthy = {(i.knobs["lr"], i.perturbation.kind) for i in merged.infos() if i.healthy}
    assert healthy == {(0.01, "none")}
    version = json.loads((out / "version.json").read_text())
    assert [p["runs"] for p in version["parts"]] == [6, 6]
    assert version["refittable"] is False
    fit = json.loads((out / "monitor" / "fit.json").read_text())
    assert fit["workloads"]["toy"]["baseline_seeds"] == [0, 1, 2]
    assert fit["workloads"]["toy"]["scored_runs"] == 12
    # The collapse labels are the evaluations', the same as the spec run whole.
    whole = tmp_path / "whole"
    assert invoke("export", parts["whole"], "--out", whole).exit_code == 0

    def labels(folder: Path) -> dict[str, Any]:
        runs = json.loads((folder / "summary.json").read_text())["runs"]
        keys = ("collapsed", "collapse_reason", "irreversible", "final_perf", "perf_pre")
        return {r["run_id"]: [r[k] for k in keys] for r in runs}

    assert labels(out) == labels(whole)
    rejudged = invoke("findings", out, "--rejudge")
    assert rejudged.exit_code == 0, rejudged.output
    assert rejudged.stdout.strip() == (out / "findings.md").read_text().strip()


def test_a_part_from_a_spec_of_its_slice_only_merges_too(
    parts: dict[str, Path], tmp_path: Path
) -> None:
    """A hand-written spec that lists only one level (and so names its own reference) holds the
    same runs: the same ids; merge sets `healthy` from the whole spec."""
    spec = two_level_spec()
    spec["workloads"][0]["knobs"]["lr"] = [0.02]
    del spec["workloads"][0]["reference"]
    path = tmp_path / "slice.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    audit = tmp_path / "audit_slice"
    assert invoke("audit", path, "--out", audit, "--no-report").exit_code == 0
    assert {i.healthy for i in RunStore(audit).infos() if i.perturbation.kind == "none"} == {True}
    out = tmp_path / "merged"
    result = invoke("merge", audit, parts["low"], "--spec", parts["spec"], "--out", out)
    assert result.exit_code == 0, result.output
    healthy = {(i.knobs["lr"], i.perturbation.kind) for i in RunStore(out).infos() if i.healthy}
    assert healthy == {(0.01, "none")}


def test_merge_refuses_what_would_mix_or_lose_runs(parts: dict[str, Path], tmp_path: Path) -> None:
    spec, out = parts["spec"], tmp_path / "merged"

    def error(*args: Any) -> str:
        result = invoke("merge", *args, "--spec", spec, "--out", out)
        assert result.exit_code != 0
        assert not out.exists()  # nothing half-written
        return " ".join(result.output.split())

    assert "6 of the 12 runs" in error(parts["high"])
    assert "given twice" in error(parts["high"], parts["high"])
    copy = shutil.copytree(parts["high"], tmp_path / "copy")
    assert "is in both" in error(parts["high"], copy)
    slim = tmp_path / "slim"
    assert invoke("export", parts["audit_low"], "--out", slim, "--partial").exit_code == 0
    assert "--refittable" in error(parts["high"], slim)
    other = tmp_path / "other.yaml"
    longer = two_level_spec()
    longer["workloads"][0]["total_steps"] = 80
    other.write_text(yaml.safe_dump(longer, sort_keys=False))
    result = invoke("merge", parts["high"], "--spec", other, "--out", out, "--partial")
    assert result.exit_code != 0 and "not a run of" in " ".join(result.output.split())
    assert not list(tmp_path.glob(".merged*"))
    # --partial merges what is there.
    result = invoke("merge", parts["high"], "--spec", spec, "--out", out, "--partial")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "version.json").read_text())["runs"] == {"done": 6, "pending": 6}


@pytest.mark.parametrize(
    ("only", "message"),
    [
        ("lr", "is not KEY=VALUE"),
        ("depth=3", "is none of the spec's keys"),
        ("lr=0.5", "no run of the spec has lr=0.5"),
    ],
)
def test_only_says_what_is_wrong(write_spec: Any, tmp_path: Path, only: str, message: str) -> None:
    spec = write_spec(two_level_spec())
    result = invoke("audit", spec, "--out", tmp_path / "a", "--only", only)
    assert result.exit_code != 0
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "a").exists()


def test_only_selects_by_seed_and_perturbation(write_spec: Any, tmp_path: Path) -> None:
    spec = write_spec(two_level_spec())
    result = invoke(
        "audit", spec, "--out", tmp_path / "a", "--dry-run",
        "--only", "seed=1", "--only", "seed=2", "--only", "perturbation=none",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "4 runs to do" in " ".join(result.output.split())
    # the estimate counts the slice's runs only: a third of the whole grid's time here
    from stabilitybench.audit.runner import plan_audit, print_plan

    def estimate(only: list[str]) -> str:
        out = io.StringIO()
        print_plan(plan_audit(spec, tmp_path / "b", dry_run=True, only=only), Console(file=out))
        return " ".join(out.getvalue().split()).split("runs to do ≈ ")[1].split(" with")[0]

    whole, part = estimate([]), estimate(["seed=1", "seed=2", "perturbation=none"])
    assert (whole, part) == ("6 s", "2 s")


def test_sigterm_raises_system_exit_inside_and_nothing_outside() -> None:
    import os
    import signal

    from stabilitybench.lifetime import exit_on_terminate

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as raised, exit_on_terminate():
        os.kill(os.getpid(), signal.SIGTERM)
    assert raised.value.code == 143
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_killed_export_leaves_no_half_written_folder(
    parts: dict[str, Path], tmp_path: Path
) -> None:
    """`kill PID` of an export (SIGTERM) removes its temporary folder on the way out."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "stabilitybench.cli", "export", str(parts["whole"])]
    process = subprocess.Popen([*command, "--out", str(out)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".killed.*")) and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    if process.poll() is not None:
        pytest.skip("the export ended before its temporary folder was seen")
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=60)
    assert not list(tmp_path.glob(".killed.*"))  # whenever the signal landed
    assert code in (0, 143)
    if out.exists():  # it landed as (or after) the finished folder was renamed into place
        assert (out / "findings.md").is_file() and (out / "version.json").is_file()
    else:
        assert code == 143


@pytest.mark.parametrize("where", ["_hosts", "write_run_data", "_replace"])
def test_a_signal_anywhere_after_the_mkdir_leaves_no_temporary_folder(
    parts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """SIGTERM is SystemExit(143) inside `export`; wherever it lands once the temporary folder
    exists (even before the first file is written), the folder goes with it."""
    import stabilitybench.findings.export as export
    import stabilitybench.findings.slim as slim

    def terminated(*args: Any, **kwargs: Any) -> None:
        raise SystemExit(143)

    monkeypatch.setattr(slim if where == "write_run_data" else export, where, terminated)
    with pytest.raises(SystemExit):
        export.export_results(RunStore(parts["whole"]), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
