"""fit_audit / evaluate_audit on small synthetic audits, the statistics, and the CLI's bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from monitor_synthetic import make_audit
from stabilitybench.cli import app
from stabilitybench.detectors.base import detector_classes
from stabilitybench.errors import StabilityBenchError
from stabilitybench.evaluation.alarms import auroc, auroc_bootstrap_ci
from stabilitybench.evaluation.evaluate import evaluate_audit, fit_audit
from stabilitybench.metrics.serialize import to_jsonable
from stabilitybench.store import RunStore

DETECTORS = tuple(detector_classes())

FAST = {"max_epochs": 3, "window": 32, "hidden": 16}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> RunStore:
    store = make_audit(tmp_path_factory.mktemp("audit") / "a", factors=(None, 1.2, 1.5, 20.0, 30.0))
    fit_audit(store, latent_dim=3, seed=0, monitor_options=FAST)
    return store


def test_auroc_by_hand_and_bootstrap_interval() -> None:
    labels = np.array([True, True, False, False])
    assert auroc(np.array([0.9, 0.4, 0.5, 0.1]), labels) == pytest.approx(0.75)  # 3 of 4 pairs
    assert auroc(np.array([1.0, 1.0, 1.0, 1.0]), labels) == pytest.approx(0.5)  # ties count 1/2
    lo, hi = auroc_bootstrap_ci(
        np.array([0.9, 0.8, 0.7, 0.2, 0.1, 0.3]),
        np.array([1, 1, 1, 0, 0, 0], bool),
        np.random.default_rng(0),
        reps=200,
    )
    assert lo == hi == 1.0


def test_fit_writes_models_and_scores(fitted: RunStore) -> None:
    root = fitted.root
    assert (root / "monitor" / "monitor.json").exists() and (
        root / "monitor" / "model.safetensors"
    ).exists()
    # one folder per workload, named by a hash of the name (names never become paths)
    model = json.loads((root / "monitor" / "fit.json").read_text())["workloads"]["synth"]["model"]
    assert model.startswith("monitor/workload-") and (root / model / "monitor.json").exists()
    run = fitted.load(fitted.run_ids()[0])
    assert run.scores is not None
    for column in ("step", "msd", "z_1", "z_3", *DETECTORS[1:], "zclip_native", "msd_native"):
        assert column in run.scores.columns
    assert len(run.scores) == len(run.telemetry)
    fit = json.loads((root / "monitor" / "fit.json").read_text())
    assert fit["workloads"]["synth"]["leave_one_seed_out"] == 3


def test_leave_one_seed_out_scores_differ_from_the_full_model(fitted: RunStore) -> None:
    from stabilitybench.monitor.ssm import MetaStateMonitor

    full = MetaStateMonitor.load(fitted.root / "monitor")
    run = fitted.load("s0-None")
    assert run.scores is not None
    assert not np.allclose(full.score(run.telemetry)["msd"], run.scores["msd"])


FIELDS = {
    "event_recall",
    "chance_recall",
    "chance_recall_p95",
    "clock_recall",
    "lead_time_median",
    "lead_time_iqr",
    "false_alarms_per_1k",
    "false_alarms_per_1k_not_collapsed",
    "false_alarms_per_1k_collapsed",
    "false_alarms_per_1k_sham",
    "time_in_warning",
    "auroc",
    "auroc_ci",
    "outcome_auroc",
    "outcome_auroc_doses",
    "n_collapses",
    "n_no_lead_possible",
    "notes",
}
COUNTS = {"n_collapses", "n_no_lead_possible"}


def test_evaluate_has_the_documented_shape_per_workload_and_macro(fitted: RunStore) -> None:
    result = to_jsonable(evaluate_audit(fitted, target_false_alarms=5.0, horizon=40))
    assert set(result) == {
        "target_false_alarms_per_1k",
        "horizon",
        "protocol",
        "workloads",
        "detectors",
    }
    assert result["target_false_alarms_per_1k"] == 5.0 and result["horizon"] == 40
    synth = result["workloads"]["synth"]
    assert set(synth) == {
        "n_collapsed",
        "n_not_collapsed",
        "n_healthy",
        "detectors",
        "horizon",
        "target_false_alarms_per_1k",
        "sph",
        "gap",
        "manifold",
    }
    assert (synth["n_collapsed"], synth["n_not_collapsed"], synth["n_healthy"]) == (6, 6, 3)
    assert set(synth["detectors"]) == set(result["detectors"]) == set(DETECTORS)
    for entry in [*synth["detectors"].values(), *result["detectors"].values()]:
        assert set(entry) == FIELDS
        for key in FIELDS - {"notes", "lead_time_iqr", "auroc_ci"} - COUNTS:
            assert entry[key] is None or isinstance(entry[key], float), key
    msm = synth["detectors"]["msm"]
    # the drift starts at step 80; the collapse is seen at the evaluation at step 99 or 119
    assert msm["event_recall"] == 1.0 and 0 < msm["lead_time_median"] <= 60
    assert msm["chance_recall_p95"] is not None and msm["chance_recall"] is not None
    protocol = result["protocol"]
    assert (protocol["horizon"], protocol["sop"], protocol["sph"]) == (40, 40, 10)
    assert msm["outcome_auroc"] >= 0.9
    assert msm["auroc_ci"][0] <= msm["auroc"] <= msm["auroc_ci"][1]
    # one workload: the macro average is that workload
    assert result["detectors"]["msm"]["auroc"] == msm["auroc"]
    json.dumps(result, allow_nan=False)  # what the CLI prints
    saved = json.loads((fitted.root / "monitor" / "evaluation.json").read_text())
    assert saved["workloads"]["synth"]["detectors"]["msm"]["auroc"] == msm["auroc"]


def test_a_longer_horizon_counts_earlier_alarms_as_warnings(fitted: RunStore) -> None:
    short = evaluate_audit(fitted, target_false_alarms=5.0, horizon=5, sph=0).workloads["synth"]
    long = evaluate_audit(fitted, target_false_alarms=5.0, horizon=60, sph=0).workloads["synth"]
    for name in ("zclip", "pca"):
        s, w = short.detectors[name], long.detectors[name]
        assert (s.event_recall or 0.0) <= (w.event_recall or 0.0)


def test_too_few_runs_says_so_instead_of_a_number(tmp_path: Path) -> None:
    store = make_audit(tmp_path / "a", seeds=(0, 1), factors=(None, 30.0))
    fit_audit(store, latent_dim=2, monitor_options=FAST)
    result = evaluate_audit(store)
    assert result.workloads["synth"].n_not_collapsed == 0
    msm = result.workloads["synth"].detectors["msm"]
    assert msm.outcome_auroc is None and msm.false_alarms_per_1k_not_collapsed is None
    assert any(note.startswith("too few runs for the outcome AUROC") for note in msm.notes)
    # these collapses come within SPH = 10 steps of the spike: no lead possible, said so
    zclip = result.workloads["synth"].detectors["zclip"]
    assert zclip.event_recall is None and zclip.n_no_lead_possible == 2
    assert any("no lead possible" in note for note in zclip.notes)
    assert isinstance(
        evaluate_audit(store, sph=0).workloads["synth"].detectors["zclip"].event_recall, float
    )


def _cli(*args: str) -> tuple[int, str]:
    outcome = CliRunner().invoke(app, list(args))
    return outcome.exit_code, outcome.output


def test_cli_bad_inputs_exit_2_with_what_is_missing(tmp_path: Path) -> None:
    only_perturbed = make_audit(tmp_path / "p", seeds=(0,), factors=(20.0,))
    code, out = _cli("monitor", "evaluate", str(only_perturbed.root))
    assert code == 2 and "no finished baseline runs" in out and "none" in out
    code, out = _cli("monitor", "fit", str(only_perturbed.root))
    assert code == 2 and "baseline" in out
    only_baseline = make_audit(tmp_path / "b", seeds=(0,), factors=(None,))
    code, out = _cli("monitor", "evaluate", str(only_baseline.root))
    assert code == 2 and "no finished perturbed runs" in out and "lr_spike" in out
    unfitted = make_audit(tmp_path / "u", seeds=(0,), factors=(None, 20.0))
    code, out = _cli("monitor", "evaluate", str(unfitted.root))
    assert code == 2 and "no fitted monitor" in out and "stabilitybench monitor fit" in out
    code, out = _cli("monitor", "evaluate", str(unfitted.root), "--target-false-alarms", "0")
    assert code == 2 and "--target-false-alarms" in out


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("--horizon", "0", "--horizon must be a whole number of optimizer steps >= 1"),
        ("--horizon", "-5", "--horizon must be a whole number of optimizer steps >= 1"),
        ("--target-false-alarms", "0", "--target-false-alarms must be a number in (0, 500]"),
        ("--target-false-alarms", "-1", "--target-false-alarms must be a number in (0, 500]"),
        ("--target-false-alarms", "501", "--target-false-alarms must be a number in (0, 500]"),
        ("--target-false-alarms", "nan", "--target-false-alarms must be a number in (0, 500]"),
        ("--sph", "-1", "--sph must be a whole number of optimizer steps >= 0"),
        ("--sph", "100000", "warning.sph of workload 'synth' is 100000 optimizer steps"),
    ],
)
def test_cli_bad_protocol_options_exit_2_and_write_nothing(
    fitted: RunStore, option: str, value: str, named: str
) -> None:
    saved = fitted.root / "monitor" / "evaluation.json"
    saved.unlink(missing_ok=True)
    code, out = _cli("monitor", "evaluate", str(fitted.root), option, value)
    assert code == 2 and named in " ".join(out.split())
    assert "Traceback" not in out and not saved.exists()


def test_a_workload_without_healthy_runs_is_an_error(tmp_path: Path) -> None:
    store = make_audit(tmp_path / "a", seeds=(0, 1), factors=(None, 30.0))
    fit_audit(store, latent_dim=2, monitor_options=FAST)
    for run_id in store.run_ids():  # the audit's reference says these baselines are not healthy
        store.writer(run_id).update_info(healthy=False)
    code, out = _cli("monitor", "evaluate", str(store.root))
    text = " ".join(out.split())
    assert code == 2 and "workload 'synth' has no finished healthy runs" in text
    assert "reference" in text and not (store.root / "monitor" / "evaluation.json").exists()


def test_cli_evaluate_json(fitted: RunStore) -> None:
    code, out = _cli(
        "monitor", "evaluate", str(fitted.root), "--json", "--target-false-alarms", "2"
    )
    assert code == 0
    data = json.loads(out)
    assert data["target_false_alarms_per_1k"] == 2.0
    assert isinstance(data["workloads"]["synth"]["detectors"]["pca"]["auroc"], float)
    code, out = _cli("monitor", "evaluate", str(fitted.root))
    assert code == 0 and "msm" in out and "adam_rms" in out
    assert "synth: 6 collapsed, 6 not collapsed, 3 healthy runs" in out
    assert "macro average, 1 workloads (1 FA/1k, SOP 100 steps)" in out


def test_warning_settings_come_from_the_spec_per_workload_and_the_cli_overrides(
    fitted: RunStore,
) -> None:
    from stabilitybench.settings import HORIZON, TARGET_FALSE_ALARMS

    default = evaluate_audit(fitted)
    assert (default.horizon, default.target_false_alarms_per_1k) == (HORIZON, TARGET_FALSE_ALARMS)
    original = fitted.audit()
    spec = dict(original.spec)
    spec["warning"] = {"target_false_alarms": 5.0}
    spec["workloads"] = [{"name": "synth", "warning": {"horizon": 40}}]
    fitted.write_audit(original.model_copy(update={"spec": spec}))
    try:
        from_spec = evaluate_audit(fitted)
    finally:
        fitted.write_audit(original)
    synth = from_spec.workloads["synth"]
    assert (synth.horizon, synth.target_false_alarms_per_1k) == (40, 5.0)
    assert (from_spec.horizon, from_spec.target_false_alarms_per_1k) == (HORIZON, 5.0)
    # the same as asking for those settings on the command line (a spec without `warning`)
    assert to_jsonable(synth) == to_jsonable(
        evaluate_audit(fitted, target_false_alarms=5.0, horizon=40).workloads["synth"]
    )
    overridden = evaluate_audit(fitted, horizon=5).workloads["synth"]
    assert (overridden.horizon, overridden.target_false_alarms_per_1k) == (5, 1.0)
    # a target that a detector in warning on every step would meet is refused, not scored
    with pytest.raises(StabilityBenchError, match=r"warning of workload 'synth'.*up to 100%"):
        evaluate_audit(fitted, target_false_alarms=10.0)


def test_a_command_line_target_mends_a_spec_whose_target_is_refused(fitted: RunStore) -> None:
    """A folder whose spec allows a detector always in warning (horizon 1000 at the default
    target) is refused as it is, and scored once `--target-false-alarms` brings it in range."""
    original = fitted.audit()
    spec = dict(original.spec)
    spec["warning"] = {"horizon": 1000}
    spec["workloads"] = [{"name": "synth"}]
    fitted.write_audit(original.model_copy(update={"spec": spec}))
    try:
        with pytest.raises(StabilityBenchError, match="up to 100%"):
            evaluate_audit(fitted)
        mended = evaluate_audit(fitted, target_false_alarms=0.1).workloads["synth"]
    finally:
        fitted.write_audit(original)
    assert (mended.horizon, mended.target_false_alarms_per_1k) == (1000, 0.1)


def test_scores_are_queryable_for_the_report(fitted: RunStore) -> None:
    frame = fitted.query("SELECT count(*) AS n, max(msd) AS top FROM scores")
    assert int(frame["n"].iloc[0]) == sum(len(fitted.load(r).telemetry) for r in fitted.run_ids())
    assert np.isfinite(frame["top"].iloc[0])
    assert isinstance(frame, pd.DataFrame)


def test_cli_evaluate_says_what_moved_the_monitor_at_its_first_alarms(fitted: RunStore) -> None:
    from collections import Counter

    from stabilitybench.evaluation.fitting import read_attributions
    from stabilitybench.evaluation.printing import first_alarm_lines

    found = read_attributions(fitted.root)
    assert found, "the synthetic spikes make the monitor alarm"
    leads = Counter(e["contributions"][0]["feature"] for e in found.values())
    feature, n = leads.most_common(1)[0]
    lines = first_alarm_lines(found)
    assert len(lines) == 1 and lines[0].startswith("synth: the monitor's first alarm was moved")
    assert f"{feature}" in lines[0] and f"({n} of {len(found)} runs)" in lines[0]
    code, out = _cli("monitor", "evaluate", str(fitted.root))
    assert code == 0 and "where: synth: the monitor's first alarm" in " ".join(out.split())
