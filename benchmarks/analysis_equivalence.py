"""Compare a saved `summary --json` / `monitor evaluate --json` ("before") with today's output.

    python benchmarks/analysis_equivalence.py summary BEFORE.json AUDIT_DIR
    python benchmarks/analysis_equivalence.py evaluate BEFORE.json AUDIT_DIR [--refit]
    python benchmarks/analysis_equivalence.py findings BEFORE.json AUDIT_DIR

The "before" document comes from an older version of the package on the same audit folder
(`summary --json`, `monitor evaluate --json`, `findings --json`).
Today's document is computed in-process. Numbers must agree to 1e-9 (relative); lists of runs
and conditions are matched by identity, not position. A value that was a sentence before (a
figure that could not be estimated) matches a null today when the sentence is in the enclosing
object's `notes`. Keys only today are listed as additions; a key only before, or any other
difference, is a failure (exit 1). `--refit` refits the monitor first (scores.parquet).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

TOLERANCE = 1e-9
IDENTITY = {
    "runs": ("run_id",),
    "conditions": ("workload", "knobs", "perturbation"),
    "per_workload": ("workload",),
    "magnitude": ("workload", "perturbation_kind"),
    "knobs": ("workload", "knob"),
}


class Report:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.additions: set[str] = set()
        self.sentences: set[str] = set()


def _generic(path: str) -> str:
    """`runs[ab12].collapsed` → `runs[*].collapsed`, to list each kind of addition once."""
    out, depth = [], 0
    for ch in path:
        if ch == "[":
            depth += 1
            if depth == 1:
                out.append("[*]")
        elif ch == "]":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def _same_number(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=1e-12)


def compare(before: Any, after: Any, path: str, report: Report, notes: list[str]) -> None:
    if isinstance(before, dict) and isinstance(after, dict):
        inner = after.get("notes") if isinstance(after.get("notes"), list) else notes
        for key, value in before.items():
            if key not in after:
                report.failures.append(f"{path}.{key}: missing today")
            else:
                compare(value, after[key], f"{path}.{key}", report, inner)
        for key in after.keys() - before.keys():
            report.additions.add(_generic(f"{path}.{key}"))
    elif isinstance(before, list) and isinstance(after, list):
        _compare_lists(before, after, path, report, notes)
    elif isinstance(before, str) and after is None and before in notes:
        report.sentences.add(_generic(path))
    elif isinstance(before, bool) or isinstance(after, bool):
        if before is not after:
            report.failures.append(f"{path}: {before!r} before, {after!r} today")
    elif isinstance(before, int | float) and isinstance(after, int | float):
        if not _same_number(float(before), float(after)):
            report.failures.append(f"{path}: {before!r} before, {after!r} today")
    elif before != after:
        report.failures.append(f"{path}: {before!r} before, {after!r} today")


def _compare_lists(
    before: list[Any], after: list[Any], path: str, report: Report, notes: list[str]
) -> None:
    name = path.rsplit(".", 1)[-1]
    keys = IDENTITY.get(name)
    if keys and all(isinstance(x, dict) for x in before + after):
        index = {json.dumps([x.get(k) for k in keys], sort_keys=True): x for x in after}
        if len(before) != len(after):
            report.failures.append(f"{path}: {len(before)} items before, {len(after)} today")
        for item in before:
            ident = json.dumps([item.get(k) for k in keys], sort_keys=True)
            if ident not in index:
                report.failures.append(f"{path}[{ident}]: missing today")
            else:
                compare(item, index[ident], f"{path}[{ident}]", report, notes)
        return
    if len(before) != len(after):
        report.failures.append(f"{path}: {len(before)} items before, {len(after)} today")
        return
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        compare(b, a, f"{path}[{i}]", report, notes)


def current(what: str, audit: Path, refit: bool) -> Any:
    from stabilitybench.analysis import analyse
    from stabilitybench.metrics.serialize import to_jsonable
    from stabilitybench.store import RunStore

    store = RunStore.open(audit)
    if refit:
        from stabilitybench.evaluation.fitting import fit_audit

        fit_audit(store)
    if what == "summary":
        return to_jsonable(analyse(store).summary)
    if what == "findings":
        return to_jsonable(analyse(store).claims)
    return to_jsonable(analyse(store, evaluation="fresh").evaluation)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("summary", "evaluate", "findings"))
    parser.add_argument("before", type=Path)
    parser.add_argument("audit", type=Path)
    parser.add_argument("--refit", action="store_true", help="refit the monitor first")
    args = parser.parse_args()
    before = json.loads(args.before.read_text(encoding="utf-8"))
    after = current(args.what, args.audit, args.refit)
    report = Report()
    compare(before, after, args.what, report, [])
    print(f"{args.what} of {args.audit}: compared with {args.before}")
    for text in sorted(report.sentences):
        print(f"  sentence → null + note: {text}")
    for text in sorted(report.additions):
        print(f"  added today: {text}")
    for text in report.failures:
        print(f"  DIFFERENT: {text}")
    print("  SAME VALUES" if not report.failures else f"  {len(report.failures)} difference(s)")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
