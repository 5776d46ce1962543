"""Input that cannot hurt: encodings, names as free-text labels, eval cadence (issue 15)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from stabilitybench.audit.spec import MAX_LABEL_CHARS, validate_spec
from stabilitybench.cli import app

from .conftest import toy_spec

runner = CliRunner()
NASTY = "tiny <script>alert(1)</script> [red]mix[/red] 'q' \"dq\" é ☃ $x$ ../.."
WORKLOAD = "toy [bold]w[/bold] / <b>"
LABEL = "spike <i>[red]!</i>"


def _one_line(output: str) -> str:
    return " ".join(output.split())


def _refused(spec_path: Path, out: Path, *words: str) -> str:
    """Run `audit`; it must exit 2 with one `error:` line holding `words`, and write nothing."""
    result = runner.invoke(app, ["audit", str(spec_path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    message = _one_line(result.output)
    assert message.startswith("error:") and "Traceback" not in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert not out.exists()
    return message


def test_a_spec_that_is_not_utf8_is_one_clear_error(tmp_path: Path) -> None:
    spec = tmp_path / "latin1.yaml"
    text = yaml.safe_dump(toy_spec(name="café"), sort_keys=False, allow_unicode=True)
    spec.write_bytes(text.encode("latin-1"))
    line = text.splitlines().index("name: café") + 1
    _refused(
        spec,
        tmp_path / "a",
        str(spec),
        "not UTF-8",
        "0xe9",
        f"line {line}",
        "save the spec as UTF-8",
    )


BAD_NAMES = [
    # (where, spec, words)
    ("audit name: a bell", toy_spec(name="tiny\x07mix"), ["name:", "U+0007", "position 4"]),
    ("audit name: a newline", toy_spec(name="two\nlines"), ["name:", "U+000A"]),
    ("audit name: a bidi override", toy_spec(name="abc\u202edef"), ["name:", "U+202E"]),
    ("audit name: only spaces", toy_spec(name="   "), ["name:", "empty"]),
    (
        "audit name: too long",
        toy_spec(name="x" * (MAX_LABEL_CHARS + 1)),
        ["name:", "201 characters", "at most 200"],
    ),
]


def _workload_named(name: str) -> dict[str, Any]:
    spec = toy_spec()
    spec["workloads"][0]["name"] = name
    return spec


def _label(label: Any) -> dict[str, Any]:
    spec = toy_spec()
    spec["perturbations"][1]["label"] = label
    return spec


BAD_NAMES += [
    ("workload name: an escape", _workload_named("toy\x1b[31m"), ["workloads[0].name", "U+001B"]),
    (
        "workload name: too long",
        _workload_named("w" * 250),
        ["workloads[0].name", "250 characters"],
    ),
    ("perturbation label: a tab", _label("a\tb"), ["perturbations[1].label", "U+0009"]),
    ("perturbation label: too long", _label("l" * 201), ["perturbations[1].label", "at most 200"]),
    ("perturbation label: not text", _label(3), ["perturbations[1].label", "must be text"]),
]


@pytest.mark.parametrize(("problem", "spec", "words"), BAD_NAMES, ids=[b[0] for b in BAD_NAMES])
def test_control_characters_and_overlong_names_are_refused(
    problem: str, spec: dict[str, Any], words: list[str], write_spec: Any, tmp_path: Path
) -> None:
    _refused(write_spec(spec), tmp_path / "audit", *words)


def test_a_name_of_exactly_200_characters_is_accepted() -> None:
    assert validate_spec(toy_spec(name="é" * MAX_LABEL_CHARS)).name == "é" * MAX_LABEL_CHARS


def test_eval_every_beyond_total_steps_is_refused(write_spec: Any, tmp_path: Path) -> None:
    spec = toy_spec()
    spec["workloads"][0]["eval"]["every"] = 61  # total_steps is 60
    _refused(
        write_spec(spec),
        tmp_path / "a",
        "workloads[0].eval.every: 61 is larger than total_steps (60)",
        "'toy'",
        "at most 60",
    )
    top = toy_spec(eval={"every": 100})
    del top["workloads"][0]["eval"]
    _refused(write_spec(top, "top.yaml"), tmp_path / "b", "eval.every: 100", "total_steps (60)")
    # equal is fine: an evaluation at the start and one at the end
    spec["workloads"][0]["eval"]["every"] = 60
    validate_spec(spec)


HEX_ID = re.compile(r"^[0-9a-f]{16}$")
AUDIT_FILES = {"audit.json", "audit.lock", "runs", "report.html"}
RUN_FILES = {"run.json", "telemetry.parquet", "evals.parquet", "events.parquet"}


def test_names_are_labels_shown_escaped_everywhere_and_never_paths(
    write_spec: Any, tmp_path: Path
) -> None:
    spec = toy_spec(name=NASTY, seeds=[0])
    spec["workloads"][0].update(name=WORKLOAD, total_steps=30)
    spec["perturbations"][1].update(label=LABEL, at=0.5)
    out = tmp_path / "audit"
    result = runner.invoke(
        app, ["audit", str(write_spec(spec)), "--out", str(out), "--no-report", "--workers", "1"]
    )
    assert result.exit_code == 0, result.output

    # terminal: rich markup in a name is text, not style
    status = runner.invoke(app, ["status", str(out)])
    assert status.exit_code == 0 and "[red]mix[/red]" in _one_line(status.output), status.output
    query = runner.invoke(app, ["query", str(out), "SELECT DISTINCT workload FROM runs"])
    assert query.exit_code == 0 and "[bold]w[/bold]" in query.output, query.output
    plan = runner.invoke(app, ["audit", str(write_spec(spec)), "--out", str(out), "--dry-run"])
    assert "[bold]" in plan.output and "[red]mix[/red]" in _one_line(plan.output)  # cells fold

    # JSON: the exact strings, round-tripped
    audit = json.loads((out / "audit.json").read_text(encoding="utf-8"))
    assert audit["name"] == NASTY and audit["spec"]["workloads"][0]["name"] == WORKLOAD
    summary = runner.invoke(app, ["summary", str(out), "--json"])
    assert summary.exit_code == 0, summary.output
    assert json.loads(summary.output)["audit"]["name"] == NASTY

    # HTML: escaped text, no live markup
    report = runner.invoke(app, ["report", str(out), "--figures", str(tmp_path / "figs")])
    assert report.exit_code == 0, report.output
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<script>alert(1)</script>" not in page and "/ <b>" not in page and "<i>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "/ &lt;b&gt;" in page

    # the filesystem: fixed names and hashes only (run ids hash the run's spec)
    for path in out.rglob("*"):
        rel = path.relative_to(out).parts
        assert rel[0] in AUDIT_FILES, rel
        if len(rel) >= 2:
            assert HEX_ID.match(rel[1]), rel
        if len(rel) == 3:
            assert rel[2] in RUN_FILES, rel
    for figure in (tmp_path / "figs").iterdir():  # report figures: [a-z0-9-] slugs at most
        assert re.fullmatch(r"[a-z0-9_\-]+\.png", figure.name), figure.name


def test_the_monitor_folder_of_a_workload_is_a_hash_of_its_name() -> None:
    from stabilitybench.evaluation.fitting import safe_name as _safe_name

    assert re.fullmatch(r"workload-[0-9a-f]{12}", _safe_name(".."))
    assert _safe_name("a/b") != _safe_name("a_b")
