"""The paper's claims as markdown tables: `findings.md`, `stabilitybench findings` and the README."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from stabilitybench.findings.claims import (
    BufferingFinding,
    Claims,
    DecouplingFinding,
    WarningFinding,
)
from stabilitybench.metrics.guards import ON_TRIAL_CONDITION
from stabilitybench.metrics.summary_printing import knobs_text
from stabilitybench.settings import share_in_warning

CLAIMS = {
    "1": "high final performance is often decoupled from stability",
    "2": "controlled stochasticity buffers training",
    "3": "meta-state deviations precede collapse",
}


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ci(value: float | None, ci: Sequence[float | None], digits: int = 2) -> str:
    if value is None:
        return "–"
    low, high = ci
    if low is None or high is None:
        return _num(value, digits)
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _digits(values: Sequence[float | None]) -> int:
    """Decimals for numbers on the scale of `values`: none from 100, up to 3 below 1 (a return
    of hundreds, a loss difference of hundredths)."""
    scale = max((abs(v) for v in values if v is not None and math.isfinite(v)), default=0.0)
    return 0 if scale >= 100 else 1 if scale >= 10 else 2 if scale >= 1 else 3


def _count(k: int, n: int) -> str:
    return f"{k}/{n}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _swept(finding: DecouplingFinding) -> list[str]:
    keys = dict.fromkeys(k for r in finding.recipes for k in r.knobs)
    return [k for k in keys if len({str(r.knobs.get(k)) for r in finding.recipes}) > 1]


def _recipe(knobs: Mapping[str, Any] | None, swept: Sequence[str]) -> str:
    """The swept knobs of a recipe: `ent_coef=0.01`, or `–`."""
    return knobs_text({k: v for k, v in (knobs or {}).items() if k in swept})


def _claim1(items: Sequence[DecouplingFinding]) -> list[str]:
    lines = [f"### Claim 1 — {CLAIMS['1']}", ""]
    rows = []
    for f in items:
        swept = _swept(f)
        rows.append(
            [
                f.workload,
                str(f.n_runs),
                _ci(f.rho, f.rho_ci),
                _num(f.signal_p),
                _recipe(f.best_scoring, swept),
                _recipe(f.most_stable, swept),
                f"**{f.verdict.verdict}**",
            ]
        )
    lines += _table(
        [
            "workload",
            "runs",
            "ρ within perturbation [95% CI]",
            "signal p (conditions differ)",
            "best-scoring recipe",
            "most stable recipe",
            "verdict",
        ],
        rows,
    )
    rows = []
    for f in items:
        swept = _swept(f)
        for r in f.recipes:
            rows.append(
                [
                    f.workload,
                    _recipe(r.knobs, swept),
                    str(r.n_runs),
                    _ci(r.final_perf_iqm, r.final_perf_iqm_ci, 1),
                    _ci(r.stability_mean, r.stability_mean_ci),
                    _num(r.collapse_rate),
                ]
            )
    lines += _table(
        [
            "workload",
            "recipe",
            "runs",
            "final perf IQM [95% CI]",
            "stability before the end, mean [95% CI]",
            "collapse rate (perturbed)",
        ],
        rows,
    )
    return lines


def _claim2(items: Sequence[BufferingFinding]) -> list[str]:
    lines = [f"### Claim 2 — {CLAIMS['2']}", ""]
    rows = []
    for f in items:
        for level in f.levels:
            rows.append(
                [
                    f.workload,
                    f"{f.knob}={level.value}",
                    _count(level.n_collapsed, level.n_runs),
                    _ci(level.collapse_rate, level.collapse_rate_ci),
                    _count(level.n_recovered, level.n_collapsed),
                    _count(level.baseline_n_collapsed, level.baseline_n_runs),
                    _num(level.final_perf_iqm, 1),
                    _num(level.baseline_final_perf_iqm, 1),
                ]
            )
    lines += _table(
        [
            "workload",
            "level",
            "collapsed (perturbed runs)",
            "collapse rate [95% CI]",
            "recovered",
            "baselines collapsed",
            "final perf IQM, perturbed",
            "final perf IQM, baseline",
        ],
        rows,
    )
    rows = [
        [
            f.workload,
            f"{f.knob}: {f.least} → {f.most}",
            _ci(f.difference, f.difference_ci),
            _ci(f.excess_difference, f.excess_difference_ci)
            + (f" ({f.n_seeds} seeds, vs {f.control})" if f.control else ""),
            f"**{f.verdict.verdict}**",
        ]
        for f in items
    ]
    lines += _table(
        [
            "workload",
            "least → most stochastic",
            "collapse-rate difference [95% CI]",
            "excess over control, difference in differences [95% CI]",
            "verdict",
        ],
        rows,
    )
    lines += _per_perturbation(items)
    notes = [f"- {f.workload}: {f.order_note}" for f in items if f.order_note]
    return lines + ([*notes, ""] if notes else [])


def _per_perturbation(items: Sequence[BufferingFinding]) -> list[str]:
    """Claim 2's collapses per level, one row per perturbation."""
    rows = []
    for f in items:
        for p in f.per_perturbation:
            cells = ", ".join(
                f"{level.value}: {_count(k, n)}"
                for level, k, n in zip(f.levels, p.n_collapsed, p.n_runs, strict=True)
            )
            rows.append([f.workload, f.knob, p.name, cells])
    return _table(["workload", "knob", "perturbation", "collapsed per level"], rows)


