"""The paper's three claims judged per workload (`metrics/claims.py`), on hand-built records."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from stabilitybench.evaluation.results import Evaluation
from stabilitybench.findings.claims import (
    INCONCLUSIVE,
    NOT_SUPPORTED,
    NOT_TESTABLE,
    SUPPORTED,
    DetectorRow,
    WarningRule,
    audit_claims,
    buffering_verdict,
    newcombe_difference,
    stochasticity_axes,
    warning_verdict,
)
from stabilitybench.findings.printing import claims_markdown, verdict_table
from stabilitybench.metrics.collapse import CollapseResult
from stabilitybench.metrics.decoupling import audit_decoupling
from stabilitybench.metrics.decoupling import verdict as decoupling_rule
from stabilitybench.metrics.records import RunRecord
from stabilitybench.metrics.serialize import from_jsonable
from stabilitybench.metrics.summary import AuditSummary, sham_flag_rates


def test_newcombe_difference_matches_newcombe_1998() -> None:
    # Newcombe (1998), Table II, example (a): 56/70 − 48/80 = 0.2000, method 10: 0.0524 to 0.3339.
    diff, (low, high) = newcombe_difference(56, 70, 48, 80)
    assert diff == pytest.approx(0.2)
    assert low == pytest.approx(0.0524, abs=5e-4)
    assert high == pytest.approx(0.3339, abs=5e-4)
    # Example (h): 0/10 − 0/20: −0.1611 to 0.2775.
    diff, (low, high) = newcombe_difference(0, 10, 0, 20)
    assert diff == 0.0
    assert low == pytest.approx(-0.1611, abs=5e-4)
    assert high == pytest.approx(0.2775, abs=5e-4)
    assert math.isnan(newcombe_difference(0, 0, 1, 5)[0])


def test_decoupling_rule() -> None:
    assert decoupling_rule(30, 0.1, [-0.3, 0.45], 0.01)[0] == SUPPORTED
    assert decoupling_rule(30, 0.8, [0.6, 0.9], 0.01)[0] == NOT_SUPPORTED
    assert decoupling_rule(30, 0.5, [0.2, 0.7], 0.01)[0] == INCONCLUSIVE
    assert decoupling_rule(8, 0.0, [-0.5, 0.4], 0.01)[0] == INCONCLUSIVE  # too few runs
    assert decoupling_rule(30, None, [None, None], 0.01)[0] == INCONCLUSIVE
    # no difference between conditions beyond seed noise: nothing to be decoupled
    verdict, reason = decoupling_rule(30, 0.1, [-0.3, 0.45], 0.4)
    assert verdict == INCONCLUSIVE and "nothing to be decoupled" in reason
    assert decoupling_rule(30, 0.1, [-0.3, 0.45], None)[0] == INCONCLUSIVE


def test_buffering_rule() -> None:
    rates = (0.2, 0.6)
    # fewer excess collapses with more noise, paired over 10 seeds: buffered
    assert buffering_verdict(-0.4, [-0.6, -0.2], 10, rates, 0.0).verdict == SUPPORTED
    assert buffering_verdict(0.4, [0.2, 0.6], 10, rates, 0.0).verdict == NOT_SUPPORTED
    # the CI reaches below −0.1: a buffering is not ruled out
    assert buffering_verdict(0.0, [-0.3, 0.3], 10, rates, 0.0).verdict == INCONCLUSIVE
    # a tight CI around 0 rules a buffering > 0.1 out
    assert buffering_verdict(0.0, [-0.05, 0.05], 40, rates, 0.0).verdict == NOT_SUPPORTED
    assert buffering_verdict(-0.4, [-0.6, -0.2], 2, rates, 0.0).verdict == INCONCLUSIVE  # seeds
    # labels that are not trusted, or nothing to buffer: not testable
    untrusted = buffering_verdict(-0.4, [-0.6, -0.2], 10, rates, 0.2)
    assert untrusted.verdict == NOT_TESTABLE and "flags 20%" in untrusted.reason
    assert buffering_verdict(0.0, [0.0, 0.0], 10, (0.0, 0.0), 0.0).verdict == NOT_TESTABLE
    assert buffering_verdict(0.0, [0.0, 0.0], 10, (1.0, 1.0), 0.0).verdict == NOT_TESTABLE


def _msm(
    recall: float = 0.9,
    p95: float = 0.6,
    clock: float | None = 0.5,
    fa: float = 1.0,
    lead: float | None = 50.0,
    n: int = 10,
) -> DetectorRow:
    return DetectorRow(
        detector="msm",
        event_recall=recall,
        event_recall_ci=[None, None],
        n_warned=round(recall * n),
        n_collapses=n,
        n_no_lead_possible=0,
        chance_recall=p95 - 0.1,
        chance_recall_p95=p95,
        clock_recall=clock,
        lead_time_median=lead,
        lead_time_iqr=[None, None],
        false_alarms_per_1k=fa,
        false_alarms_per_1k_not_collapsed=1.0,
        false_alarms_per_1k_collapsed=1.0,
        false_alarms_per_1k_sham=0.0,
        time_in_warning=0.01,
        auroc=0.9,
        auroc_ci=[0.8, 0.95],
        outcome_auroc=0.9,
    )


def test_warning_rule() -> None:
    rule = WarningRule(target_false_alarms=1.0, sph=10, sham_flag_rate=0.0)
    assert warning_verdict(_msm(), rule).verdict == SUPPORTED
    # each condition fails it on its own, and the reason says which
    for row, why in (
        (_msm(p95=0.9), "not above chance"),
        (_msm(clock=0.9), "not above the clock"),
        (_msm(fa=2.5), "FA above 2x the target"),
        (_msm(lead=5.0), "lead below SPH"),
        (_msm(lead=None), "lead below SPH"),
    ):
        verdict = warning_verdict(row, rule)
        assert verdict.verdict == NOT_SUPPORTED and verdict.reason.endswith(why), verdict
    assert warning_verdict(_msm(fa=2.0), rule).verdict == SUPPORTED  # 2x is within
    assert warning_verdict(_msm(n=2), rule).verdict == INCONCLUSIVE
    jolts = replace(_msm(n=0), event_recall=None, n_no_lead_possible=5)
    verdict = warning_verdict(jolts, rule)
    assert verdict.verdict == INCONCLUSIVE and "5 began less than SPH = 10" in verdict.reason
    assert warning_verdict(None, rule).verdict == INCONCLUSIVE
    # labels not trusted, or no perturbed run that escaped collapse: not testable
    untrusted = WarningRule(target_false_alarms=1.0, sph=10, sham_flag_rate=0.2)
    assert warning_verdict(_msm(), untrusted).verdict == NOT_TESTABLE
    assert warning_verdict(_msm(clock=None), rule).verdict == NOT_TESTABLE


def _collapse(collapsed: bool, irreversible: bool = True) -> CollapseResult:
    return CollapseResult(
        collapsed=collapsed,
        irreversible=irreversible if collapsed else False,
        collapse_step=10 if collapsed else None,
        collapse_env_steps=None,
        recovery_steps=None if (not collapsed or irreversible) else 5,
        recovery_env_steps=None,
        diverged=False,
        progress_undefined=False,
        onset_step=5,
        perf_0=0.0,
        perf_pre=1.0,
        min_progress=0.1 if collapsed else 0.9,
        n_missing_evals=0,
    )


def _run(
    index: int,
    noise: Any,
    perturbation: str,
    collapsed: bool,
    perf: float,
    score: float,
    *,
    irreversible: bool = True,
) -> RunRecord:
    kind = "none" if perturbation == "none" else perturbation.split("(")[0]
    return RunRecord(
        run_id=f"r{index}",
        label=None,
        workload="w",
        kind="toy",
        knobs={"ent_coef": noise, "lr": 0.1},
        perturbation=perturbation,
        perturbation_kind=kind,
        magnitude=None if kind == "none" else 10.0,
        seed=index % 5,
        status="done",
        error=None,
        collapse=_collapse(collapsed, irreversible),
        final_perf=perf,
        stability_score=score,
        stability_before_final=score,
    )


def _summary(runs: list[RunRecord], guards: list[Any] | None = None) -> AuditSummary:
    """The fields `audit_claims` reads: the audit's name, its run records, claim 1 (shared with
    the summary), the criterion's flag rates and the guard comparisons."""
    unguarded = [r for r in runs if r.guard == "none"]
    return SimpleNamespace(  # type: ignore[return-value]
        audit=SimpleNamespace(name="hand"),
        runs=runs,
        guards=guards or [],
        decoupling=audit_decoupling(unguarded, np.random.default_rng(0), 200),
        false_positives=sham_flag_rates(runs),
    )


