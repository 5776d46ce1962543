"""`stabilitybench export`: the findings folder a reader opens without rerunning (issue 16)."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from stabilitybench.audit.spec import load_spec
from stabilitybench.cli import app
from stabilitybench.evaluation.fitting import needs_fit, unscored_runs
from stabilitybench.store import RunStore

from .conftest import toy_spec

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump(toy_spec(seeds=[0, 1, 2]), sort_keys=False))
    out = root / "audit"
    result = runner.invoke(app, ["audit", str(spec), "--out", str(out), "--no-report"])
    assert result.exit_code == 0, result.output
    return out


def test_export_writes_the_findings_folder(finished: Path, tmp_path: Path) -> None:
    out = tmp_path / "results" / "toy"
    result = runner.invoke(app, ["export", str(finished), "--out", str(out)])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "audit.json",
        "evaluation.json",
        "figures",
        "findings.json",
        "findings.md",
        "monitor",
        "report.html",
        "runs",
        "spec.yaml",
        "summary.json",
        "version.json",
    ]
    summary = json.loads((out / "summary.json").read_text())
    printed = runner.invoke(app, ["summary", str(finished), "--json"])
    assert summary == json.loads(printed.stdout)  # the same document `summary --json` prints
    # The evaluation judges the folder's data (its floats rounded: `findings.slim`), as
    # `monitor evaluate` of the folder does; the claims agree with the audit's own.
    evaluation = json.loads((out / "evaluation.json").read_text())
    judged = shutil.copytree(out, tmp_path / "copy")
    printed = runner.invoke(app, ["monitor", "evaluate", str(judged), "--json"])
    assert printed.exit_code == 0, printed.output
    assert evaluation == json.loads(printed.stdout)
    assert yaml.safe_load((out / "spec.yaml").read_text())["name"] == "toy-test"
    version = json.loads((out / "version.json").read_text())
    assert version["runs"] == {"done": 6} and "stabilitybench" in version["versions"]
    assert version["rejudged"] is False
    # Every run recorded the machine it trained on; here all six trained on this one.
    from stabilitybench.host import MACHINE_KEYS, host_info

    (host,) = version["hosts"]
    assert host["runs"] == 6 and {k: host[k] for k in MACHINE_KEYS} == {
        k: host_info().get(k) for k in MACHINE_KEYS
    }
    assert any((out / "figures").glob("*.png"))
    html = (out / "report.html").read_text()
    for png in (out / "figures").glob("*.png"):  # the report's own images, not re-rendered
        assert base64.b64encode(png.read_bytes()).decode("ascii") in html
    assert "<html" in html and 'src="http' not in html  # self-contained
    # It names the audit folder the runs came from, not the temporary folder it was built in.
    assert f"<td>{finished}</td>" in html and ".tmp" not in html
    # The claims: `findings` prints findings.md, from the folder or from the audit itself.
    text = (out / "findings.md").read_text()
    assert text.startswith("## Findings: toy-test") and "### Claim 3" in text
    shown = runner.invoke(app, ["findings", str(out)])
    assert shown.exit_code == 0 and shown.stdout == text
    # The audit judged at full precision comes to the same claims (export writes nothing into
    # the audit but the fitted scores).
    assert not (finished / "monitor" / "evaluation.json").exists()
    assert runner.invoke(app, ["monitor", "evaluate", str(finished)]).exit_code == 0
    assert runner.invoke(app, ["findings", str(finished)]).stdout == text
    claims = json.loads(runner.invoke(app, ["findings", str(out), "--json"]).stdout)
    assert claims == json.loads((out / "findings.json").read_text())
    assert claims["audit"] == "toy-test" and set(claims["rules"]) == {"1", "2", "3"}
    # Exporting again replaces the folder, and leaves no temporary folder behind.
    again = runner.invoke(app, ["export", str(finished), "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["toy"]


def _expect_error(args: list[str], text: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert text in " ".join(result.output.split())


def test_findings_of_a_folder_that_is_neither_is_refused(tmp_path: Path) -> None:
    _expect_error(["findings", str(tmp_path)], "is not a StabilityBench audit")
    (tmp_path / "summary.json").write_text("{}")
    _expect_error(["findings", str(tmp_path)], "export the audit again")


def test_unfinished_audit_is_refused_unless_partial(finished: Path, tmp_path: Path) -> None:
    info_path = next((finished / "runs").glob("*/run.json"))
    original = info_path.read_text()
    info = json.loads(original)
    info["status"] = "pending"
    info_path.write_text(json.dumps(info))
    try:
        out = tmp_path / "res"
        _expect_error(["export", str(finished), "--out", str(out)], "1 pending")
        assert not out.exists() and list(tmp_path.iterdir()) == []
        partial = runner.invoke(app, ["export", str(finished), "--out", str(out), "--partial"])
        assert partial.exit_code == 0, partial.output
        # An unfinished run keeps its run.json only: the analysis reads no table of it.
        kept = out / "runs" / info_path.parent.name
        assert sorted(p.name for p in kept.iterdir()) == ["run.json"]
        assert json.loads((out / "version.json").read_text())["partial"] is True
    finally:
        info_path.write_text(original)


def test_an_audit_resumed_after_its_fit_is_fitted_again(finished: Path, tmp_path: Path) -> None:
    fitted = runner.invoke(app, ["monitor", "fit", str(finished)])
    assert fitted.exit_code == 0, fitted.output
    scores = sorted((finished / "runs").glob("*/scores.parquet"))
    assert len(scores) == 6 and not needs_fit(RunStore(finished))
    scores[-1].unlink()  # as if that run had finished after the fit (a resumed audit)
    assert unscored_runs(RunStore(finished)) == [scores[-1].parent.name]
    done = runner.invoke(app, ["export", str(finished), "--out", str(tmp_path / "res")])
    assert done.exit_code == 0, done.output
    assert scores[-1].is_file() and not needs_fit(RunStore(finished))
    assert (tmp_path / "res" / "runs" / scores[-1].parent.name / "scores.parquet").is_file()


def test_an_audit_without_perturbations_is_exported_with_claim_3_left_out(tmp_path: Path) -> None:
    # A sweep of recipes with no perturbation (paper_lm_intrinsic): the runs are judged, the
    # warning protocol has nothing to evaluate, and the findings say so.
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(toy_spec(perturbations=["none"]), sort_keys=False))
    audit, out = tmp_path / "audit", tmp_path / "res"
    assert (
        runner.invoke(app, ["audit", str(spec), "--out", str(audit), "--no-report"]).exit_code == 0
    )
    done = runner.invoke(app, ["export", str(audit), "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert json.loads((out / "evaluation.json").read_text()) is None
    text = runner.invoke(app, ["findings", str(out)]).stdout
    assert "claim 3 is not judged: the audit has no finished perturbed runs" in " ".join(
        text.split()
    )
    for folder in (out, audit):  # judged again: the same claims, not an error
        again = runner.invoke(app, ["findings", str(folder), "--rejudge"])
        assert again.exit_code == 0, again.output
        assert again.stdout == text
    explicit = runner.invoke(app, ["monitor", "evaluate", str(audit)])
    assert explicit.exit_code == 2  # asked for by name, it is an error


def test_an_audit_of_recipes_judges_claim_3_on_the_recipes_on_trial(tmp_path: Path) -> None:
    # No perturbation, but a recipe away from the reference and `collapse.onset`: the warning
    # protocol judges the recipe's runs against the healthy ones (here it does not learn by
    # the onset, so no collapse leaves room for a warning: inconclusive, not "not judged").
    workload = {
        "name": "toy",
        "kind": "toy",
        "total_steps": 60,
        "eval": {"every": 10, "batches": 1},
        "knobs": {"lr": [0.01, 0.3], "hidden": 16},
    }
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            toy_spec(
                seeds=3, workloads=[workload], perturbations=["none"], collapse={"onset": 0.3}
            ),
            sort_keys=False,
        )
    )
    audit = tmp_path / "audit"
    done = runner.invoke(app, ["audit", str(spec), "--out", str(audit)])
    assert done.exit_code == 0, done.output
    text = " ".join(runner.invoke(app, ["findings", str(audit)]).stdout.split())
    assert "claim 3 is not judged" not in text
    assert "| toy | 0 / 0 / 3 | – | **inconclusive**: 0 collapses left room" in text
    summary = json.loads(runner.invoke(app, ["summary", str(audit), "--json"]).stdout)
    trial = [r for r in summary["runs"] if r["knobs"]["lr"] == 0.3]
    assert len(trial) == 3 and all(r["intrinsic"] and r["onset_source"] == "spec" for r in trial)
    assert {r["onset_step"] for r in summary["runs"]} == {18}


def test_bad_destinations_are_refused(finished: Path, tmp_path: Path) -> None:
    _expect_error(["export", str(finished), "--out", str(finished / "x")], "inside the audit")
    _expect_error(["export", str(finished), "--out", str(finished)], "the audit folder itself")
    file = tmp_path / "file"
    file.write_text("x")
    _expect_error(["export", str(finished), "--out", str(file)], "is a file")
    _expect_error(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "r")], "nope")


@pytest.mark.parametrize("name", ["paper_rl", "paper_lm", "paper_lm_collapse"])
def test_paper_specs_are_valid(name: str) -> None:
    spec: Any = load_spec(EXAMPLES / f"{name}.yaml")
    assert spec.name == name
