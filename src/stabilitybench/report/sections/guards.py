"""Guards: each guarded condition beside the same condition unguarded (`summary` → `guards`)."""

from __future__ import annotations

from stabilitybench.metrics.guards import GuardComparison, Level, Rate
from stabilitybench.report.data import ReportData, knob_text
from stabilitybench.report.markup import esc, fmt_number, fmt_rate, notice, table, with_interval

HEADERS = [
    ("workload", False),
    ("knobs", False),
    ("perturbation", False),
    ("guard", False),
    ("runs", True),
    ("collapsed [95% CI] guarded / unguarded", True),
    ("irreversible guarded / unguarded", True),
    ("interventions per run", True),
    ("extra compute", True),
    ("final perf IQM [95% CI] guarded / unguarded", True),
    ("final Δ [95% CI]", True),
    ("wall-time ratio", True),
]
EXPLANATION = (
    '<p class="muted">Each guarded condition beside the same workload, knobs and perturbation '
    "without a guard. Extra compute: updates the guard skipped or threw away by rolling back, "
    "over the steps trained. On unperturbed conditions every intervention is a false one: "
    "its count and cost are the price of the guard on healthy training. Final Δ: IQM of final "
    "performance guarded − unguarded, with a bootstrap CI over runs (a CI that holds 0: no "
    "difference seen). Intervention markers are drawn on the curves above.</p>"
)


def _rate(rate: Rate) -> str:
    return f"{rate.k}/{rate.n}" if rate.n else "–"


def _level(level: Level | None) -> str:
    return "–" if level is None else with_interval(level.value, level.ci)


def _row(g: GuardComparison) -> list[str]:
    interventions = fmt_number(g.interventions_per_run)
    if g.false_interventions_per_run is not None:
        interventions += " (false)"
    return [
        esc(g.workload),
        esc(knob_text(g.knobs)),
        esc(g.perturbation),
        esc(g.guard),
        esc(f"{g.n_runs} / {g.n_unguarded}"),
        esc(
            f"{with_interval(g.collapse.rate, g.collapse.ci, fmt_rate)} / "
            f"{with_interval(g.collapse_unguarded.rate, g.collapse_unguarded.ci, fmt_rate)}"
        ),
        esc(f"{_rate(g.irreversible)} / {_rate(g.irreversible_unguarded)}"),
        esc(interventions),
        esc(fmt_rate(g.extra_compute)),
        esc(f"{_level(g.final)} / {_level(g.final_unguarded)}"),
        esc(_level(g.final_difference)),
        esc(fmt_number(g.wall_time_ratio)),
    ]


def section_guards(data: ReportData) -> str:
    """The guard comparison, or nothing when the audit has no `guards:` axis."""
    if data.summary is None or not data.summary.guards:
        if any(r.guard != "none" for r in data.records):
            reason = data.summary_error or "no finished guarded runs"
            return '<h2 id="guards">Guards</h2>\n' + notice(f"No guard comparison: {esc(reason)}.")
        return ""
    order = sorted(
        data.summary.guards,
        key=lambda g: (g.workload, g.perturbation != "none", g.perturbation, g.guard),
    )
    return "\n".join(
        ['<h2 id="guards">Guards</h2>', table(HEADERS, [_row(g) for g in order]), EXPLANATION]
    )
