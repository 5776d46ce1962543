"""A findings folder keeps slim per-run data (its floats rounded to 9 significant bits): re-judged
by `findings --rejudge` and re-exported without its audit folder, without refitting or
retraining, to the same numbers as its documents."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from stabilitybench.analysis import analyse
from stabilitybench.cli import app
from stabilitybench.evaluation.fitting import complete_scores
from stabilitybench.findings.slim import (
    exact_columns,
    kept_score_columns,
    kept_telemetry_columns,
    rounded,
)
from stabilitybench.store import RunStore

from .conftest import toy_spec

runner = CliRunner()
DOCUMENTS = ("summary.json", "evaluation.json", "findings.json")
MAX_BYTES_PER_RUN = 40_000  # a 60-step toy run keeps ~25 kB (Parquet's fixed cost dominates)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished 6-run toy audit and its findings folder."""
    root = tmp_path_factory.mktemp("rejudge")
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump(toy_spec(seeds=[0, 1, 2]), sort_keys=False))
    audit, results = root / "audit", root / "results" / "toy"
    done = runner.invoke(app, ["audit", str(spec), "--out", str(audit), "--no-report"])
    assert done.exit_code == 0, done.output
    done = runner.invoke(app, ["export", str(audit), "--out", str(results)])
    assert done.exit_code == 0, done.output
    return audit, results


@pytest.fixture(scope="module")
def original_tables(exported: tuple[Path, Path]) -> dict[str, dict[str, pd.DataFrame]]:
    """Each run's scores and telemetry as the audit stored them."""
    store = RunStore.open(exported[0])
    return {
        run_id: {
            "scores": pd.read_parquet(store.run_dir(run_id) / "scores.parquet"),
            "telemetry": store.table(run_id, "telemetry"),
        }
        for run_id in store.run_ids()
    }


@pytest.fixture(scope="module")
def results_alone(
    exported: tuple[Path, Path], original_tables: dict[str, dict[str, pd.DataFrame]]
) -> Path:
    """The findings folder, its audit folder deleted."""
    audit, results = exported
    shutil.rmtree(audit)
    return results


