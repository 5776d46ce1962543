"""Every detector's warning figures beside what no foresight scores, per audit and workload — the
tables the early-warning guide quotes.

    make demo   # audits/quickstart, the one audit folder it reads (the rest: results/)
    python benchmarks/warning_protocol.py audits/quickstart results/paper_lm_collapse ...

For each audit folder (or re-judgeable findings folder, evaluated in a scratch copy so that it
stays as committed) the evaluation is made afresh with the spec's warning settings: per workload
and detector, event recall beside its chance 95th percentile and the `clock` control at its
false-alarm rate on perturbed runs that did not collapse, the median lead, the false alarms per
1,000 steps on held-out healthy runs and on perturbed runs that did not collapse, the outcome
AUROC (collapsed vs not, by the score right after onset: where one audit holds doses of the same
ramp that do and do not collapse, this is what tells "sees a collapse coming" from "sees the
ramp"), claim 3's verdict, and how low-dimensional the healthy telemetry is. Writes
`benchmarks/results/warning_protocol.json` (keyed by the audit's name).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from _record import record

from stabilitybench.analysis import analyse
from stabilitybench.evaluation.results import Evaluation
from stabilitybench.findings.slim import working_copy
from stabilitybench.store import RunStore

FIELDS = (
    "event_recall",
    "n_collapses",
    "chance_recall",
    "chance_recall_p95",
    "clock_recall",
    "lead_time_median",
    "lead_time_iqr",
    "false_alarms_per_1k",
    "false_alarms_per_1k_not_collapsed",
    "time_in_warning",
    "auroc",
    "outcome_auroc",
    "outcome_auroc_doses",
)


def figures_of(evaluation: Evaluation, verdicts: dict[str, dict[str, str]]) -> dict[str, Any]:
    """One audit's figures per workload: settings, run counts, manifold, detectors, verdict."""
    out: dict[str, Any] = {}
    for name, entry in evaluation.workloads.items():
        manifold = entry.manifold
        out[name] = {
            "sph": entry.sph,
            "sop": entry.horizon,
            "target_false_alarms": entry.target_false_alarms_per_1k,
            "n_collapsed": entry.n_collapsed,
            "n_not_collapsed": entry.n_not_collapsed,
            "n_healthy": entry.n_healthy,
            "claim_3": verdicts.get(name),
            "manifold": None
            if manifold is None
            else {
                "n_features": manifold.n_features,
                "n_components_90": manifold.n_components_90,
                "subspace_ratio_median": manifold.subspace_ratio_median,
                "residual_ratio_median": manifold.residual_ratio_median,
                "residual_lead_median": manifold.residual_lead_median,
            },
            "detectors": {
                detector: {field: getattr(result, field) for field in FIELDS}
                for detector, result in entry.detectors.items()
            },
        }
    return out


def evaluate(folder: Path) -> tuple[str, dict[str, Any]]:
    """The audit's name and figures, from a fresh evaluation (a findings folder: in a copy)."""
    store = RunStore.open(folder)
    with tempfile.TemporaryDirectory() as scratch:
        if store.is_findings_folder:
            store = working_copy(folder, Path(scratch))
        analysis = analyse(store, evaluation="fresh")
    assert analysis.evaluation is not None
    verdicts = {
        w.workload: {"verdict": w.verdict.verdict, "reason": w.verdict.reason}
        for w in analysis.claims.warning
    }
    return analysis.summary.audit.name, figures_of(analysis.evaluation, verdicts)


def _print(audit: str, figures: dict[str, Any]) -> None:
    def f(value: float | None) -> str:
        return "   –" if value is None else f"{value:4.2f}"

    for workload, w in figures.items():
        print(
            f"{audit} / {workload} (SPH {w['sph']}, SOP {w['sop']}): {w['n_collapsed']} "
            f"collapsed, {w['n_not_collapsed']} not, {w['n_healthy']} healthy; claim 3: "
            f"{(w['claim_3'] or {}).get('verdict')}"
        )
        for name, d in w["detectors"].items():
            lead = d["lead_time_median"]
            print(
                f"    {name:10s} recall {f(d['event_recall'])}  chance p95 "
                f"{f(d['chance_recall_p95'])}  clock {f(d['clock_recall'])}  lead "
                f"{'–' if lead is None else round(lead)}  FA {f(d['false_alarms_per_1k'])}  "
                f"FA nc {f(d['false_alarms_per_1k_not_collapsed'])}  outcome "
                f"{f(d['outcome_auroc'])}  doses {f(d['outcome_auroc_doses'])}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audits", nargs="+", type=Path, help="audit or findings folders")
    args = parser.parse_args()
    figures: dict[str, Any] = {}
    for folder in args.audits:
        audit, found = evaluate(folder)
        figures[audit] = found
        _print(audit, found)
    record("warning_protocol", figures, settings={"audits": [str(a) for a in args.audits]})


if __name__ == "__main__":
    main()
