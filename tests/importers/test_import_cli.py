"""`stabilitybench import` on the command line, bad input, and the other verbs on its output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter
from typer.testing import CliRunner

from stabilitybench.cli import app
from stabilitybench.store import RunStore

runner = CliRunner()


def write_runs(root: Path, n_runs: int = 3, steps: int = 120, diverge: int | None = 2) -> None:
    """`n_runs` SummaryWriter runs; run `diverge` blows up from step 90 on (NaN from 100)."""
    rng = np.random.default_rng(0)
    for r in range(n_runs):
        writer = SummaryWriter(str(root / f"run{r}"))
        for s in range(steps):
            loss = 2.0 * math.exp(-s / 40) + 0.5 + 0.02 * rng.standard_normal()
            grad = 1.0 + 0.05 * rng.standard_normal()
            if r == diverge and s >= 90:
                grad *= 1.2 ** (s - 90)
                loss = math.nan if s >= 100 else loss * 1.05 ** (s - 90)
            writer.add_scalar("train/loss", loss, s)
            writer.add_scalar("grad_norm", grad, s)
            writer.add_scalar("lr", 1e-3, s)
            if s % 20 == 0:
                writer.add_scalar("val_loss", loss + 0.1, s)
        writer.close()


def leftovers(folder: Path) -> list[str]:
    return sorted(
        p.name for p in folder.iterdir() if ".import-" in p.name or ".replaced-" in p.name
    )


def test_import_then_status_query_summary_monitor_fit_and_report(tmp_path: Path) -> None:
    write_runs(tmp_path / "logs")
    out = tmp_path / "audit"
    result = runner.invoke(
        app, ["import", str(tmp_path / "logs"), "--out", str(out), "--name", "mine"]
    )
    assert result.exit_code == 0, result.output
    assert "run2" in result.output and "100" in result.output  # the divergence step is shown
    assert "next: stabilitybench summary" in result.output

    status = runner.invoke(app, ["status", str(out)])
    assert status.exit_code == 0 and "done" in status.output and "3" in status.output

    query = runner.invoke(
        app,
        ["query", str(out), "SELECT kind, count(*) AS n FROM runs GROUP BY kind", "--json"],
    )
    assert json.loads(query.stdout) == [{"kind": "imported", "n": 3}]

    summary = runner.invoke(app, ["summary", str(out), "--json"])
    assert summary.exit_code == 0, summary.output
    runs = {r["label"]: r for r in json.loads(summary.stdout)["runs"]}
    assert runs["run2"]["collapsed"] is True and runs["run2"]["diverged"] is True
    assert runs["run0"]["collapsed"] is None  # no onset, no divergence: nothing to judge
    assert runs["run0"]["final_perf"] < 0

    from stabilitybench.evaluation.evaluate import fit_audit

    fit = fit_audit(RunStore.open(out), latent_dim=2, monitor_options={"max_epochs": 3})
    assert fit["workloads"]["mine"]["scored_runs"] == 3
    assert fit["workloads"]["mine"]["leave_one_seed_out"] == 3  # each run is its own seed
    store = RunStore.open(out)
    labels = {i.run_id: i.label for i in store.infos()}
    scores = store.query(
        "SELECT run_id, count(*) AS n, max(msd) AS top FROM scores GROUP BY run_id"
    )
    by_label = {labels[r]: (n, top) for r, n, top in scores.itertuples(index=False)}
    assert {k: v[0] for k, v in by_label.items()} == {"run0": 120, "run1": 120, "run2": 120}
    # the run that blew up deviates from the meta-state of the two healthy ones the most
    assert by_label["run2"][1] > max(by_label["run0"][1], by_label["run1"][1])

    # evaluation needs perturbed runs to judge warnings against: an imported audit has none,
    # and says so in one line (the per-detector scoring of imported runs is `monitor score`)
    evaluate = runner.invoke(app, ["monitor", "evaluate", str(out)])
    assert evaluate.exit_code == 2 and "imported runs only" in evaluate.output
    assert "monitor score" in evaluate.output and "lr_spike" not in evaluate.output

    report = runner.invoke(app, ["report", str(out)])
    assert report.exit_code == 0, report.output
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "mine" in page and "run2" in page


def test_source_that_does_not_exist_exits_2_with_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["import", str(tmp_path / "nope"), "--out", str(tmp_path / "a")])
    assert result.exit_code == 2
    assert (
        "no such file or folder" in result.output and len(result.output.strip().splitlines()) == 1
    )
    assert not (tmp_path / "a").exists()


def test_folder_without_logs_exits_2_auto_and_with_a_format(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no logs here", encoding="utf-8")
    auto = runner.invoke(app, ["import", str(tmp_path / "empty"), "--out", str(tmp_path / "a")])
    assert auto.exit_code == 2 and "holds no logs this import reads" in auto.output
    assert "tfevents" in auto.output and "meta.yaml" in auto.output
    given = runner.invoke(
        app,
        ["import", str(tmp_path / "empty"), "--out", str(tmp_path / "a"), "--format", "mlflow"],
    )
    assert given.exit_code == 2 and "holds no mlflow logs" in given.output
    tb = runner.invoke(
        app,
        [
            "import",
            str(tmp_path / "empty"),
            "--out",
            str(tmp_path / "a"),
            "--format",
            "tensorboard",
        ],
    )
    assert tb.exit_code == 2 and "holds no tensorboard logs" in tb.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_event_files_with_nothing_readable_exit_2_and_leave_nothing(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "events.out.tfevents.123.host").write_bytes(b"\x00garbage" * 10)
    result = runner.invoke(app, ["import", str(tmp_path / "logs"), "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "no scalar values in any run" in result.output
    assert not (tmp_path / "a").exists() and leftovers(tmp_path) == []


def test_truncated_event_file_imports_and_prints_what_was_skipped(tmp_path: Path) -> None:
    write_runs(tmp_path / "logs", n_runs=1, diverge=None)
    (path,) = (tmp_path / "logs" / "run0").glob("*tfevents*")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 7])
    result = runner.invoke(app, ["import", str(tmp_path / "logs"), "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output and "truncated or corrupt record" in result.output


def test_map_target_that_is_not_a_column_exits_2_before_reading(tmp_path: Path) -> None:
    write_runs(tmp_path / "logs", n_runs=1)
    result = runner.invoke(
        app,
        ["import", str(tmp_path / "logs"), "--out", str(tmp_path / "a"), "--map", "lr=learning"],
    )
    assert result.exit_code == 2
    assert "'learning' is not a column name; allowed: loss" in result.output
    assert not (tmp_path / "a").exists()


def test_out_holding_a_different_audit_exits_2_and_is_left_as_it_was(tmp_path: Path) -> None:
    write_runs(tmp_path / "logs", n_runs=1)
    write_runs(tmp_path / "other", n_runs=1)
    out = tmp_path / "a"
    assert runner.invoke(app, ["import", str(tmp_path / "other"), "--out", str(out)]).exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = runner.invoke(app, ["import", str(tmp_path / "logs"), "--out", str(out)])
    assert result.exit_code == 2 and "already holds a different audit ('other')" in result.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert leftovers(tmp_path) == []


def test_out_that_is_a_non_audit_folder_or_a_file_exits_2(tmp_path: Path) -> None:
    write_runs(tmp_path / "logs", n_runs=1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine", encoding="utf-8")
    busy = runner.invoke(app, ["import", str(tmp_path / "logs"), "--out", str(tmp_path / "busy")])
    assert busy.exit_code == 2 and "not a StabilityBench audit" in busy.output
    (tmp_path / "file").write_text("x", encoding="utf-8")
    file = runner.invoke(app, ["import", str(tmp_path / "logs"), "--out", str(tmp_path / "file")])
    assert file.exit_code == 2 and "is a file" in file.output
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["keep.txt"]
