"""What a guard costs per step: the skip buffer (device copy), a rollback snapshot (CPU copy),
and the per-step read-back the guard turns on — measured side by side, A/B interleaved.

    PYTHONPATH=src python benchmarks/guard_snapshot.py [--size tiny|small] [--reps 5] [--steps 40]

Prints, for the LM workload's GPT-2 model and AdamW: bytes of a snapshot, ms per skip-buffer
capture and per rollback snapshot, and the wall time of training steps unguarded vs guarded
(zclip + skip, zclip + rollback every 20, auto + skip, auto + escalate — what
`stabilitybench.protect` sets up) as ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from _record import record

from stabilitybench.guard import Guard
from stabilitybench.guard.snapshot import Snapshot, StepUndo
from stabilitybench.telemetry import Telemetry
from stabilitybench.workloads.lm import LMTrainer, parse_config


def trainer(size: str) -> LMTrainer:
    config = {
        "name": "bench",
        "kind": "lm",
        "size": size,
        "corpus": "shakespeare",
        "total_steps": 10_000,
        "eval": {"every": 10_000, "batches": 1},
        "knobs": {},
    }
    return LMTrainer(parse_config(config), seed=0)


def steps_time(size: str, guard: dict[str, object] | None, steps: int) -> float:
    t = trainer(size)
    tel = Telemetry(t.model, t.optimizer)
    g = Guard(tel, **guard) if guard else None  # type: ignore[arg-type]
    for _ in range(3):  # warm-up (Adam state created)
        loss = t.train_step()
        tel.log(loss=loss)
        if g:
            g.after_step()
    start = time.perf_counter()
    for _ in range(steps):
        loss = t.train_step()
        tel.log(loss=loss)
        if g:
            g.after_step()
    elapsed = time.perf_counter() - start
    tel.close()
    return elapsed / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    t = trainer(args.size)
    for _ in range(2):
        t.train_step()  # create the optimizer state
    n_params = sum(p.numel() for p in t.model.parameters())
    undo = StepUndo([t.optimizer])
    undo.capture(0)
    capture_ms, snapshot_ms = [], []
    for _ in range(20):
        start = time.perf_counter()
        undo.capture(1)
        capture_ms.append(1e3 * (time.perf_counter() - start))
        start = time.perf_counter()
        snap = Snapshot.take(1, t.model, [t.optimizer])
        snapshot_ms.append(1e3 * (time.perf_counter() - start))
    print(f"model {args.size}: {n_params:,} parameters, device {t.device}")
    print(
        f"skip buffer: {undo.nbytes() / 2**20:.2f} MiB (device), capture "
        f"{statistics.median(capture_ms):.2f} ms/step (median of 20)"
    )
    print(
        f"rollback snapshot: {snap.nbytes() / 2**20:.2f} MiB (CPU), take "
        f"{statistics.median(snapshot_ms):.2f} ms (median of 20)"
    )
    variants: dict[str, dict[str, object] | None] = {
        "unguarded": None,
        "zclip+skip": {"detector": "zclip", "action": "skip"},
        "zclip+rollback": {"detector": "zclip", "action": "rollback", "every": 20},
        "auto+skip": {"detector": "auto", "action": "skip"},
        "auto+escalate": {"detector": "auto", "action": "escalate"},
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.reps):  # A/B/C interleaved: the machine is shared
        for name, guard in variants.items():
            times[name].append(steps_time(args.size, guard, args.steps))
    base = statistics.median(times["unguarded"])
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:>15}: {1e3 * med:7.2f} ms/step  ratio {med / base:.3f}")
    figures = {
        "parameters": n_params,
        "skip_buffer_mib": undo.nbytes() / 2**20,
        "skip_capture_ms": statistics.median(capture_ms),
        "snapshot_mib": snap.nbytes() / 2**20,
        "snapshot_ms": statistics.median(snapshot_ms),
        "ms_per_step": {name: 1e3 * statistics.median(values) for name, values in times.items()},
        "ratio": {name: statistics.median(values) / base for name, values in times.items()},
    }
    record("guard_snapshot", figures, settings=vars(args), load_before=load_before)


if __name__ == "__main__":
    main()
