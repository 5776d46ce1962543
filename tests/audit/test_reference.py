"""`reference:` per workload: the healthy knob levels, checked, and recorded as run.json `healthy`
and audit.json `references`."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from stabilitybench.audit.spec import expand, references, spec_hash, validate_spec
from stabilitybench.cli import app
from stabilitybench.store import RunStore

from .conftest import toy_spec

runner = CliRunner()


def swept(reference: dict[str, Any] | None = None, **knobs: Any) -> dict[str, Any]:
    spec = copy.deepcopy(toy_spec())
    spec["workloads"][0]["knobs"] = {"lr": [0.01, 0.05], "hidden": 16, **knobs}
    spec["workloads"][0]["total_steps"] = 20
    if reference is not None:
        spec["workloads"][0]["reference"] = reference
    return spec


BAD = [
    ("not a knob", {"momentum": 0.9}, ["workloads[0].reference.momentum", "not a knob", "lr"]),
    ("not swept", {"hidden": 16}, ["workloads[0].reference.hidden", "not swept", "16", "lr"]),
    ("not a swept value", {"lr": 0.5}, ["workloads[0].reference.lr", "0.5", "[0.01, 0.05]"]),
    ("not a mapping", [0.01], ["workloads[0].reference"]),
]


@pytest.mark.parametrize(("problem", "reference", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_reference_is_exit_2_naming_the_field_and_writes_nothing(
    problem: str, reference: Any, words: list[str], write_spec: Any, tmp_path: Path
) -> None:
    out = tmp_path / "audit"
    result = runner.invoke(app, ["audit", str(write_spec(swept(reference))), "--out", str(out)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert message.startswith("error:"), message
    for word in words:
        assert word in message, f"{problem}: {word!r} not in {message!r}"
    assert not out.exists()


def test_default_reference_is_the_first_value_of_each_swept_knob() -> None:
    spec = validate_spec(swept(dropout=[0.1, 0.0]))
    assert references(spec) == {"toy": {"lr": 0.01, "dropout": 0.1}}
    explicit = validate_spec(swept({"lr": 0.05}, dropout=[0.1, 0.0]))
    assert references(explicit) == {"toy": {"lr": 0.05, "dropout": 0.1}}


def test_reference_is_not_part_of_a_runs_identity() -> None:
    plain, explicit = validate_spec(swept()), validate_spec(swept({"lr": 0.01}))
    assert [r.run_id for r in expand(plain)] == [r.run_id for r in expand(explicit)]
    assert all("reference" not in r.workload for r in expand(explicit))
    assert spec_hash(plain) != spec_hash(explicit)  # a different healthy set: a different audit
    # a spec without `reference` hashes as before this field existed (old audits resume)
    assert spec_hash(validate_spec(toy_spec())) == spec_hash(
        validate_spec(copy.deepcopy(toy_spec()))
    )


def test_run_json_records_healthy_and_audit_json_the_references(
    write_spec: Any, tmp_path: Path
) -> None:
    out = tmp_path / "audit"
    spec = swept({"lr": 0.05})
    spec["seeds"] = [0]
    result = runner.invoke(app, ["audit", str(write_spec(spec)), "--out", str(out), "--no-report"])
    assert result.exit_code == 0, result.output
    store = RunStore(out)
    assert store.audit().references == {"toy": {"lr": 0.05}}
    healthy = {(i.knobs["lr"], i.perturbation.kind): i.healthy for i in store.infos()}
    assert healthy == {
        (0.05, "none"): True,
        (0.01, "none"): False,
        (0.05, "lr_spike"): False,
        (0.01, "lr_spike"): False,
    }