@pytest.fixture
def runs() -> list[RunRecord]:
    """ent_coef 0 collapses 4/5 under a spike, 0.01 collapses 1/5 (and recovers); 5 baselines each."""
    out = []
    i = 0
    for noise, n_collapsed in ((0.0, 4), (0.01, 1)):
        for seed in range(5):
            out.append(_run(i, noise, "none", False, 100.0 + seed, 0.9))
            i += 1
        for seed in range(5):
            collapsed = seed < n_collapsed
            out.append(
                _run(
                    i,
                    noise,
                    "lr_spike(at=0.3,factor=10)",
                    collapsed,
                    20.0 + seed if collapsed else 90.0 + seed,
                    0.2 if collapsed else 0.85,
                    irreversible=noise == 0.0,
                )
            )
            i += 1
    return out


def test_audit_claims_on_hand_built_runs(runs: list[RunRecord]) -> None:
    evaluation = {
        "horizon": 100,
        "target_false_alarms_per_1k": 1.0,
        "protocol": {"horizon_unit": "optimizer steps"},
        "workloads": {
            "w": {
                "n_collapsed": 5,
                "n_not_collapsed": 5,
                "n_healthy": 5,
                "sph": 10,
                "target_false_alarms_per_1k": 1.0,
                "detectors": {
                    "msm": {
                        "event_recall": 0.6,
                        "n_collapses": 5,
                        "chance_recall": 0.2,
                        "chance_recall_p95": 0.4,
                        "clock_recall": 0.2,
                        "lead_time_median": 40.0,
                        "lead_time_iqr": [30.0, 50.0],
                        "false_alarms_per_1k": 0.8,
                        "false_alarms_per_1k_not_collapsed": 1.5,
                        "auroc": 0.8,
                        "auroc_ci": [0.7, 0.9],
                        "outcome_auroc": 0.9,
                    },
                    "zclip": {"event_recall": 0.2, "auroc": 0.85, "auroc_ci": [0.8, 0.9]},
                },
            }
        },
    }
    claims = audit_claims(_summary(runs), from_jsonable(Evaluation, evaluation), reps=300)
    (d,) = claims.decoupling
    assert d.n_runs == 20
    assert d.rho is not None and d.rho > 0.5  # the collapsed runs end low: coupled
    assert d.best_scoring == {"ent_coef": 0.01, "lr": 0.1}
    assert [r.collapse_rate for r in d.recipes] == [0.8, 0.2]
    (b,) = claims.buffering  # lr is not a stochasticity knob
    assert (b.knob, b.least, b.most) == ("ent_coef", 0.0, 0.01)
    assert [(lv.n_collapsed, lv.n_runs, lv.n_recovered) for lv in b.levels] == [
        (4, 5, 0),
        (1, 5, 1),
    ]
    assert [(lv.baseline_n_collapsed, lv.baseline_n_runs) for lv in b.levels] == [(0, 5), (0, 5)]
    assert b.difference == pytest.approx(-0.6)
    assert b.per_perturbation[0].name == "lr_spike×10"
    assert b.per_perturbation[0].n_collapsed == [4, 1]
    (w,) = claims.warning
    assert w.verdict.verdict == SUPPORTED and w.best_auroc == "zclip"
    msm = w.detectors[0]
    assert msm.n_warned == 3 and msm.event_recall_ci[0] is not None
    (robust,) = claims.robustness
    assert robust.most_robust == 0.01 and robust.n_collapsed == [4, 1]
    rows = verdict_table(claims)
    assert [r[:2] for r in rows] == [["w", "1"], ["w", "2"], ["w", "3"]]
    text = claims_markdown(claims)
    assert "## Findings: hand" in text
    assert "| w | ent_coef: 0.0 → 0.01 | -0.60 [" in text
    assert "**supported**: recall 0.60 (3/5), chance p95 0.40, clock 0.20" in text
    assert "Verdict rules:" in text


