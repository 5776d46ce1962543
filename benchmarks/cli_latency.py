"""How long the CLI's quick verbs take, end to end (a fresh Python process each time).

Each command runs as the `stabilitybench` console script does (`from stabilitybench.cli import
main; main()`), with `PYTHONPATH` pointing at one source tree. Given `--before SRC` (the `src/`
of an older checkout, e.g. from `git archive`), the old and the current tree are measured side
by side, interleaved (old, new, old, new, …) so that machine load affects both alike, and the
ratio of medians is printed.

Run: `.venv/bin/python benchmarks/cli_latency.py --repeats 15 [--before /tmp/sb-before/src]`
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _record import record

HERE = Path(__file__).resolve().parents[1] / "src"
ENTRY = "from stabilitybench.cli import main; main()"


def _fixtures(folder: Path) -> dict[str, list[str]]:
    """The commands measured, with the files they need written into `folder`."""
    bad = folder / "malformed.yaml"
    bad.write_text("name: x\nworkloads: [{name: t, kind: toy, total_steps: 5, epochs: 3}]\n")
    audit = folder / "audit"
    (audit / "runs" / "0123456789abcdef").mkdir(parents=True)
    (audit / "audit.json").write_text(json.dumps({"name": "bench"}))
    (audit / "runs" / "0123456789abcdef" / "run.json").write_text(
        json.dumps({"run_id": "0123456789abcdef", "status": "done"})
    )
    return {
        "--help": ["--help"],
        "--version": ["--version"],
        "malformed spec": ["audit", str(bad), "--out", str(folder / "out")],
        "status": ["status", str(audit)],
    }


def _time_once(src: Path, args: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds user + system) of one fresh process running the command."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", ENTRY, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--before", type=Path, help="src/ of an older checkout to compare with")
    options = parser.parse_args()
    trees = {"current": HERE}
    if options.before is not None:
        trees = {"before": options.before.resolve(), "current": HERE}
    with tempfile.TemporaryDirectory() as tmp:
        commands = _fixtures(Path(tmp))
        for args in commands.values():  # warm the OS file cache once per tree
            for src in trees.values():
                _time_once(src, args)
        load_before = os.getloadavg()[0]
        times: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _ in range(options.repeats):
            for name, args in commands.items():
                for tree, src in trees.items():
                    times.setdefault((name, tree), []).append(_time_once(src, args))
    print(f"median of {options.repeats} runs each (a fresh process each), interleaved")
    for index, what in enumerate(("wall time", "CPU time (user + system)")):
        header = f"{what:<26}" + "".join(f"{t:>10}" for t in trees)
        print(header + ("     ratio" if len(trees) > 1 else ""))
        for name in commands:
            medians = [statistics.median(x[index] for x in times[(name, t)]) for t in trees]
            row = f"  {name:<24}" + "".join(f"{m:>8.2f} s" for m in medians)
            if len(medians) > 1:
                row += f"   {medians[0] / medians[1]:>5.1f}×"
            print(row)
    print(
        f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, "
        f"on {os.cpu_count()} cores"
    )
    figures = {
        tree: {
            name: {
                "wall_s": statistics.median(x[0] for x in times[(name, tree)]),
                "cpu_s": statistics.median(x[1] for x in times[(name, tree)]),
            }
            for name in commands
        }
        for tree in trees
    }
    settings = {"repeats": options.repeats, "before": str(options.before or "") or None}
    record("cli_latency", figures, settings=settings, load_before=load_before)


if __name__ == "__main__":
    main()
