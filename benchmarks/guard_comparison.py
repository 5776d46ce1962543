"""Guards side by side on the same runs: what each saves, what it costs, what it does to healthy runs.

    PYTHONPATH=src python benchmarks/guard_comparison.py results/lm_buildup_guards \
        results/paper_lm_ramp_guards results/quickstart_guards       # or audit folders

For each guarded audit or findings folder with its per-run data (a `guards:` axis with `none`
among it, e.g. examples/lm_buildup_guards.yaml),
per guard, from the audit's own summary (the calibrated collapse criterion, guarded beside the
same condition unguarded, seeds paired):

- under each perturbation that collapses the unguarded runs: irreversible collapses guarded vs
  unguarded (collapses, where no unguarded collapse could be shown irreversible: one at the
  run's last evaluations), the reduction (goal: at least 80 % fewer), interventions and updates
  lost per run, the final performance's difference;
- on healthy (unperturbed) runs: interventions per run (goal: 0), the wall-time ratio to the
  unguarded runs (goal: at most 1.10: the guard's extra compute) and the final performance's
  difference with its 95 % CI (goal: 0 inside it, performance unchanged).

Writes benchmarks/results/guard_comparison.json (the docs render it) and prints the table.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from _record import record

from stabilitybench.metrics.guards import ON_TRIAL_CONDITION, GuardComparison
from stabilitybench.metrics.summary import summarize
from stabilitybench.store import RunStore

GOALS = {"reduction": 0.8, "wall_ratio": 1.10, "healthy_interventions": 0.0}


def _rate(rate: Any) -> dict[str, Any]:
    return {"k": rate.k, "n": rate.n}


def _final(level: Any) -> dict[str, Any] | None:
    return None if level is None else {"value": level.value, "ci": level.ci, "n": level.n}


def guard_rows(audit: Path) -> list[dict[str, Any]]:
    """One row per guard of `audit`: its perturbed conditions and its healthy condition."""
    summary = summarize(RunStore.open(audit))
    rows: dict[str, dict[str, Any]] = {}
    for c in summary.guards:
        row = rows.setdefault(c.guard, {"audit": audit.name, "guard": c.guard, "perturbed": []})
        if c.false_interventions_per_run is not None:  # the unperturbed condition
            row["healthy"] = _healthy(c)
        elif c.collapse_unguarded.k > 0:
            row["perturbed"].append(_perturbed(c))
    return list(rows.values())


def _healthy(c: GuardComparison) -> dict[str, Any]:
    diff = c.final_difference
    unchanged = (
        diff is not None and None not in diff.ci and float(diff.ci[0]) <= 0.0 <= float(diff.ci[1])  # type: ignore[arg-type]
    )
    return {
        "runs": c.n_runs,
        "interventions_per_run": c.false_interventions_per_run,
        "wall_ratio": c.wall_time_ratio,
        "final_difference": _final(diff),
        "performance_unchanged": unchanged,
        "collapsed": _rate(c.irreversible),
    }


def _perturbed(c: GuardComparison) -> dict[str, Any]:
    """Irreversible collapses where the unguarded runs had any; else collapses (a run whose
    collapse comes at its last evaluations cannot be shown irreversible: lm_buildup's ramp)."""
    measure = "irreversible" if c.irreversible_unguarded.k > 0 else "collapse"
    guarded, plain = getattr(c, measure), getattr(c, f"{measure}_unguarded")
    guarded_rate = guarded.k / guarded.n if guarded.n else None
    reduction = None if guarded_rate is None else 1.0 - guarded_rate / (plain.k / plain.n)
    return {
        "perturbation": ON_TRIAL_CONDITION if c.on_trial else c.perturbation,
        "measure": measure,
        "collapsed": _rate(guarded),
        "collapsed_unguarded": _rate(plain),
        "reduction": reduction,
        "interventions_per_run": c.interventions_per_run,
        "updates_lost": c.extra_compute,
        "final_difference": _final(c.final_difference),
    }


def _verdicts(row: dict[str, Any]) -> dict[str, bool | None]:
    healthy = row.get("healthy") or {}
    reductions = [p["reduction"] for p in row["perturbed"] if p["reduction"] is not None]
    wall = healthy.get("wall_ratio")
    return {
        "fewer_collapses": min(reductions) >= GOALS["reduction"] if reductions else None,
        "extra_compute": None if wall is None else wall <= GOALS["wall_ratio"],
        "no_healthy_interventions": None
        if healthy.get("interventions_per_run") is None
        else healthy["interventions_per_run"] <= GOALS["healthy_interventions"],
        "performance_unchanged": healthy.get("performance_unchanged"),
    }


def _print(row: dict[str, Any]) -> None:
    healthy = row.get("healthy") or {}
    for p in row["perturbed"]:
        g, u = p["collapsed"], p["collapsed_unguarded"]
        reduction = "—" if p["reduction"] is None else f"{100 * p['reduction']:.0f} %"
        print(
            f"{row['audit']:>20} {row['guard']:>40} {p['perturbation'][:28]:>28}: {p['measure']} "
            f"{g['k']}/{g['n']} vs {u['k']}/{u['n']} unguarded ({reduction} fewer); "
            f"{p['interventions_per_run']:.1f} interventions/run, updates lost "
            f"{100 * (p['updates_lost'] or 0):.0f} %"
        )
    if healthy:
        diff = healthy["final_difference"] or {}
        print(
            f"{'':>20} {'':>40} {'healthy':>28}: {healthy['interventions_per_run']:.1f} "
            f"interventions/run, wall x{healthy['wall_ratio'] or float('nan'):.2f}, final "
            f"{diff.get('value')} CI {diff.get('ci')}"
        )
    print(f"{'':>20} {'':>40} {'goals':>28}: {row['verdicts']}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("audits", nargs="+", type=Path)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rows = []
    for audit in args.audits:
        for row in guard_rows(audit):
            row["verdicts"] = _verdicts(row)
            rows.append(row)
            _print(row)
    record(
        "guard_comparison",
        {"goals": GOALS, "guards": rows},
        settings={"audits": [a.name for a in args.audits]},
        load_before=load_before,
    )


if __name__ == "__main__":
    main()