def _detector_table(items: Sequence[WarningFinding]) -> list[str]:
    """Claim 3's per-detector table: recall beside chance and the clock, leads, false alarms."""
    rows = []
    for f in items:
        for d in f.detectors:
            rows.append(
                [
                    f.workload,
                    d.detector,
                    "–" if d.n_warned is None else _count(d.n_warned, d.n_collapses),
                    _ci(d.event_recall, d.event_recall_ci),
                    _num(d.chance_recall_p95),
                    _num(d.clock_recall),
                    _ci(d.lead_time_median, d.lead_time_iqr, 0),
                    _num(d.false_alarms_per_1k, 1),
                    _num(d.time_in_warning),
                    _num(d.false_alarms_per_1k_not_collapsed, 1),
                    _ci(d.auroc, d.auroc_ci),
                    _num(d.outcome_auroc),
                ]
            )
    return _table(
        [
            "workload",
            "detector",
            "warned",
            "recall [95% CI]",
            "chance p95",
            "clock",
            "lead, median [IQR]",
            "FA/1k healthy",
            "in warning, healthy",
            "FA/1k perturbed, not collapsed",
            "step AUROC [95% CI]",
            "outcome AUROC",
        ],
        rows,
    )


def _claim3(items: Sequence[WarningFinding], claims: Claims) -> list[str]:
    lines = [f"### Claim 3 — {CLAIMS['3']}", ""]
    if claims.horizon is None:
        return [*lines, "Not judged: the audit's detectors have not been evaluated.", ""]
    lines += [
        f"Alarm episodes, renewed every SOP = {claims.horizon} {claims.horizon_unit or 'steps'} "
        f"while they stay on; an alarm is true when the collapse starts SPH = {claims.sph} to "
        f"SPH + SOP steps after it; thresholds calibrated per workload on held-out healthy seeds "
        f"to {_num(claims.target_false_alarms_per_1k, 1)} false alarm per 1k steps{_share(claims)}. "
        "Beside each recall: chance (the 95th percentile of the recall of the detector's own "
        "alarms shifted at random) and the clock control: the best alarm schedule that knows "
        "only the onset of the run's perturbation (from a fixed delay, one alarm or more), "
        "matched per perturbation (not per dose) to the detector's false-alarm rate on the runs "
        "of that perturbation that did not collapse (it warns of every collapse of a "
        "perturbation none of whose runs escaped); `in warning, healthy` is the share of "
        "held-out healthy steps inside an alarm episode.",
        "",
    ]
    lines += _detector_table(items)
    rows = [
        [
            f.workload,
            f"{f.n_collapsed} / {f.n_not_collapsed} / {f.n_healthy}",
            f.best_auroc or "–",
            f"**{f.verdict.verdict}**: {f.verdict.reason}",
        ]
        for f in items
    ]
    lines += _table(
        ["workload", "collapsed / not / healthy runs", "best step AUROC", "verdict (msm)"], rows
    )
    return lines


def _share(claims: Claims) -> str:
    """What the target allows: each alarm renews every SOP steps, so a calibrated detector is in
    warning on at most target × SOP / 1,000 of the calibration steps."""
    if claims.target_false_alarms_per_1k is None or claims.horizon is None:
        return ""
    share = min(share_in_warning(claims.target_false_alarms_per_1k, claims.horizon), 1.0)
    return (
        f" (so on the runs it is calibrated on a detector is in warning at most {share:.0%} "
        "of the time)"
    )


