"""`share_prefix: true`: RL runs that differ only in their perturbations train their common
prefix once and fork where they part; the runs are those a plain audit gives, value for value."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from stabilitybench.audit.backends import execute_shared
from stabilitybench.audit.runner import run_info, share_prefix_groups
from stabilitybench.audit.spec import AuditSpec, expand, spec_hash
from stabilitybench.cli import app
from stabilitybench.store import PREFIX_DIR, PREFIX_MEMBERS, RunStore
from stabilitybench.types import RunSpec
from stabilitybench.workloads.rl import shared_fork_step

TD3: dict[str, Any] = {
    "name": "td3-pendulum",
    "kind": "rl",
    "algo": "td3",
    "env": "Pendulum-v1",
    "total_steps": 600,
    "eval": {"every": 200, "episodes": 1},
    "knobs": {"batch_size": 32, "learning_starts": 100, "train_freq": 2},
}
PPO: dict[str, Any] = {
    "name": "ppo-cartpole",
    "kind": "rl",
    "algo": "ppo",
    "env": "CartPole-v1",
    "total_steps": 1024,
    "eval": {"every": 256, "episodes": 1},
    "knobs": {"n_steps": 128, "n_epochs": 2, "batch_size": 64},
}
PERTURBATIONS: list[Any] = [
    "none",
    {"kind": "sham", "at": 0.5},
    {"kind": "lr_spike", "at": 0.5, "factor": 10, "duration": 5},
    {"kind": "lr_spike", "at": 0.6, "factor": 30, "duration": 40, "ramp": "geometric"},
    {"kind": "obs_noise", "at": 0.5, "sigma": 0.5, "duration": 40},  # acts on the env
]


def _spec(workload: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": "shared",
        "seeds": 1,
        "workloads": [workload],
        "perturbations": PERTURBATIONS,
        **extra,
    }


def _audit(tmp_path: Path, spec: dict[str, Any], name: str) -> RunStore:
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(spec))
    out = tmp_path / name
    result = CliRunner().invoke(
        app, ["audit", str(path), "--out", str(out), "--no-report", "--workers", "1"]
    )
    assert result.exit_code == 0, result.output
    return RunStore(out)


@pytest.mark.parametrize("workload", [TD3, PPO], ids=["td3", "ppo"])
def test_shared_prefix_gives_the_runs_a_plain_audit_gives(
    tmp_path: Path, workload: dict[str, Any]
) -> None:
    plain = _audit(tmp_path, _spec(workload), "plain")
    shared = _audit(tmp_path, _spec(workload, share_prefix=True), "shared")
    assert plain.audit().spec_hash == shared.audit().spec_hash  # execution only
    assert plain.run_ids() == shared.run_ids() and len(plain.run_ids()) == len(PERTURBATIONS)
    assert not (shared.root / PREFIX_DIR).exists()
    # the prefix's list of its runs (for `watch`) stays with the prefix
    assert not list(shared.root.glob(f"runs/*/{PREFIX_MEMBERS}"))
    fork_steps = set()
    for run_id in plain.run_ids():
        a, b = plain.load(run_id), shared.load(run_id)
        info_a, info_b = plain.info(run_id), shared.info(run_id)
        assert info_b.status == "done" and info_a.outcome == info_b.outcome
        assert info_a.shared_prefix is None
        assert info_b.shared_prefix is not None and run_id in info_b.shared_prefix["runs"]
        fork_steps.add(info_b.shared_prefix["env_step"])
        # every value of every table is the same; a run without perturbations gains only the
        # `perturbed` flag (all false) of the schedule it carried
        extra = set(b.telemetry.columns) - set(a.telemetry.columns)
        assert extra == (set() if info_a.perturbation.kind != "none" else {"perturbed"})
        assert not b.telemetry["perturbed"].any() if extra else True
        pd.testing.assert_frame_equal(a.telemetry, b.telemetry[list(a.telemetry.columns)])
        pd.testing.assert_frame_equal(a.evals, b.evals)
        pd.testing.assert_frame_equal(a.events, b.events)
    # one env step before the first onset (at 0.5 of the budget)
    assert fork_steps == {workload["total_steps"] // 2 - 1}


def _runs(**changes: Any) -> list[RunSpec]:
    spec = AuditSpec.model_validate({**_spec(TD3), "seeds": 2, **changes})
    return expand(spec)


def test_groups_are_runs_of_one_workload_and_seed() -> None:
    runs = _runs()
    groups = share_prefix_groups(runs)
    assert sorted(len(g) for g in groups) == [5, 5]
    for group in groups:
        assert {r.seed for r in group} == {group[0].seed}
    assert shared_fork_step(groups[0]) == 299


def test_runs_that_cannot_share_run_alone() -> None:
    # an onset given as an optimizer step, not a fraction of the env steps
    at_step = _runs(perturbations=["none", {"kind": "lr_spike", "at": 100, "factor": 10}])
    assert [len(g) for g in share_prefix_groups(at_step)] == [1, 1, 1, 1]
    # a guard acts on the prefix
    guarded = _runs(guards=[{"detector": "zclip", "action": "skip"}])
    assert [len(g) for g in share_prefix_groups(guarded)] == [1] * 10
    # different knobs (different workload configs) never share
    levels = copy.deepcopy(_spec(TD3))
    levels["workloads"][0]["knobs"]["action_noise"] = [0.1, 0.3]
    runs = expand(AuditSpec.model_validate(levels))
    assert sorted(len(g) for g in share_prefix_groups(runs)) == [5, 5]
    assert shared_fork_step(runs[:1]) is None


def test_share_prefix_is_not_part_of_the_hash() -> None:
    spec = AuditSpec.model_validate(_spec(TD3))
    shared = AuditSpec.model_validate(_spec(TD3, share_prefix=True))
    assert spec_hash(spec) == spec_hash(shared)


def _members(tmp_path: Path, perturbations: list[Any]) -> tuple[Path, list[tuple[dict, dict]]]:
    spec = AuditSpec.model_validate({**_spec(TD3), "perturbations": perturbations})
    runs = expand(spec)
    root = tmp_path / "audit"
    (root / "runs").mkdir(parents=True)
    return root, [(r.to_dict(), run_info(r).document()) for r in runs]


@pytest.fixture
def threads() -> Any:
    """execute_shared sets torch to one thread in the process that calls it: put it back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_failing_branch_fails_its_run_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: Any
) -> None:
    from stabilitybench.perturbations.optimization import LrSpike

    def broken(self: Any, ctx: Any) -> None:
        raise RuntimeError("this perturbation is broken")

    monkeypatch.setattr(LrSpike, "apply", broken)  # the forked child inherits it
    root, members = _members(tmp_path, PERTURBATIONS[:3])
    results = {r.run_id: r for r in execute_shared(str(root), members)}
    store = RunStore(root)
    statuses = {store.info(r).perturbation.kind: results[r].status for r in results}
    assert statuses == {"none": "done", "sham": "done", "lr_spike": "failed"}
    failed = next(r for r in results.values() if r.status == "failed")
    assert "this perturbation is broken" in (failed.error or "")
    assert not (root / PREFIX_DIR).exists()


def test_a_failing_prefix_fails_every_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: Any
) -> None:
    import stabilitybench.workloads.rl as rl

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no model today")

    monkeypatch.setattr(rl, "build_model", broken)
    root, members = _members(tmp_path, PERTURBATIONS[:3])
    results = execute_shared(str(root), members)
    assert [r.status for r in results] == ["failed"] * 3
    assert all("no model today" in (r.error or "") for r in results)
    assert not (root / PREFIX_DIR).exists()


def test_dry_run_counts_each_prefix_once(tmp_path: Path) -> None:
    def estimate(spec: dict[str, Any]) -> str:
        path = tmp_path / "spec.yaml"
        path.write_text(json.dumps(spec))
        args = ["audit", str(path), "--out", str(tmp_path / "out"), "--dry-run"]
        result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
        assert result.exit_code == 0, result.output
        return next(line for line in result.output.splitlines() if "estimated cost" in line)

    plain, shared = estimate(_spec(TD3)), estimate(_spec(TD3, share_prefix=True))
    assert "share_prefix saves" not in plain
    assert "share_prefix saves" in shared
    assert not (tmp_path / "out").exists()
