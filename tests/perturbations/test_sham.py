"""The sham: at its onset it re-seeds the run's randomness, and changes nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from pert_helpers import run_loop
from typer.testing import CliRunner

from stabilitybench.cli import app
from stabilitybench.errors import StabilityBenchError
from stabilitybench.perturbations import PerturbationSchedule, build


def _draws_after(perturbations: list[dict[str, object]] | None) -> list[list[float]]:
    """A loop whose every step draws from torch's global generator (as dropout would)."""
    draws: list[list[float]] = []
    torch.manual_seed(0)
    run_loop(
        perturbations, steps=10, on_step=lambda step, model: draws.append(torch.rand(2).tolist())
    )
    return draws


def test_a_sham_reseeds_at_its_onset_and_only_there() -> None:
    baseline = _draws_after(None)
    sham = _draws_after([{"kind": "sham", "at": 4}])
    again = _draws_after([{"kind": "sham", "at": 4}])
    assert sham[:4] == baseline[:4]  # identical until the onset
    assert sham[4:] != baseline[4:]  # other luck from the onset on
    assert sham == again  # the new seed is the run's own: reproducible


def test_a_sham_restarts_the_streams_a_workload_registered() -> None:
    schedule = PerturbationSchedule([{"kind": "sham", "at": 2}], total_steps=10, seed=3)
    seen: list[int] = []
    schedule.add_reseed(seen.append)
    schedule.add_reseed(seen.append)
    (sham,) = schedule.perturbations
    sham.apply(None)  # type: ignore[arg-type]
    assert len(seen) == 2 and seen[0] != seen[1]  # one derived seed per stream
    other = PerturbationSchedule([{"kind": "sham", "at": 2}], total_steps=10, seed=4)
    later: list[int] = []
    other.add_reseed(later.append)
    other.perturbations[0].apply(None)  # type: ignore[arg-type]
    assert later[0] != seen[0]  # another run seed, another restart


def test_a_sham_leaves_the_training_alone() -> None:
    # the same data and steps: a sham draws nothing from the streams the loop uses here
    plain, _, _ = run_loop(None, steps=8)
    shammed, _, _ = run_loop([{"kind": "sham", "at": 3}], steps=8)
    for a, b in zip(plain.parameters(), shammed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"kind": "sham", "at": 0.3, "scale": 1.0},
            "unknown field 'scale'; a sham changes nothing",
        ),
        ({"kind": "sham", "at": 0.3, "duration": 5}, "duration"),
    ],
)
def test_a_sham_takes_no_magnitude(config: dict[str, object], message: str) -> None:
    with pytest.raises(StabilityBenchError, match=message):
        build(config)


def test_a_sham_with_a_magnitude_in_a_spec_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    spec = {
        "name": "s",
        "workloads": [{"name": "toy", "kind": "toy", "total_steps": 20}],
        "perturbations": ["none", {"kind": "sham", "at": 0.3, "factor": 10}],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "audit"
    result = CliRunner().invoke(app, ["audit", str(path), "--out", str(out)])
    assert result.exit_code == 2
    assert "unknown field 'factor'; a sham changes nothing" in " ".join(result.output.split())
    assert "Traceback" not in result.output and not out.exists()


def test_a_sham_toy_run_parts_from_its_baseline_at_onset_without_harm(tmp_path: Path) -> None:
    spec = {
        "name": "sham-toy",
        "seeds": [0],
        "workloads": [{"name": "toy", "kind": "toy", "total_steps": 120, "eval": {"every": 20}}],
        "perturbations": ["none", {"kind": "sham", "at": 0.5}],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "audit"
    result = CliRunner().invoke(app, ["audit", str(path), "--out", str(out), "--no-report"])
    assert result.exit_code == 0, result.output
    from stabilitybench.store import RunStore

    store = RunStore.open(out)
    runs = {i.perturbation.kind: store.load(i.run_id) for i in store.infos()}
    base, sham = runs["none"].evals["perf"].tolist(), runs["sham"].evals["perf"].tolist()
    assert base[:4] == sham[:4]  # evaluations at 0, 20, 40, 60: before the onset (step 60)
    assert base[4:] != sham[4:]  # other data from the onset on
    assert abs(sham[-1] - base[-1]) < 0.5 * abs(base[0] - base[-1])  # no harm done
    (event,) = runs["sham"].events.to_dict("records")
    assert event["kind"] == "sham" and event["start_step"] == 60
