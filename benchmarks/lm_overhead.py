"""Steps per second of the LM workload's training step with telemetry off and on, side by side.

The real workload step (sample a Shakespeare batch, forward, cross-entropy, backward, clip, AdamW,
LR schedule) on the tiny GPT-2 (4 layers, n_embd 128, byte vocabulary), batch 16, block 128.
Conditions are interleaved (off, on, off, on, …) on the same model so machine load affects both
alike; each repetition times `--steps` steps, and the medians are compared.
Run: `.venv/bin/python benchmarks/lm_overhead.py`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from _record import record

from stabilitybench.telemetry import Telemetry
from stabilitybench.workloads.lm import LMTrainer, parse_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--probes", default="cheap")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    settings = parse_config(
        {
            "name": "lm-overhead",
            "kind": "lm",
            "size": args.size,
            "corpus": "shakespeare",
            "total_steps": 100_000,
            "eval": {"every": 100_000, "batches": 1},
            "knobs": {"batch_size": 16, "block_size": 128},
        }
    )
    trainer = LMTrainer(settings, seed=0)
    for _ in range(3):  # warm-up
        trainer.train_step()
    seconds: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.reps):
        for condition in seconds:
            telemetry = (
                Telemetry(trainer.model, trainer.optimizer, probes=args.probes)
                if condition == "on"
                else None
            )
            start = time.perf_counter()
            for _ in range(args.steps):
                loss = trainer.train_step()
                if telemetry is not None:
                    telemetry.log(loss=loss)
            seconds[condition].append((time.perf_counter() - start) / args.steps)
            if telemetry is not None:
                telemetry.close()
    off, on = statistics.median(seconds["off"]), statistics.median(seconds["on"])
    # Each repetition's off and on blocks ran back to back: their ratio cancels slow drifts in load.
    paired = sorted(a / b for a, b in zip(seconds["off"], seconds["on"], strict=True))
    print(
        f"torch {torch.__version__}, 1 thread, GPT-2 {args.size} (byte vocab), batch 16, block 128; "
        f"{args.reps} interleaved repetitions of {args.steps} steps"
    )
    print(f"telemetry off: {1 / off:6.2f} steps/s ({off * 1e3:6.1f} ms/step, median)")
    print(f"telemetry on ({args.probes}): {1 / on:6.2f} steps/s ({on * 1e3:6.1f} ms/step, median)")
    print(
        f"steps/s on / off, paired per repetition: median {statistics.median(paired):.3f} "
        f"(quartiles {paired[len(paired) // 4]:.3f}-{paired[(3 * len(paired)) // 4]:.3f})"
    )
    figures = {
        "off_steps_per_s": 1 / off,
        "on_steps_per_s": 1 / on,
        "off_ms_per_step": off * 1e3,
        "on_ms_per_step": on * 1e3,
        "on_off_ratio": statistics.median(paired),
        "on_off_ratio_quartiles": [paired[len(paired) // 4], paired[(3 * len(paired)) // 4]],
    }
    record("lm_overhead", figures, settings=vars(args), load_before=load_before)


if __name__ == "__main__":
    main()