def _practice(claims: Claims) -> list[str]:
    lines = ["### In practice: the most robust setting per perturbation", ""]
    rows = []
    for r in claims.robustness:
        cells = ", ".join(
            f"{level}: {k}/{n} (perf {_num(p, 0)})"
            for level, k, n, p in zip(
                r.levels, r.n_collapsed, r.n_runs, r.final_perf_iqm, strict=True
            )
        )
        best = "–" if r.knob is None else f"{r.knob}={r.most_robust}"
        rows.append([r.name, r.workload, cells, best])
    lines += _table(
        ["perturbation", "workload", "collapsed per level (final perf IQM)", "most robust"], rows
    )
    rows = [
        [
            t.workload,
            t.unit,
            str(t.n_runs),
            _num(t.median, 0),
            f"{_num(t.low, 0)}–{_num(t.high, 0)}",
        ]
        for t in claims.throughput
    ]
    lines += ["Throughput of this audit's runs (telemetry on, evaluations included):", ""]
    lines += _table(["workload", "unit", "runs", "median per second", "range"], rows)
    return lines + _guards(claims)


def _guards(claims: Claims) -> list[str]:
    """What each guard saved: its condition guarded beside the same condition unguarded."""
    if not claims.guards:
        return []
    lines = ["### In practice: what a guard saved", ""]
    rows = []
    order = sorted(
        claims.guards,
        key=lambda g: (g.workload, knobs_text(g.knobs), g.perturbation != "none", g.perturbation),
    )
    for g in order:
        difference = g.final_difference
        rows.append(
            [
                f"{g.workload} {knobs_text(g.knobs)}",
                ON_TRIAL_CONDITION
                if g.on_trial
                else claims.perturbation_names.get(g.perturbation, g.perturbation),
                g.guard,
                f"{_count(g.collapse.k, g.collapse.n)} vs {_count(g.collapse_unguarded.k, g.collapse_unguarded.n)}",
                f"{_count(g.irreversible.k, g.irreversible.n)} vs "
                f"{_count(g.irreversible_unguarded.k, g.irreversible_unguarded.n)}",
                _num(g.interventions_per_run, 1),
                "–" if g.extra_compute is None else f"{100 * g.extra_compute:.1f}%",
                "–"
                if difference is None
                else _ci(
                    difference.value,
                    difference.ci,
                    _digits([difference.value, *difference.ci]),
                ),
                _num(g.wall_time_ratio),
            ]
        )
    header = ["workload", "perturbation", "guard", "collapsed: guarded vs unguarded"]
    header += ["irreversible: guarded vs unguarded", "interventions per run", "extra compute"]
    header += ["final perf Δ (IQM, guarded − unguarded)", "wall ratio"]
    lines += _table(header, rows)
    lines += [
        "Interventions on unperturbed runs are false alarms acted on, except on a recipe on "
        "trial (a recipe that may diverge on its own); extra compute: updates "
        "skipped or rolled back per step trained; wall ratio: median guarded / unguarded wall "
        "time; 95% bootstrap CI on Δ.",
        "",
    ]
    return lines


def claims_markdown(claims: Claims) -> str:
    """The findings of one audit as markdown (what findings.md holds)."""
    lines = [f"## Findings: {claims.audit}", ""]
    verdicts: dict[str, dict[str, str]] = {}
    for f1 in claims.decoupling:
        verdicts.setdefault(f1.workload, {})["1"] = f1.verdict.verdict
    for f2 in claims.buffering:
        cell = verdicts.setdefault(f2.workload, {})
        cell["2"] = (cell["2"] + "; " if "2" in cell else "") + f"{f2.knob}: {f2.verdict.verdict}"
    for f3 in claims.warning:
        verdicts.setdefault(f3.workload, {})["3"] = f3.verdict.verdict
    rows = [[w] + [v.get(k, "–") for k in CLAIMS] for w, v in verdicts.items()]
    lines += _table(["workload"] + [f"claim {k}: {text}" for k, text in CLAIMS.items()], rows)
    lines += _claim1(claims.decoupling) + _claim2(claims.buffering)
    lines += _claim3(claims.warning, claims) + _practice(claims)
    lines += ["Verdict rules:", ""] + [f"{k}. {rule}" for k, rule in claims.rules.items()] + [""]
    lines += [f"- {note}" for note in claims.notes]
    return "\n".join(lines).rstrip() + "\n"


def verdict_table(claims: Claims) -> list[list[Any]]:
    """(workload, claim, verdict, reason) rows, for tests and quick checks."""
    out: list[list[Any]] = []
    for f1 in claims.decoupling:
        out.append([f1.workload, "1", f1.verdict.verdict, f1.verdict.reason])
    for f2 in claims.buffering:
        out.append([f2.workload, "2", f2.verdict.verdict, f2.verdict.reason])
    for f3 in claims.warning:
        out.append([f3.workload, "3", f3.verdict.verdict, f3.verdict.reason])
    return out