def test_claim_3_is_left_out_without_an_evaluation(runs: list[RunRecord]) -> None:
    claims = audit_claims(_summary(runs), None, reps=100)
    assert claims.warning == []
    assert any("claim 3 is not judged" in n for n in claims.notes)
    assert "Not judged: the audit's detectors have not been evaluated." in claims_markdown(claims)


def test_what_a_guard_saved_is_a_table_beside_the_unguarded_runs() -> None:
    from dataclasses import replace

    from stabilitybench.metrics.guards import Intervention, guard_comparisons

    ramp = "lr_spike(at=0.3,factor=30,duration=2000,ramp=geometric)"
    plain = [_run(i, 0.0, ramp, True, -300.0 + i, 0.1) for i in range(5)]
    guarded = [
        replace(_run(5 + i, 0.0, ramp, i == 0, 100.0 + i, 0.8), guard="zclip:escalate")
        for i in range(5)
    ]
    records = plain + guarded
    interventions = {r.run_id: [Intervention(step=50, action="skip")] * 2 for r in guarded}
    steps = {r.run_id: 1000 for r in records}
    comparisons = guard_comparisons(records, interventions, steps, reps=200)
    claims = audit_claims(_summary(records, comparisons), None, reps=100)
    (g,) = claims.guards
    assert (g.collapse.k, g.collapse_unguarded.k, g.n_runs) == (1, 5, 5)
    assert any("5 guarded runs are left out of claims 1 and 2" in n for n in claims.notes)
    text = claims_markdown(claims)
    assert "### In practice: what a guard saved" in text
    row = next(line for line in text.splitlines() if "zclip:escalate" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:7] == [
        "lr_spike×10 ramp",
        "zclip:escalate",
        "1/5 vs 5/5",
        "1/5 vs 5/5",
        "2.0",
        "0.2%",
    ]
    assert cells[7].startswith("400 [")  # IQM 102 guarded − IQM −298 unguarded
    # No guards axis, no table.
    assert "what a guard saved" not in claims_markdown(audit_claims(_summary(plain), None, reps=50))


