"""How far ahead of its confirming evaluation the dense signal times each collapse.

    python benchmarks/collapse_timing.py AUDIT_DIR [AUDIT_DIR ...]

For every collapsed run of the audits (finished runs only; an audit still running is read as it
stands): the collapse step the dense signal gives (`collapse_at`), the evaluation that confirmed
it (`collapse_eval_at`), the gap between them in optimizer steps and how it was timed; then per
workload, knob setting and perturbation the median gap. Reads the store only.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from statistics import median

from stabilitybench.metrics.records import RunRecord, audit_records
from stabilitybench.store import RunStore


def _condition(r: RunRecord, swept: set[str]) -> str:
    knobs = ", ".join(f"{k}={r.knobs[k]}" for k in sorted(swept) if k in r.knobs)
    return f"{r.workload} [{knobs}] {r.perturbation}"


def main(dirs: list[str]) -> None:
    for folder in dirs:
        records = [r for r in audit_records(RunStore.open(folder)) if r.done]
        swept = {
            k
            for k in {k for r in records for k in r.knobs}
            if len({str(r.knobs.get(k)) for r in records}) > 1
        }
        print(f"## {folder}: {len(records)} finished runs")
        groups: dict[str, list[RunRecord]] = defaultdict(list)
        for r in records:
            groups[_condition(r, swept)].append(r)
        for name, runs in sorted(groups.items()):
            collapsed = [r for r in runs if r.collapse and r.collapse.collapsed]
            gaps = []
            for r in collapsed:
                c = r.collapse
                assert c is not None
                gap = None
                if c.collapse_at is not None and c.collapse_eval_at is not None:
                    gap = c.collapse_eval_at - c.collapse_at
                    gaps.append(gap)
                note = f"  ({c.collapse_timing_note})" if c.collapse_timing_note else ""
                print(
                    f"  seed {r.seed}: onset {r.onset.step}, dense {c.collapse_at}, "
                    f"evaluation {c.collapse_eval_at}, ahead by {gap}: {c.collapse_timing}{note}"
                )
            timings = defaultdict(int)
            for r in collapsed:
                assert r.collapse is not None
                timings[str(r.collapse.collapse_timing)] += 1
            ahead = (
                f"median {median(gaps):g} [{min(gaps)}, {max(gaps)}] steps ahead" if gaps else "-"
            )
            print(f"{name}: {len(collapsed)}/{len(runs)} collapsed; {dict(timings)}; {ahead}")


if __name__ == "__main__":
    main(sys.argv[1:])