def _documents(folder: Path) -> dict[str, Any]:
    found = {name: json.loads((folder / name).read_text()) for name in DOCUMENTS}
    found["summary.json"]["audit"].pop("path")  # where the analysis read the runs from
    return found


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture
def no_refit(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a findings folder was refitted")

    monkeypatch.setattr("stabilitybench.evaluation.fitting.fit_audit", refuse)


def test_the_folder_keeps_each_runs_scores_and_the_telemetry_the_analysis_reads(
    exported: tuple[Path, Path], original_tables: dict[str, dict[str, pd.DataFrame]]
) -> None:
    results = exported[1]
    store = RunStore.open(results)
    assert store.run_ids() == sorted(original_tables)
    assert (results / "monitor" / "fit.json").is_file()
    for run_id, tables in original_tables.items():
        # The fitted detectors' scores are kept rounded; the others are scored again from the
        # kept telemetry (rounded too), to nearly the same values (a diverged step's +inf
        # included).
        run = store.load(run_id)
        assert run.scores is not None
        original = tables["scores"]
        assert list(run.scores.columns) == kept_score_columns(list(original.columns))
        assert {"msd", "msd_native"} <= set(run.scores.columns)
        assert not {"auto", "zclip_native", "clock"} & set(run.scores.columns)
        pd.testing.assert_frame_equal(run.scores, _rounded(original[list(run.scores.columns)]))
        completed = complete_scores(run, run.scores)[list(original.columns)]
        pd.testing.assert_frame_equal(completed, original, rtol=0.02, atol=0.05)
        kept = kept_telemetry_columns(list(tables["telemetry"].columns))
        assert {"step", "loss", "grad_norm", "param_norm"} <= set(kept) and "lr" not in kept
        telemetry = store.table(run_id, "telemetry")
        pd.testing.assert_frame_equal(telemetry, _rounded(tables["telemetry"][kept]))
        assert telemetry["loss"].equals(tables["telemetry"]["loss"])  # the labels' signal: exact
    per_run = sum(f.stat().st_size for f in (results / "runs").rglob("*") if f.is_file())
    assert per_run / len(original_tables) < MAX_BYTES_PER_RUN


def _rounded(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` as a findings folder keeps it: float columns but `exact_columns` rounded."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == np.float64 and column.rpartition("/")[2] not in exact_columns():
            out[column] = rounded(out[column].to_numpy())
    return out


def test_rounding_keeps_nine_bits_of_precision_and_is_idempotent() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [rng.standard_normal(10_000) * 10.0 ** rng.integers(-30, 30, 10_000), [0.0, -0.0]]
    )
    kept = rounded(values)
    assert np.all(np.abs(kept - values) <= np.abs(values) * 2.0**-9)
    assert np.array_equal(rounded(kept), kept)
    assert np.array_equal(np.signbit(kept), np.signbit(values))
    special = rounded(np.array([np.nan, np.inf, -np.inf, 1e300, -1e300, 3.4028235e38]))
    assert np.isnan(special[0]) and list(special[1:]) == [np.inf, -np.inf, np.inf, -np.inf, np.inf]


def test_kept_telemetry_columns() -> None:
    columns = ["step", "env_step", "loss", "param_norm", "lr", "ent_coef", "grad_cos_prev"]
    columns += ["nonfinite_grads", "attn_logit_max", "attn_logit_max/0"]
    columns += ["actor/grad_norm", "a/b/grad_norm", "actor/param_norm", "episode_return"]
    assert kept_telemetry_columns(columns) == [
        "step",
        "env_step",
        "loss",
        "param_norm",
        "ent_coef",
        "grad_cos_prev",
        "nonfinite_grads",
        "attn_logit_max",
        "actor/grad_norm",
        "actor/param_norm",
        "episode_return",
    ]


def test_findings_are_rejudged_from_the_folder_alone(
    results_alone: Path, tmp_path: Path, no_refit: None
) -> None:
    results = shutil.copytree(results_alone, tmp_path / "toy")
    before = _files(results)
    shown = runner.invoke(app, ["findings", str(results), "--rejudge", "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout) == json.loads((results / "findings.json").read_text())
    shown = runner.invoke(app, ["findings", str(results), "--rejudge"])
    assert shown.stdout == (results / "findings.md").read_text()
    assert _files(results) == before  # re-judging reads the folder, never writes it
    # Re-exported elsewhere and onto itself: the same documents, nothing left beside it.
    again = tmp_path / "again"
    done = runner.invoke(app, ["export", str(results), "--out", str(again)])
    assert done.exit_code == 0, done.output
    assert _documents(again) == _documents(results)
    assert json.loads((again / "version.json").read_text())["rejudged"] is True
    done = runner.invoke(app, ["export", str(results), "--out", str(results)])
    assert done.exit_code == 0, done.output
    assert _documents(results) == _documents(again)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "toy"]
    # New warning settings re-judge the saved scores (no refit).
    done = runner.invoke(app, ["export", str(results), "--out", str(again), "--horizon", "7"])
    assert done.exit_code == 0, done.output
    evaluation = json.loads((again / "evaluation.json").read_text())
    assert {w["horizon"] for w in evaluation["workloads"].values()} == {7}


def test_analyse_does_not_refit_a_findings_folder(
    results_alone: Path, tmp_path: Path, no_refit: None
) -> None:
    results = shutil.copytree(results_alone, tmp_path / "toy")
    analysis = analyse(RunStore.open(results), evaluation="fit")
    assert analysis.evaluation is not None and analysis.claims.audit == "toy-test"


def test_nothing_is_fitted_or_scored_on_a_findings_folder(
    results_alone: Path, tmp_path: Path
) -> None:
    results = shutil.copytree(results_alone, tmp_path / "toy")
    before = _files(results)
    for args in (["monitor", "fit", str(results)], ["monitor", "score", str(results)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "is a findings folder" in " ".join(result.output.split())
    assert _files(results) == before


def test_an_older_findings_folder_cannot_be_rejudged(results_alone: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    for name in ("summary.json", "findings.md", "findings.json"):
        shutil.copyfile(results_alone / name, old / name)
    shown = runner.invoke(app, ["findings", str(old)])
    assert shown.exit_code == 0 and shown.stdout == (old / "findings.md").read_text()
    for args in (["findings", str(old), "--rejudge"], ["export", str(old), "--out", str(tmp_path)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "without per-run data" in " ".join(result.output.split())
