"""Audit specs: validation messages, exit code 2 and nothing written; stable expansion."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from stabilitybench.audit.spec import (
    expand,
    load_spec,
    resolved_workloads,
    spec_hash,
    validate_spec,
)
from stabilitybench.cli import app

from .conftest import toy_spec

runner = CliRunner()


def _with(path: str, value: Any) -> dict[str, Any]:
    """The toy spec with one field (dotted path, ints index lists) set to `value`."""
    spec = copy.deepcopy(toy_spec())
    keys: list[Any] = [int(k) if k.isdigit() else k for k in path.split(".")]
    target: Any = spec
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    return spec


BAD_SPECS = [
    # (what is wrong, spec or YAML text, words the message must contain)
    ("malformed YAML", "name: x\nworkloads: [\n  - {kind: toy\n", ["malformed YAML", "line"]),
    ("unknown top-level key", toy_spec(sedes=[0]), ["sedes", "unknown key"]),
    (
        "unknown workload key",
        _with("workloads.0.epochs", 3),
        ["workloads[0].epochs", "unknown key"],
    ),
    (
        "wrong type",
        _with("workloads.0.total_steps", "many"),
        ["workloads[0].total_steps", "integer"],
    ),
    (
        "unknown workload kind",
        _with("workloads.0.kind", "cnn"),
        ["workloads[0].kind", "cnn", "toy"],
    ),
    (
        "unknown perturbation",
        _with("perturbations.1", {"kind": "lr_spikes", "at": 0.5}),
        ["perturbations[1]", "lr_spikes", "lr_spike"],
    ),
    (
        "perturbation the workload cannot host",
        _with("perturbations.1", {"kind": "reward_noise", "at": 0.5, "sigma": 1.0}),
        ["workloads[0]", "reward_noise", "env"],
    ),
    ("knob out of range", _with("workloads.0.knobs.lr", [0.01, -1.0]), ["knobs.lr", "-1.0"]),
    ("unknown knob", _with("workloads.0.knobs.ent_coef", 0.1), ["knobs.ent_coef", "allowed"]),
    ("negative seed", toy_spec(seeds=[0, -1]), ["seeds", ">= 0", "-1"]),
    ("collapse out of range", toy_spec(collapse={"threshold": 2.0}), ["collapse.threshold"]),
    (
        "collapse confirmation out of range",
        toy_spec(collapse={"confirm_evals": 0}),
        ["collapse.confirm_evals", "greater than or equal to 1"],
    ),
    (
        "collapse noise gate out of range",
        toy_spec(collapse={"learned_sigmas": -1}),
        ["collapse.learned_sigmas"],
    ),
    ("unknown collapse key", toy_spec(collapse={"sigmas": 3}), ["collapse.sigmas", "unknown key"]),
    (
        "a sham with a magnitude",
        _with("perturbations.1", {"kind": "sham", "at": 0.5, "factor": 10}),
        ["sham", "factor", "takes no magnitude"],
    ),
    ("warning horizon out of range", toy_spec(warning={"horizon": 0}), ["warning.horizon"]),
    ("warning sph below 0", toy_spec(warning={"sph": -1}), ["warning.sph", "greater than or"]),
    (
        "warning target at 0",
        toy_spec(warning={"target_false_alarms": 0}),
        ["warning.target_false_alarms", "greater than 0"],
    ),
    (
        "warning target a detector always in warning meets",
        toy_spec(warning={"horizon": 1000}),
        ["warning: target_false_alarms 1 per 1,000 steps with horizon 1000", "up to 100%"],
    ),
    (
        "workload's warning target a detector mostly in warning meets",
        _with("workloads.0.warning", {"horizon": 600}),
        ["workloads[0].warning", "up to 60%", "target_false_alarms 0.17 with horizon 600"],
    ),
    (
        "warning sph as long as the run",
        _with("workloads.0.warning", {"sph": 60}),
        ["workloads[0]", "warning.sph (60) must be less than total_steps (60)"],
    ),
    (
        "perturbation field out of range",
        _with("perturbations.1.at", 1.5),
        ["perturbations[1]", "at"],
    ),
    (
        "a workload's own unknown perturbation",
        _with("workloads.0.perturbations", ["none", {"kind": "lr_spikes", "at": 0.5}]),
        ["workloads[0].perturbations[1]", "lr_spikes"],
    ),
    (
        "a workload's own perturbations repeat",
        _with("workloads.0.perturbations", ["none", "none"]),
        ["workloads[0].perturbations[1]", "repeats workloads[0].perturbations[0]"],
    ),
    (
        "a workload's own empty perturbations",
        _with("workloads.0.perturbations", []),
        ["workloads[0].perturbations", "at least 1"],
    ),
    (
        "a workload's own unknown guard action",
        _with("workloads.0.guards", ["none", {"detector": "auto", "action": "pause"}]),
        ["workloads[0].guards[1].action", "pause"],
    ),
    (
        "a workload's own guard it cannot host",
        _with("workloads.0.guards", [{"detector": "auto", "action": "skip", "on_device": True}]),
        ["workloads[0].guards[0].on_device", "toy"],
    ),
]


@pytest.mark.parametrize(("problem", "spec", "words"), BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_bad_spec_is_one_clear_message_exit_2_and_writes_nothing(
    problem: str, spec: Any, words: list[str], write_spec: Any, tmp_path: Path
) -> None:
    out = tmp_path / "audit"
    result = runner.invoke(app, ["audit", str(write_spec(spec)), "--out", str(out)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert message.startswith("error:"), message
    for word in words:
        assert word in message, f"{problem}: {word!r} not in {message!r}"
    assert "Traceback" not in result.output
    assert not out.exists()


def test_out_folder_that_is_not_an_audit_is_refused_untouched(
    write_spec: Any, tmp_path: Path
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = runner.invoke(app, ["audit", str(write_spec(toy_spec())), "--out", str(out)])
    assert result.exit_code == 2
    assert "not a StabilityBench audit" in " ".join(result.output.split())
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_bad_workers_is_refused(write_spec: Any, tmp_path: Path) -> None:
    out = tmp_path / "audit"
    result = runner.invoke(
        app, ["audit", str(write_spec(toy_spec())), "--out", str(out), "--workers", "0"]
    )
    assert result.exit_code == 2
    assert "--workers" in result.output
    assert not out.exists()


def test_expansion_is_stable_and_ids_follow_the_spec(write_spec: Any) -> None:
    spec = toy_spec(seeds=[0, 1, 2])
    spec["workloads"][0]["knobs"]["dropout"] = [0.0, 0.1]
    runs = expand(load_spec(write_spec(spec)))
    again = expand(load_spec(write_spec(copy.deepcopy(spec), name="again.yaml")))
    # 2 dropout levels × 2 perturbations × 3 seeds, all distinct, in the same order both times
    assert len(runs) == 12
    assert len({r.run_id for r in runs}) == 12
    assert [r.run_id for r in runs] == [r.run_id for r in again]
    assert [(r.workload["knobs"]["dropout"], r.perturbation_label, r.seed) for r in runs[:4]] == [
        (0.0, "none", 0),
        (0.0, "none", 1),
        (0.0, "none", 2),
        (0.0, "lr_spike(at=0.5,factor=50,duration=5)", 0),
    ]
    changed = copy.deepcopy(spec)
    changed["workloads"][0]["knobs"]["hidden"] = 32
    other = expand(validate_spec(changed))
    assert not {r.run_id for r in runs} & {r.run_id for r in other}
    # the audit's name is not part of a run's identity, but it is part of the spec's hash
    renamed = validate_spec({**copy.deepcopy(spec), "name": "other"})
    assert [r.run_id for r in expand(renamed)] == [r.run_id for r in runs]
    assert spec_hash(renamed) != spec_hash(validate_spec(spec))


def test_eval_defaults_and_multi_perturbation_runs() -> None:
    spec = toy_spec(eval={"every": 7, "batches": 3})
    spec["workloads"].append(
        {"name": "toy2", "kind": "toy", "total_steps": 20, "eval": {"every": 5}}
    )
    spec["perturbations"] = [
        "none",
        [{"kind": "lr_spike", "at": 5, "factor": 3}, {"kind": "grad_noise", "at": 8, "scale": 0.1}],
    ]
    spec["seeds"] = 2  # a count means seeds 0 and 1
    parsed = validate_spec(spec)
    workloads = resolved_workloads(parsed)
    assert workloads[0]["eval"] == {"every": 10, "batches": 1}  # its own settings win
    assert workloads[1]["eval"] == {"every": 5, "batches": 3}  # top-level fills the gap
    runs = expand(parsed)
    assert len(runs) == 2 * 2 * 2
    combined = [r for r in runs if len(r.perturbations) == 2]
    assert len(combined) == 4
    assert (
        combined[0].perturbation_label.startswith("lr_spike(")
        and "+grad_noise(" in combined[0].perturbation_label
    )


def test_a_workload_may_list_its_own_perturbations_and_guards() -> None:
    spec = toy_spec(seeds=[0])
    own = {"kind": "lr_spike", "at": 0.5, "factor": 50, "duration": 20, "ramp": "geometric"}
    guard = {"detector": "zclip", "action": "skip"}
    spec["workloads"].append(
        {
            **copy.deepcopy(spec["workloads"][0]),
            "name": "toy2",
            "perturbations": ["none", own],
            "guards": ["none", guard],
        }
    )
    parsed = validate_spec(spec)
    runs = expand(parsed)
    first = [(r.perturbation_label, r.guard) for r in runs if r.workload["name"] == "toy"]
    second = [(r.perturbation_label, r.guard) for r in runs if r.workload["name"] == "toy2"]
    assert first == [("none", None), ("lr_spike(at=0.5,factor=50,duration=5)", None)]
    assert [g for _, g in second] == [None, guard, None, guard]
    assert {p for p, _ in second} == {
        "none",
        "lr_spike(at=0.5,factor=50,duration=20,ramp=geometric)",
    }
    # where an axis was listed is not part of a run: its config and id are the same
    assert all("perturbations" not in r.workload and "guards" not in r.workload for r in runs)
    alone = toy_spec(seeds=[0], perturbations=["none", own], guards=["none", guard])
    alone["workloads"][0]["name"] = "toy2"
    assert {r.run_id for r in expand(validate_spec(alone))} == {
        r.run_id for r in runs if r.workload["name"] == "toy2"
    }
    # a spec that lists no axis on a workload hashes as before this field existed
    assert "perturbations" not in resolved_workloads(validate_spec(toy_spec()))[0]
    assert resolved_workloads(parsed)[1]["guards"] == ["none", guard]


def test_unreachable_ray_address_is_refused_before_writing(write_spec: Any, tmp_path: Path) -> None:
    out = tmp_path / "audit"
    args = ["audit", str(write_spec(toy_spec())), "--out", str(out), "--backend", "ray"]
    result = runner.invoke(app, [*args, "--ray-address", "127.0.0.1:1"])
    assert result.exit_code == 2
    assert "--ray-address: cannot reach 127.0.0.1:1" in " ".join(result.output.split())
    assert not out.exists()


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_shipped_examples_are_valid_audits(example: Path, tmp_path: Path) -> None:
    out = tmp_path / "audit"
    result = runner.invoke(app, ["audit", str(example), "--out", str(out), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "estimated cost" in result.output
    assert not out.exists()


def test_a_long_horizon_passes_with_a_target_each_workload_lowers() -> None:
    spec = toy_spec(warning={"horizon": 1000})
    spec["workloads"][0]["warning"] = {"target_false_alarms": 0.1}
    validated = validate_spec(spec)
    assert validated.warning is not None and validated.warning.horizon == 1000
