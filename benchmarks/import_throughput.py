"""Import throughput and peak memory for a long TensorBoard log, beside EventAccumulator.

Writes one TensorBoard run of `--steps` optimizer steps with `torch.utils.tensorboard.
SummaryWriter` (per step: train/loss, train/grad_norm, train/learning_rate, two extra tags;
eval/loss every 1,000 steps; the HF Trainer's tag names), then, in fresh processes and
interleaved A, B, A, B, … so machine load affects both alike:

- A: `stabilitybench import` of the folder (streamed to Parquet, pivoted by DuckDB);
- B: TensorBoard's `EventAccumulator` with `size_guidance={scalars: 0}` (keep every scalar,
  the only way it does not subsample) and a pandas pivot of its scalars — what one would write
  by hand to get the same table.

Each process reports its wall time and peak RSS (`ru_maxrss`); medians are printed, and a
process that only imports the same modules gives the baseline RSS (both kinds of process
import them, so the RSS above that baseline is what reading the log costs). `--steps` also takes a
list (e.g. `25000,100000`) to show how peak memory grows (or not) with the log's length.
Run: `.venv/bin/python benchmarks/import_throughput.py` (add `--steps 25000,100000,1000000`
for the million-step check).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _record import record

CHILD_IMPORT = r"""
import json, resource, sys, time
from io import StringIO
from rich.console import Console
import stabilitybench.importers, stabilitybench.importers.build, duckdb, pyarrow.parquet
from tensorboard.backend.event_processing import event_file_loader
if sys.argv[1] == "baseline":
    pass
else:
    start = time.perf_counter()
    result = stabilitybench.importers.import_logs(sys.argv[2], sys.argv[3], console=Console(file=StringIO()))
    wall = time.perf_counter() - start
    rows = result.runs[0].telemetry_rows
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "wall_s": None if sys.argv[1] == "baseline" else wall,
                  "rows": None if sys.argv[1] == "baseline" else rows}))
"""

CHILD_ACCUMULATOR = r"""
import json, resource, sys, time
import pandas as pd
# the same modules as the import process, so both start from the same baseline RSS
import stabilitybench.importers, stabilitybench.importers.build, duckdb, pyarrow.parquet
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator, SCALARS
start = time.perf_counter()
acc = EventAccumulator(sys.argv[2], size_guidance={SCALARS: 0})
acc.Reload()
columns = {}
for tag in acc.Tags()["scalars"]:
    events = acc.Scalars(tag)
    columns[tag] = pd.Series([e.value for e in events], index=[e.step for e in events])
table = pd.DataFrame(columns).sort_index()
wall = time.perf_counter() - start
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "wall_s": wall, "rows": len(table)}))
"""


def write_log(folder: Path, steps: int) -> int:
    """One SummaryWriter run with HF Trainer tag names; returns the number of scalars."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder), max_queue=10_000, flush_secs=600)
    scalars = 0
    for step in range(1, steps + 1):
        loss = 2.0 * math.exp(-step / (steps / 5)) + 0.5
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("train/grad_norm", 1.0 + 0.1 * math.sin(step), step)
        writer.add_scalar("train/learning_rate", 3e-4, step)
        writer.add_scalar("train/epoch", step / 1000, step)
        writer.add_scalar("custom/tokens_per_s", 1e5 + step % 7, step)
        scalars += 5
        if step % 1000 == 0:
            writer.add_scalar("eval/loss", loss + 0.1, step)
            scalars += 1
    writer.close()
    return scalars


def run_child(code: str, *args: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", default="100000", help="steps of the log (comma list)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-baseline-b", action="store_true", help="skip EventAccumulator")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    figures: dict[str, Any] = {"logs": []}
    work = Path(tempfile.mkdtemp(prefix="sb-import-bench-"))
    try:
        base = run_child(CHILD_IMPORT, "baseline")
        print(f"baseline process (imports only): peak RSS {base['rss_mb']:.0f} MB")
        figures["baseline_rss_mb"] = base["rss_mb"]
        for steps in (int(s) for s in args.steps.split(",")):
            log = work / f"tb_{steps}"
            started = time.perf_counter()
            scalars = write_log(log / "run", steps)
            size = sum(p.stat().st_size for p in log.rglob("*tfevents*"))
            print(
                f"\n{steps:,} steps: {scalars:,} scalars, {size / 1e6:.1f} MB of event files "
                f"(written in {time.perf_counter() - started:.0f} s)"
            )
            results: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
            for rep in range(args.reps):
                out = work / f"audit_{steps}_{rep}"
                results["A"].append(run_child(CHILD_IMPORT, "import", str(log), str(out)))
                shutil.rmtree(out, ignore_errors=True)
                if not args.no_baseline_b:
                    results["B"].append(run_child(CHILD_ACCUMULATOR, "acc", str(log / "run")))
            log_figures: dict[str, Any] = {"steps": steps, "scalars": scalars, "mb": size / 1e6}
            figures["logs"].append(log_figures)
            for key, label in (
                ("A", "stabilitybench import"),
                ("B", "EventAccumulator(size_guidance=0) + pandas"),
            ):
                if not results[key]:
                    continue
                wall = statistics.median(r["wall_s"] for r in results[key])
                rss = statistics.median(r["rss_mb"] for r in results[key])
                rows = results[key][0]["rows"]
                log_figures["import" if key == "A" else "event_accumulator"] = {
                    "wall_s": wall,
                    "steps_per_s": steps / wall,
                    "scalars_per_s": scalars / wall,
                    "peak_rss_mb": rss,
                }
                print(
                    f"  {label:45s} {wall:6.1f} s  {steps / wall:9,.0f} steps/s  "
                    f"{scalars / wall:10,.0f} scalars/s  peak RSS {rss:6.0f} MB  ({rows:,} rows)"
                )
            if results["B"]:
                a = statistics.median(r["wall_s"] for r in results["A"])
                b = statistics.median(r["wall_s"] for r in results["B"])
                ra = statistics.median(r["rss_mb"] for r in results["A"])
                rb = statistics.median(r["rss_mb"] for r in results["B"])
                print(
                    f"  ratio import / EventAccumulator: time {a / b:.2f}x, "
                    f"peak RSS {ra / rb:.2f}x (above baseline: "
                    f"{(ra - base['rss_mb']) / max(rb - base['rss_mb'], 1e-9):.2f}x)"
                )
            shutil.rmtree(log, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record("import_throughput", figures, settings=vars(args), load_before=load_before)


if __name__ == "__main__":
    main()
