"""RunRecord: one reading of the store per run, with hand-worked onsets and collapse labels."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from stabilitybench.errors import StabilityBenchError
from stabilitybench.metrics.records import audit_records, collapse_config, perturbation_magnitude
from stabilitybench.settings import CollapseSettings
from stabilitybench.store import RunStore

EVAL_STEPS = [0, 10, 20, 30, 40, 50, 60, 70]


def _run(store: RunStore, run_id: str, seed: int, perf: list[float], factor: float | None) -> None:
    writer = store.writer(run_id)
    pert = {"kind": "none", "label": "none", "params": {}}
    if factor is not None:
        pert = {
            "kind": "lr_spike",
            "label": f"lr_spike(factor={factor})",
            "params": {"at": 25, "factor": factor},
        }
    writer.start(
        {
            "run_id": run_id,
            "workload": "w",
            "kind": "toy",
            "knobs": {},
            "seed": seed,
            "perturbation": pert,
        }
    )
    writer.write_table("evals", pd.DataFrame({"step": EVAL_STEPS, "perf": perf}))
    events = (
        []
        if factor is None
        else [{"kind": "lr_spike", "start_step": 25, "end_step": 29, "params": {}}]
    )
    writer.write_events(events)
    writer.finish({})


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    store = RunStore(tmp_path / "a")
    store.root.mkdir()
    store.write_audit({"name": "a", "spec": {"collapse": {"threshold": 0.5, "recovery": 0.9}}})
    _run(store, "base0", 0, [0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0], None)
    _run(store, "base1", 1, [0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0], None)
    # floor 0, P_pre = median(1, 2) = 1.5 (the evaluations before step 25 but the first): the
    # baselines of the other seed show no noise and no drop, so a collapse is a drop of more
    # than 0.5 · 1.5 = 0.75 at two evaluations: 1.2 at 30 and 1.0 at 40; back (drop ≤ 0.15)
    # from 50 on.
    _run(store, "spike0", 0, [0.0, 1.0, 2.0, 0.3, 0.5, 1.5, 1.5, 1.5], 50.0)
    _run(store, "spike1", 1, [0.0, 1.0, 2.0, 0.1, 0.1, 0.1, 0.1, 0.1], 50.0)  # never recovers
    store.writer("failed").update_info(
        run_id="failed",
        workload="w",
        seed=2,
        status="failed",
        error="Traceback…\n  line\nValueError: bad\n",
    )
    return store


def test_collapse_labels_and_onsets_by_hand(store: RunStore) -> None:
    records = {r.run_id: r for r in audit_records(store)}
    spike = records["spike0"]
    assert spike.onset.step == 25 and spike.onset.source == "events" and not spike.is_baseline
    c = spike.collapse
    assert c is not None and c.collapsed and not c.irreversible
    assert c.perf_pre == pytest.approx(1.5) and c.min_progress == pytest.approx(0.2)
    assert c.collapse_step == 5 and c.collapse_at == 30 and c.first_eval_after_onset == 30
    assert c.recovery_steps == 20 and c.reason is None  # from the collapse evaluation to 50
    assert c.drop_threshold == pytest.approx(0.75) and c.noise == 0.0
    gone = records["spike1"].collapse
    assert gone is not None and gone.collapsed and gone.irreversible and gone.recovery_steps is None
    base = records["base0"]
    assert base.is_baseline and base.onset.step == 25 and base.onset.source == "matched_seed"
    assert base.collapse is not None and base.collapse.collapsed is False
    assert spike.magnitude == 50.0 and base.magnitude is None


def test_a_failed_run_keeps_the_last_line_of_its_error(store: RunStore) -> None:
    failed = next(r for r in audit_records(store) if r.run_id == "failed")
    assert failed.error == "ValueError: bad" and failed.collapse is None


def test_collapse_config_resolves_once_and_checks(store: RunStore) -> None:
    assert collapse_config(store.audit(), []) == CollapseSettings(
        threshold=0.5, recovery=0.9, pre_evals=3
    )
    assert collapse_config({}, [{"spec": {"collapse": {"threshold": 0.3}}}]).threshold == 0.3
    assert collapse_config({}, []) == CollapseSettings()
    with pytest.raises(
        StabilityBenchError, match=r"collapse: recovery \(0.9\) must be >= threshold \(0.95\)"
    ):
        collapse_config({"spec": {"collapse": {"threshold": 0.95, "recovery": 0.9}}}, [])


def test_magnitude_is_the_parameter_the_perturbation_declares() -> None:
    assert perturbation_magnitude("lr_spike", {"at": 0.3, "factor": 10, "duration": 5}) == 10.0
    assert perturbation_magnitude("weight_noise", {"scale": 0.5, "at": 0.4}) == 0.5
    assert perturbation_magnitude("momentum_shock", {"value": 0.99}) == 0.99
    assert perturbation_magnitude("optimizer_reset", {"at": 0.3}) is None
    assert perturbation_magnitude("lr_spike+weight_noise", {"lr_spike": {"factor": 3}}) is None


def _recipe_run(
    store: RunStore,
    run_id: str,
    seed: int,
    lr: float,
    perf: list[float],
    healthy: bool,
    guard: dict[str, str] | None = None,
) -> None:
    writer = store.writer(run_id)
    workload = {"name": "w", "kind": "toy", "total_steps": 80, "knobs": {"lr": lr}}
    writer.start(
        {
            "run_id": run_id,
            "workload": "w",
            "kind": "toy",
            "knobs": {"lr": lr},
            "seed": seed,
            "healthy": healthy,
            "perturbation": {"kind": "none", "label": "none", "params": {}},
            "spec": {"workload": workload, "perturbations": [], "seed": seed},
            "guard": guard,
        }
    )
    writer.write_table("evals", pd.DataFrame({"step": EVAL_STEPS, "perf": perf}))
    writer.write_events([])
    writer.finish({})


def test_recipes_on_trial_are_judged_from_the_spec_onset_against_the_healthy_runs(
    tmp_path: Path,
) -> None:
    # An audit of recipes, no perturbation (paper_lm_intrinsic): `collapse.onset` 0.25 of 80
    # steps puts every run's onset at step 20. The lr-9 recipe is on trial (not the reference,
    # and no perturbed run shares it): it is judged against the healthy lr-1 runs of other
    # seeds, which are flat at 2 (no noise, no drop), so falling from P_pre 1.5 to 0.2 is a
    # collapse; its own recipe's other seeds, which also fall, calibrate nothing.
    store = RunStore(tmp_path / "a")
    store.root.mkdir()
    store.write_audit({"name": "a", "spec": {"collapse": {"onset": 0.25}}})
    flat = [0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    falls = [0.0, 1.0, 2.0, 2.0, 0.2, 0.2, 0.2, 0.2]
    for seed in (0, 1, 2):
        _recipe_run(store, f"healthy{seed}", seed, 1.0, flat, True)
        _recipe_run(store, f"trial{seed}", seed, 9.0, falls if seed < 2 else flat, False)
    records = {r.run_id: r for r in audit_records(store)}
    for seed in (0, 1, 2):
        healthy, trial = records[f"healthy{seed}"], records[f"trial{seed}"]
        assert trial.intrinsic and not healthy.intrinsic
        assert trial.onset == healthy.onset
        assert trial.onset.step == 20 and trial.onset.source == "spec"
        assert healthy.collapsed is False
    assert records["trial0"].collapsed and records["trial1"].collapsed
    assert records["trial2"].collapsed is False  # a hard negative
    assert records["trial0"].collapse.noise == 0.0  # type: ignore[union-attr]
    # the criterion's false-positive rate counts the healthy runs only, not the recipes on trial
    from stabilitybench.metrics.summary import sham_flag_rates

    (rate,) = sham_flag_rates(list(records.values()))
    assert (rate.n_flagged, rate.n_judged) == (0, 3)
    # without `collapse.onset` a recipe on trial falls back on its own best level (no onset)
    store.write_audit({"name": "a", "spec": {}})
    again = {r.run_id: r for r in audit_records(store)}
    assert again["trial0"].onset.step is None and again["trial0"].intrinsic


def test_a_guarded_recipe_on_trial_is_judged_against_the_healthy_runs(tmp_path: Path) -> None:
    # A guard audit of a recipe on trial (guards on GPT-2's own divergences): the guarded lr-9
    # runs are not recipes on trial themselves (a guard changed them) but sit at its levels, so
    # they are judged as it is, against the healthy lr-1 runs of other seeds. Against their own
    # level's unguarded runs, which all fall, the fall of a guarded run would not be a collapse.
    # A guard's interventions there are not false alarms; on the healthy level they are.
    from stabilitybench.metrics.guards import Intervention, guard_comparisons

    store = RunStore(tmp_path / "a")
    store.root.mkdir()
    store.write_audit({"name": "a", "spec": {"collapse": {"onset": 0.25}}})
    flat = [0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    falls = [0.0, 1.0, 2.0, 2.0, 0.2, 0.2, 0.2, 0.2]
    guard = {"detector": "auto", "action": "skip", "label": "auto:skip"}
    for seed in (0, 1, 2):
        _recipe_run(store, f"healthy{seed}", seed, 1.0, flat, True)
        _recipe_run(store, f"trial{seed}", seed, 9.0, falls, False)
        _recipe_run(store, f"guarded{seed}", seed, 9.0, falls if seed else flat, False, guard)
        _recipe_run(store, f"guarded_healthy{seed}", seed, 1.0, flat, False, guard)
    records = {r.run_id: r for r in audit_records(store)}
    for seed in (0, 1, 2):
        trial, guarded = records[f"trial{seed}"], records[f"guarded{seed}"]
        assert trial.intrinsic and trial.on_trial and trial.collapsed
        assert guarded.on_trial and not guarded.intrinsic and guarded.guard == "auto:skip"
        assert guarded.onset.step == 20 and guarded.onset.source == "spec"
        healthy = records[f"guarded_healthy{seed}"]
        assert not healthy.on_trial and healthy.collapsed is False
    assert records["guarded0"].collapsed is False
    assert records["guarded1"].collapsed and records["guarded2"].collapsed
    assert records["guarded1"].collapse.noise == 0.0  # type: ignore[union-attr]
    stops = {
        f"{name}{seed}": [Intervention(30, "skip")]
        for name in ("guarded", "guarded_healthy")
        for seed in (0, 1, 2)
    }
    comparisons = {c.knobs["lr"]: c for c in guard_comparisons(list(records.values()), stops)}
    on_trial, healthy_level = comparisons[9.0], comparisons[1.0]
    assert on_trial.on_trial and on_trial.false_interventions_per_run is None
    assert (on_trial.collapse.k, on_trial.collapse_unguarded.k) == (2, 3)
    assert not healthy_level.on_trial and healthy_level.false_interventions_per_run == 1.0
