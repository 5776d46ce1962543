"""How long the test suite takes: the fast suite (`make test`) and the slow one (`make test-slow`).

Each suite runs once, as its Makefile target runs it (pytest in a fresh process, from the
repository root), and its wall-clock time is recorded in `benchmarks/results/test_time.json`
with the machine, commit and date. A suite that fails records nothing: its time would not be
the time of the suite.

Run: `.venv/bin/python benchmarks/test_time.py` (minutes; on a quiet machine)
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from _record import record

ROOT = Path(__file__).resolve().parents[1]
SUITES = {  # the Makefile's `test` and `test-slow` commands
    "fast": ["-m", "not slow", "--timeout=900"],
    "slow": ["-m", "slow", "--timeout=900"],
}


def _run_suite(args: list[str]) -> tuple[float, int, str]:
    """(wall seconds, exit code, pytest's last line) of one pytest process over the suite."""
    command = [sys.executable, "-m", "pytest", "-q", *args]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return wall, done.returncode, lines[-1] if lines else done.stderr.strip()


def _count(outcome: str, last_line: str) -> int:
    """How many tests pytest's summary line reports with `outcome` (passed, skipped, …)."""
    found = re.search(rf"(\d+) {outcome}", last_line)
    return int(found.group(1)) if found else 0


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    load_before = os.getloadavg()[0]
    figures: dict[str, float | int] = {}
    for name, args in SUITES.items():
        wall, code, last_line = _run_suite(args)
        print(f"{name:<5} {wall:7.1f} s  {last_line}")
        if code != 0:
            sys.exit(f"the {name} suite failed (exit {code}); nothing recorded")
        figures[f"{name}_s"] = round(wall, 1)
        figures[f"{name}_passed"] = _count("passed", last_line)
        figures[f"{name}_skipped"] = _count("skipped", last_line)
    settings = {name: shlex.join(["pytest", "-q", *args]) for name, args in SUITES.items()}
    record("test_time", figures, settings=settings, load_before=load_before)


if __name__ == "__main__":
    main()
