"""`monitor fit`: what fit.json says about the features, the controls ablation, attribution.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from monitor_synthetic import make_audit
from stabilitybench.cli import app
from stabilitybench.evaluation.fitting import fit_audit
from stabilitybench.store import RunStore

FAST = {"max_epochs": 3, "window": 32, "hidden": 16}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> RunStore:
    store = make_audit(tmp_path_factory.mktemp("fit") / "a", factors=(None, 30.0))
    fit_audit(store, latent_dim=3, seed=0, monitor_options=FAST)
    return store


def test_fit_json_lists_the_features_and_why_the_controls_are_left_out(fitted: RunStore) -> None:
    fit = json.loads((fitted.root / "monitor" / "fit.json").read_text())
    assert fit["include_controls"] is False
    workload = fit["workloads"]["synth"]
    for name in ("msm", "pca"):
        info = workload["detectors"][name]
        assert "lr" not in info["features"] and "grad_norm" in info["features"]
        assert info["excluded_features"]["lr"].startswith("control: probe 'lr'")
        assert info["include_controls"] is False
    assert workload["fit_info"]["terms"] == ["prediction", "features"]


def test_attribution_json_says_what_moved_the_monitor_at_its_first_alarm(
    fitted: RunStore,
) -> None:
    found = json.loads((fitted.root / "monitor" / "attribution.json").read_text())
    drifting = {k: v for k, v in found.items() if k.endswith("-30.0")}
    assert len(drifting) == 3  # every seed's drifting run alarms
    for run_id, entry in drifting.items():
        scores = fitted.load(run_id).scores
        assert scores is not None
        first = int(scores.loc[scores["msd_native"], "step"].iloc[0])
        assert entry["detector"] == "msm" and entry["step"] == first  # the fold's first alarm
        assert entry["term"] in {"latent", "prediction", "features"}
        top = entry["contributions"][0]
        assert top["feature"] in {
            "loss",
            "grad_norm",
            "grad_norm_max_layer",
            "update_norm",
            "update_ratio",
            "grad_cos_prev",
            "grad_cos_ema",
        }
        assert entry["text"].startswith(top["feature"])


def test_cli_include_controls_is_the_ablation(tmp_path: Path) -> None:
    store = make_audit(tmp_path / "b", seeds=(0, 1), factors=(None, 30.0))
    result = CliRunner().invoke(app, ["monitor", "fit", str(store.root), "--include-controls"])
    assert result.exit_code == 0, result.output
    fit = json.loads((store.root / "monitor" / "fit.json").read_text())
    assert fit["include_controls"] is True
    info = fit["workloads"]["synth"]["detectors"]["msm"]
    assert "lr" in info["features"] and info["include_controls"] is True
    assert not any(why.startswith("control") for why in info["excluded_features"].values())


def test_the_saved_monitors_threshold_comes_from_the_out_of_fold_healthy_scores(
    fitted: RunStore,
) -> None:
    """One held-out seed would set a 1-per-1k threshold at its own maximum; the healthy runs
    scored leave-one-seed-out give as many out-of-sample runs as there are seeds."""
    import pandas as pd

    from stabilitybench.evaluation.fitting import done_runs, is_healthy
    from stabilitybench.metrics.alarms import calibrate_threshold
    from stabilitybench.monitor.ssm import MetaStateMonitor

    healthy = [r for r in done_runs(fitted) if is_healthy(r)]
    assert len({r.seed for r in healthy}) >= 2
    scores = [
        pd.read_parquet(fitted.run_dir(r.run_id) / "scores.parquet")["msd"].to_numpy()
        for r in healthy
    ]
    monitor = MetaStateMonitor.load(fitted.root / "monitor")
    assert monitor.threshold == pytest.approx(calibrate_threshold(scores, 1.0))
    assert monitor.fit_info["threshold_from"].startswith(f"out-of-fold scores of {len(healthy)}")
