"""How often the collapse criterion flags runs that nothing harmful happened to, per audit and
workload, beside the collapse rates it reports — the figures the metrics guide quotes.

    python benchmarks/collapse_labels.py audits/quickstart [results/paper_lm_collapse ...]

For each audit folder (or re-judgeable findings folder): per workload, the flag rate of sham and
unperturbed runs with its Wilson 95 % CI, the share of them judged at all (the rest: not learned
at onset, not testable, unconfirmed), why the others were not judged, and each perturbed
condition's collapse rate beside its excess over the sham arm, paired by seed. Writes
`benchmarks/results/collapse_labels.json` (figures keyed by the audit's name).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

from _record import record

from stabilitybench.metrics.summary import AuditSummary, summarize
from stabilitybench.store import RunStore


def figures_of(summary: AuditSummary) -> dict[str, Any]:
    """One audit's figures: per workload, the false-positive rate and the collapse rates."""
    out: dict[str, Any] = {}
    for item in summary.false_positives:
        controls = [
            r
            for r in summary.runs
            if r.workload == item.workload
            and r.done
            and r.guard == "none"
            and r.perturbation_kind in ("none", "sham")
        ]
        reasons = Counter(
            (r.collapse.reason or "").split(":")[0] if r.collapse else "no evaluation"
            for r in controls
            if r.collapsed is None
        )
        out[item.workload] = {
            "sham_flag_rate": item.sham_flag_rate,
            "sham_flag_rate_ci": item.sham_flag_rate_ci,
            "n_flagged": item.n_flagged,
            "n_judged": item.n_judged,
            "n_runs": item.n_runs,
            "share_judged": item.share_judged,
            "not_judged": dict(reasons),
            "conditions": [
                {
                    "perturbation": c.perturbation,
                    "knobs": dict(c.knobs),
                    "n_collapsed": c.n_collapsed,
                    "n_judged": c.n_judged,
                    "n_runs": c.n_runs,
                    "collapse_rate": c.collapse_rate,
                    "collapse_rate_ci": c.collapse_rate_ci,
                    "control": c.control,
                    "collapse_excess": c.collapse_excess,
                    "collapse_excess_ci": c.collapse_excess_ci,
                }
                for c in summary.conditions
                if c.workload == item.workload
                and c.guard == "none"
                and c.perturbation_kind not in ("none", "sham")
            ],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audits", nargs="+", type=Path, help="audit or findings folders")
    args = parser.parse_args()
    figures: dict[str, Any] = {}
    for folder in args.audits:
        summary = summarize(RunStore.open(folder))
        figures[summary.audit.name] = figures_of(summary)
        for workload, entry in figures[summary.audit.name].items():
            rate = entry["sham_flag_rate"]
            print(
                f"{summary.audit.name} / {workload}: criterion flags {entry['n_flagged']} of "
                f"{entry['n_judged']} judged sham/unperturbed runs"
                + (f" ({rate:.2f})" if rate is not None else "")
                + f"; {entry['n_judged']} of {entry['n_runs']} judged"
            )
            for c in entry["conditions"]:
                excess = c["collapse_excess"]
                print(
                    f"    {c['perturbation']}: {c['n_collapsed']}/{c['n_judged']} collapsed"
                    + (f", excess over {c['control']} {excess:+.2f}" if excess is not None else "")
                )
    flagged = sum(w["n_flagged"] for a in figures.values() for w in a.values())
    judged = sum(w["n_judged"] for a in figures.values() for w in a.values())
    print(f"all: criterion flags {flagged} of {judged} judged sham/unperturbed runs")
    record("collapse_labels", figures, settings={"audits": [str(a) for a in args.audits]})


if __name__ == "__main__":
    main()