def test_the_most_robust_level_is_one_that_ran(runs: list[RunRecord]) -> None:
    runs = [r for r in runs if r.knobs["ent_coef"] == 0.0 or r.is_baseline]
    claims = audit_claims(_summary(runs), None, reps=100)
    (robust,) = claims.robustness
    assert robust.n_runs == [5, 0] and robust.most_robust == 0.0


class _Store:
    """The one store read `stochasticity_axes` makes: a run's `ent_coef` telemetry column."""

    def __init__(self, temperature: dict[str, list[float]]) -> None:
        self.temperature = temperature

    def table(self, run_id: str, name: str, columns: list[str] | None = None) -> Any:
        import pandas as pd

        assert name == "telemetry" and columns == ["ent_coef"]
        return pd.DataFrame({"ent_coef": np.asarray(self.temperature.get(run_id, []), float)})


def test_a_learned_temperature_is_placed_by_what_the_runs_used() -> None:
    runs = [_run(0, "auto", "none", False, 1.0, 0.9), _run(1, 0.01, "none", False, 1.0, 0.9)]
    runs.append(_run(2, 0.5, "none", False, 1.0, 0.9))
    (axis,) = stochasticity_axes(runs, _Store({"r0": [0.2, 0.1]}))  # type: ignore[arg-type]
    assert axis.levels == (0.01, "auto", 0.5)
    assert axis.orders[1] == pytest.approx(0.15)
    assert "mean temperature of 0.15" in axis.note
    # Without telemetry the order is unknown, and claim 2 is not judged on it.
    (unknown,) = stochasticity_axes(runs, None)
    assert None in unknown.orders and "no known order" in unknown.note


def test_a_guards_difference_keeps_the_decimals_of_its_scale() -> None:
    from stabilitybench.findings.printing import _ci, _digits

    # A return difference of hundreds, a loss difference of nats, and one of hundredths.
    assert _ci(400.4, [210.2, 611.9], _digits([400.4, 210.2, 611.9])) == "400 [210, 612]"
    assert _ci(2.449, [1.342, 3.838], _digits([2.449, 1.342, 3.838])) == "2.45 [1.34, 3.84]"
    assert _ci(0.0023, [-0.0253, 0.0298], _digits([0.0023, -0.0253, 0.0298])) == (
        "0.002 [-0.025, 0.030]"
    )


def _null_audit(rng: np.random.Generator, seeds: int = 10) -> list[RunRecord]:
    """Runs with no effect of anything: each run's collapse, final performance and stability
    drawn at random, whatever its level or arm."""
    out, i = [], 0
    for noise in (0.0, 0.01):
        for perturbation in ("none", "sham(at=0.3)", "lr_spike(at=0.3,factor=10)"):
            for seed in range(seeds):
                collapsed = bool(rng.random() < 0.4) and perturbation != "none"
                run = _run(i, noise, perturbation, collapsed, float(rng.normal()), rng.random())
                out.append(replace(run, seed=seed))
                i += 1
    return out


def test_the_rules_rarely_say_supported_when_nothing_has_an_effect() -> None:
    rng = np.random.default_rng(7)
    supported = {"1": 0, "2": 0}
    for _ in range(200):
        claims = audit_claims(
            _summary(_null_audit(rng)), None, reps=200, seed=int(rng.integers(1e9))
        )
        (d,), (b,) = claims.decoupling, claims.buffering
        supported["1"] += d.verdict.verdict == SUPPORTED
        supported["2"] += b.verdict.verdict == SUPPORTED
    assert supported["1"] <= 10 and supported["2"] <= 10, supported  # at most 5 % of 200 draws
