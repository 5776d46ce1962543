"""`monitor score`: guards and a monitor fitted on another audit, on an imported diverging run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from stabilitybench.cli import app
from stabilitybench.evaluation.fitting import safe_name
from stabilitybench.evaluation.scoring import load_score_result, score_path
from stabilitybench.monitor.attribution import deviations, strongest
from stabilitybench.monitor.features import FeatureExtractor
from stabilitybench.store import RunStore

runner = CliRunner()
DIVERGE_FROM, NAN_AT = 80, 110
# Telemetry the toy workload records that the imported log leaves out (the missing features).
# (`update_ratio` and `param_norm` are in the log under the telemetry columns' own names, so
# they import as those columns.)
LEFT_OUT = ("grad_cos_ema", "grad_cos_prev", "grad_norm_max_layer", "update_norm")


def _toy_audit(root: Path) -> Path:
    """A 2-seed healthy toy audit run in-process, with a monitor fitted on it (a few seconds)."""
    from stabilitybench.audit.runner import plan_audit, prepare_store
    from stabilitybench.evaluation.fitting import fit_audit
    from stabilitybench.workloads.base import build_workload

    spec = {
        "name": "toy-healthy",
        "seeds": [0, 1],
        "workloads": [
            {
                "name": "toy",
                "kind": "toy",
                "total_steps": 120,
                "eval": {"every": 20, "batches": 1},
                "knobs": {"hidden": 16},
            }
        ],
        "perturbations": ["none"],
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    plan = plan_audit(root / "spec.yaml", root / "toy")
    store = prepare_store(plan)
    for run in plan.todo:
        writer = store.writer(run.run_id)
        writer.start(store.info(run.run_id))
        writer.finish(build_workload(run.workload).run(run, writer))
    fit_audit(store, latent_dim=2, monitor_options={"max_epochs": 3})
    return root / "toy"


@pytest.fixture(scope="module")
def audits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The toy audit with its monitor, and a diverging run logged as CSV then imported."""
    root = tmp_path_factory.mktemp("score")
    toy = _toy_audit(root)
    store = RunStore.open(toy)
    healthy = store.load(sorted(store.run_ids())[0]).telemetry
    # A run shaped like the toy's, whose gradient norm and loss blow up from step 80 (NaN at 110).
    log = healthy[["step", "loss", "grad_norm", "lr", "update_ratio", "param_norm"]].copy()
    growing = log["step"] >= DIVERGE_FROM
    log.loc[growing, "grad_norm"] *= 1.25 ** (log.loc[growing, "step"] - DIVERGE_FROM)
    log.loc[growing, "loss"] *= 1.08 ** (log.loc[growing, "step"] - DIVERGE_FROM)
    log.loc[log["step"] >= NAN_AT, ["loss", "grad_norm"]] = math.nan
    log.to_csv(root / "diverging.csv", index=False, na_rep="nan")
    imported = root / "imported"
    args = ["import", str(root / "diverging.csv"), "--out", str(imported)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return {"root": root, "toy": toy, "imported": imported}


def _scores(audit: Path) -> pd.DataFrame:
    store = RunStore.open(audit)
    (run_id,) = store.run_ids()
    scores = store.load(run_id).scores
    assert scores is not None
    return scores


def test_score_with_a_monitor_from_another_audit(audits: dict[str, Path]) -> None:
    result = runner.invoke(
        app,
        ["monitor", "score", str(audits["imported"]), "--monitor", str(audits["toy"] / "monitor")],
    )
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    # One line per feature the imported run lacks, and the kinds said.
    for feature in LEFT_OUT:
        assert f"msm: feature {feature} is missing in every run (1)" in out
    assert out.count("is missing in") == len(LEFT_OUT)
    assert "fitted on toy runs and these are imported" in out
    assert "pca: keeps no saved model" in out

    # The same scores.parquet layout `monitor fit` wrote for the toy audit's own runs.
    toy_store = RunStore.open(audits["toy"])
    toy_scores = toy_store.load(toy_store.run_ids()[0]).scores
    scores = _scores(audits["imported"])
    assert toy_scores is not None and list(scores.columns) == list(toy_scores.columns)
    assert list(scores["step"]) == list(range(120))
    assert scores["pca"].isna().all() and not scores["pca_native"].any()

    steps = scores["step"].to_numpy()
    window = (steps > DIVERGE_FROM) & (steps <= NAN_AT)
    # Every scored detector alarms at or before the divergence; the MSM and ZClip before it.
    for column in ("msd", "zclip", "olmo", "lightning", "megatron", "ews"):
        first = steps[scores[f"{column}_native"].to_numpy()]
        assert first.size and first[first > DIVERGE_FROM].min() <= NAN_AT, column
    assert scores.loc[window & (steps < NAN_AT), "msd_native"].any()
    assert scores.loc[window & (steps < NAN_AT), "zclip_native"].any()

    saved = load_score_result(audits["imported"])
    (run,) = saved.runs
    assert run.diverged_step == NAN_AT and run.steps == 120
    assert sorted(run.missing_features) == sorted(LEFT_OUT)
    lightning, megatron, zclip = run.of("lightning"), run.of("megatron"), run.of("zclip")
    assert lightning is not None and lightning.first_alarm_step == NAN_AT
    assert lightning.deviated_first == "loss (non-finite)" and lightning.max_score_infinite
    assert megatron is not None and megatron.first_alarm_step == NAN_AT
    assert zclip is not None and zclip.first_alarm_step is not None
    assert DIVERGE_FROM < zclip.first_alarm_step < NAN_AT
    assert zclip.deviated_first is not None and zclip.deviated_first.startswith("grad_norm (+")
    msm = run.of("msm")
    assert msm is not None and msm.scored and msm.deviated_first is not None
    # The table printed per run names each detector's first alarm.
    assert f"lightning step {NAN_AT} 1 inf loss (non-finite)" in out

    # The report overlays the alarms and says which signal deviated first.
    report = runner.invoke(app, ["report", str(audits["imported"])])
    assert report.exit_code == 0, report.output
    page = (audits["imported"] / "report.html").read_text(encoding="utf-8")
    assert "each detector&#x27;s first alarm" in page or "each detector's first alarm" in page
    assert f"(diverged at step {NAN_AT}): first alarm" in page
    assert "deviated first" in page


def test_without_a_monitor_the_guards_score_and_fitted_detectors_are_skipped(
    audits: dict[str, Path], tmp_path: Path
) -> None:
    result = runner.invoke(app, ["monitor", "score", str(audits["imported"])])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "msm, pca: fitted detectors, skipped without a monitor" in out
    assert "skipped: no --monitor" in out
    scores = _scores(audits["imported"])
    assert scores["msd"].isna().all() and scores["z_1"].isna().all()
    assert np.isposinf(scores.loc[scores["step"] == NAN_AT, "megatron"]).all()
    saved = load_score_result(audits["imported"])
    assert saved.monitor is None and saved.runs[0].of("msm").scored is False  # type: ignore[union-attr]


def test_an_audit_folder_or_its_monitor_folder_is_accepted(audits: dict[str, Path]) -> None:
    # --monitor OTHER_AUDIT (its monitor/) and OTHER_AUDIT/monitor/<workload> name the same model.
    for given in (audits["toy"], audits["toy"] / "monitor" / safe_name("toy")):
        result = runner.invoke(
            app, ["monitor", "score", str(audits["imported"]), "--monitor", str(given)]
        )
        assert result.exit_code == 0, result.output


def test_bad_input_is_one_line_and_exit_2(audits: dict[str, Path], tmp_path: Path) -> None:
    def score(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, ["monitor", "score", *args])
        return result.exit_code, " ".join(result.output.split())

    code, out = score(str(tmp_path))
    assert code == 2 and "is not a StabilityBench audit" in out
    code, out = score(str(audits["imported"]), "--monitor", str(tmp_path / "absent"))
    assert code == 2 and "no such folder" in out and "monitor fit" in out
    (tmp_path / "empty").mkdir()
    code, out = score(str(audits["imported"]), "--monitor", str(tmp_path / "empty"))
    assert code == 2 and "is not a fitted monitor" in out and "monitor fit OTHER_AUDIT" in out
    assert "Traceback" not in out


def test_a_run_with_none_of_the_monitors_features_is_refused(
    audits: dict[str, Path], tmp_path: Path
) -> None:
    """A monitor fitted on another workload kind is allowed only through shared features: a
    run that has none of them cannot be scored, and nothing is written."""
    lines = ["step,accuracy"] + [f"{s},{0.5 + s / 400}" for s in range(60)]
    (tmp_path / "other.csv").write_text("\n".join(lines) + "\n")
    other = tmp_path / "other"
    assert (
        runner.invoke(app, ["import", str(tmp_path / "other.csv"), "--out", str(other)]).exit_code
        == 0
    )
    result = runner.invoke(
        app, ["monitor", "score", str(other), "--monitor", str(audits["toy"] / "monitor")]
    )
    out = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "has none of the features the msm model was fitted on" in out
    assert "needs at least one of: grad_cos_ema, grad_cos_prev, grad_norm" in out
    assert "--map TAG=COLUMN" in out
    store = RunStore.open(other)
    assert store.load(store.run_ids()[0]).scores is None
    assert not score_path(other).exists()


def test_deviations_hand_worked() -> None:
    # A guard: against the run's own earlier values. x (no known scaling: identity) at index 5
    # is 100 after 1..5: median 3, IQR 2 → scale 2 / 1.349; (100 − 3) / 1.4826 = 65.4.
    table = pd.DataFrame({"x": [1.0, 2, 3, 4, 5, 100], "y": [1.0, 1, 1, 1, 1, math.inf]})
    found = deviations(table, ["x"], 5)
    assert found["x"] == pytest.approx(97 / (2 / 1.349))
    assert strongest(found) == "x (+65.4σ)"
    # A non-finite value deviates most; a value missing right after a logged one too.
    assert strongest(deviations(table, ["x", "y"], 5)) == "y (non-finite)"
    gap = pd.DataFrame({"x": [1.0, 2, 3, math.nan]})
    assert strongest(deviations(gap, ["x"], 3)) == "x (non-finite)"
    # A fitted detector: against the healthy reference, after the column's scaling
    # (grad_norm is log10): log10(1000) = 3, centre 1, scale 0.5 → +4σ.
    features = FeatureExtractor(["grad_norm"], np.asarray([1.0]), np.asarray([0.5]))
    fitted = deviations(pd.DataFrame({"grad_norm": [10.0, 1000.0]}), ["grad_norm"], 1, features)
    assert fitted["grad_norm"] == pytest.approx(4.0)
