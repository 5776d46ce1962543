"""Write a benchmark's figures to `benchmarks/results/<name>.json`, with where and when they came from.

The documentation renders its measured tables from these files at build time, so a figure in the
docs is always the one a script printed, with the machine, the commit and the date beside it.

    from _record import record
    record("lm_overhead", {"ratio": 0.965, ...}, settings={"reps": 25})
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """The machine a figure was measured on: platform, CPUs, Python and torch versions, load."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "load_average": round(os.getloadavg()[0], 2),
    }


def commit() -> dict[str, Any]:
    """The git commit of the tree that was measured, and whether its code had local changes."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    changed = git("status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks")
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(changed) if changed is not None else None,
    }


def record(
    name: str,
    figures: dict[str, Any],
    *,
    settings: dict[str, Any] | None = None,
    load_before: float | None = None,
) -> Path:
    """Write `figures` (plain JSON values) as `benchmarks/results/<name>.json`; return the path."""
    document = {
        "benchmark": name,
        "command": " ".join(["python", *[_relative(a) for a in sys.argv]]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": commit(),
        "machine": {**machine(), "load_average_before": _round(load_before)},
        "settings": settings or {},
        "figures": figures,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    os.replace(temporary, path)  # a killed run never leaves half a file
    print(f"wrote {path.relative_to(ROOT)}")
    return path


def _relative(arg: str) -> str:
    """The script's path relative to the repository root (as a reader would type it)."""
    path = Path(arg)
    if path.suffix == ".py" and path.exists():
        try:
            return str(path.resolve().relative_to(ROOT))
        except ValueError:
            return arg
    return arg


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
