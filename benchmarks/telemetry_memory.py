"""Peak memory of a long run with telemetry streamed to the run store: bounded, not per row.

Trains a tiny model (Linear 8→1, SGD) for `--steps` optimizer steps with `Telemetry(probes=
"cheap")` and a `RunWriter` sink (rows read back every 100 steps and streamed to Parquet part
files; nothing kept in memory), and prints the resident set size (RSS) every tenth of the run.
The growth is the peak RSS over the whole run minus the RSS after the first `--warmup` steps.
`--keep-rows` keeps every row in memory as well (the default without a sink), for contrast.

    .venv/bin/python benchmarks/telemetry_memory.py                 # 1,000,000 steps
    .venv/bin/python benchmarks/telemetry_memory.py --steps 100000 --keep-rows
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from _record import record

from stabilitybench import Telemetry
from stabilitybench.store import RunStore


def rss_mib() -> float:
    """Current resident set size of this process (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--warmup", type=int, default=10_000)
    parser.add_argument("--keep-rows", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(32, 8)
    y = x.sum(dim=1, keepdim=True)
    with tempfile.TemporaryDirectory() as tmp:
        writer = RunStore(tmp).writer("run")
        writer.start({"run_id": "run"})
        tel = Telemetry(model, opt, sink=writer, keep_rows=args.keep_rows)
        start = time.perf_counter()
        base = peak = 0.0
        report_every = max(args.steps // 10, 1)
        for step in range(1, args.steps + 1):
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tel.log(loss=loss)
            if step == args.warmup:
                base = peak = rss_mib()
            if step % 1000 == 0 and step > args.warmup:
                peak = max(peak, rss_mib())
            if step % report_every == 0:
                print(
                    f"step {step:>9,}  RSS {rss_mib():7.1f} MiB  "
                    f"{(time.perf_counter() - start) / step * 1e3:.3f} ms/step",
                    flush=True,
                )
        train_s = time.perf_counter() - start
        close_start = time.perf_counter()
        tel.close(read_back=False)
        close_s = time.perf_counter() - close_start
        peak = max(peak, rss_mib())
        path = Path(tmp) / "runs" / "run" / "telemetry.parquet"
        meta = pq.ParquetFile(path).metadata
        print(
            f"{args.steps:,} steps, keep_rows={args.keep_rows}: RSS after {args.warmup:,} steps "
            f"{base:.1f} MiB, peak {peak:.1f} MiB (growth {peak - base:+.1f} MiB; ru_maxrss "
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB); "
            f"telemetry.parquet {meta.num_rows:,} rows in {meta.num_row_groups:,} row groups, "
            f"{path.stat().st_size / 2**20:.1f} MiB, written at close in {close_s:.1f} s"
        )
        figures = {
            "rss_after_warmup_mib": base,
            "rss_peak_mib": peak,
            "rss_growth_mib": peak - base,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "ms_per_step": train_s / args.steps * 1e3,
            "rows": meta.num_rows,
            "row_groups": meta.num_row_groups,
            "file_mib": path.stat().st_size / 2**20,
            "close_s": close_s,
        }
    name = "telemetry_memory_keep_rows" if args.keep_rows else "telemetry_memory"
    record(name, figures, settings=vars(args), load_before=load_before)


if __name__ == "__main__":
    main()
