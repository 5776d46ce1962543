"""The cost of each build-up probe on the LM workload's real training step, side by side.

Conditions, interleaved in every repetition so machine load hits all alike: the `cheap` probes
alone (the baseline), `cheap` plus one build-up probe (`adam_rms`, `eos`, `layer_max`,
`attn_logits` on its every-10-steps schedule, and every step for the worst case), and the whole
`stability` preset. Tiny GPT-2 (4 layers, n_embd 128, byte vocabulary), batch 16, block 128;
1 thread. Each repetition times `--steps` steps per condition; the ratio reported is
(time/step with the probe) / (time/step with `cheap`), paired within a repetition, median and
quartiles over repetitions — for wall-clock time and for this process's CPU time
(`time.process_time`), which other processes on a loaded machine disturb far less.
Run: `.venv/bin/python benchmarks/stability_probes_cost.py`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch
from _record import record

from stabilitybench.telemetry import Telemetry
from stabilitybench.telemetry.stability_probes import AttentionLogits, close_probes
from stabilitybench.workloads.lm import LMTrainer, parse_config

CONDITIONS: dict[str, Any] = {
    "cheap": lambda: "cheap",
    "+adam_rms": lambda: ["cheap", "adam_rms"],
    "+eos": lambda: ["cheap", "eos"],
    "+layer_max": lambda: ["cheap", "layer_max"],
    "+attn_logits (every 10)": lambda: ["cheap", AttentionLogits(every=10)],
    "+attn_logits (every step)": lambda: ["cheap", AttentionLogits(every=1)],
    "stability preset": lambda: "stability",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    settings = parse_config(
        {
            "name": "probe-cost",
            "kind": "lm",
            "size": "tiny",
            "corpus": "shakespeare",
            "total_steps": 100_000,
            "eval": {"every": 100_000, "batches": 1},
            "knobs": {"batch_size": 16, "block_size": 128},
        }
    )
    trainer = LMTrainer(settings, seed=0)
    for _ in range(3):  # warm-up
        trainer.train_step()
    seconds: dict[str, list[float]] = {name: [] for name in CONDITIONS}
    cpu: dict[str, list[float]] = {name: [] for name in CONDITIONS}
    for _ in range(args.reps):
        for name, probes in CONDITIONS.items():
            telemetry = Telemetry(
                trainer.model, trainer.optimizer, probes=probes(), scheduled_every=10
            )
            trainer.train_step()  # the first step sets up probe state and hooks: not timed
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                telemetry.log(loss=trainer.train_step())
            seconds[name].append((time.perf_counter() - start) / args.steps)
            cpu[name].append((time.process_time() - start_cpu) / args.steps)
            telemetry.close()
            close_probes(telemetry.probes)
    print(
        f"torch {torch.__version__}, 1 thread, GPT-2 tiny (byte vocab), batch 16, block 128; "
        f"{args.reps} interleaved repetitions of {args.steps} steps per condition"
    )
    print(
        f"{'condition':28s} {'wall ms/step':>12s}  {'ratio (quartiles)':>22s}   "
        f"{'CPU ms/step':>11s}  {'ratio (quartiles)':>22s}"
    )
    figures: dict[str, dict[str, Any]] = {}
    for name in CONDITIONS:
        cells = []
        for clock, table in (("wall", seconds), ("cpu", cpu)):
            paired = sorted(v / b for v, b in zip(table[name], table["cheap"], strict=True))
            q1, q3 = paired[len(paired) // 4], paired[(3 * len(paired)) // 4]
            figures.setdefault(name, {})[clock] = {
                "ms_per_step": statistics.median(table[name]) * 1e3,
                "ratio": statistics.median(paired),
                "ratio_quartiles": [q1, q3],
            }
            cells.append(
                f"{statistics.median(table[name]) * 1e3:11.1f}  "
                f"{statistics.median(paired):8.3f} ({q1:.3f}-{q3:.3f})"
            )
        print(f"{name:28s} {cells[0]}   {cells[1]}")
    record("stability_probes_cost", figures, settings=vars(args), load_before=load_before)


if __name__ == "__main__":
    main()
