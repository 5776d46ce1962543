"""A guard that decides on the device vs one that reads each step back — side by side, interleaved.

    PYTHONPATH=src python benchmarks/guard_device.py [--size tiny] [--reps 3] [--steps 40]

On the LM workload's GPT-2 with AdamW (the loss and the pre-clip gradient norm logged before the
update, as the workload does for a device guard), for: no guard (the telemetry alone); `auto` +
skip and `olmo` + skip decided on the device (`protect(..., action="skip")`); and `auto` + skip
on the host (`on_device=False`, which reads every row back and keeps the skip buffer). Prints
ms per step and its ratio to the unguarded loop, the telemetry's read-backs per optimizer step,
and the bytes the guard holds: the device rule's history ring vs the host guard's copy of the
parameters and optimizer state. The workload's own loop reads the loss each step (its
`train_step` returns a float), so the read-backs counted here are the telemetry's and the guard's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch
from _record import record

import stabilitybench
from stabilitybench.guard.device import DeviceGuard
from stabilitybench.guard.masked import masked_step, params_norm, update_estimate
from stabilitybench.telemetry import Telemetry
from stabilitybench.workloads.lm import LMTrainer, _log_before_update, parse_config

VARIANTS: dict[str, dict[str, Any] | None] = {
    "unguarded": None,
    "auto+skip(on_device)": {"detector": "auto", "action": "skip", "on_device": True},
    "olmo+skip(on_device)": {"detector": "olmo", "action": "skip", "on_device": True},
    "auto+skip(host)": {"detector": "auto", "action": "skip", "on_device": False},
}


def trainer(size: str) -> LMTrainer:
    config = {
        "name": "bench",
        "kind": "lm",
        "size": size,
        "corpus": "shakespeare",
        "total_steps": 10_000,
        "eval": {"every": 10_000, "batches": 1},
        "knobs": {"grad_clip": 1.0},
    }
    return LMTrainer(parse_config(config), seed=0)


def run(size: str, guard: dict[str, Any] | None, steps: int) -> dict[str, float]:
    """Seconds per step, read-backs per step and the guard's bytes over `steps` measured steps."""
    t = trainer(size)
    tel = Telemetry(t.model, t.optimizer, flush_every=100)
    g = stabilitybench.protect(t.model, t.optimizer, telemetry=tel, **guard) if guard else None
    t.before_update = _log_before_update(tel)  # what the workload does for a device guard
    for _ in range(3):  # warm-up: Adam's state, the telemetry's buffers
        tel.log(loss=t.train_step())
        if g is not None:
            g.after_step()
    transfers = tel.transfers
    start = time.perf_counter()
    for _ in range(steps):
        tel.log(loss=t.train_step())
        if g is not None:
            g.after_step()
    elapsed = time.perf_counter() - start
    reads = tel.transfers - transfers
    held = 0.0
    if isinstance(g, DeviceGuard):
        held = g.rule.nbytes()
    elif g is not None:
        held = g.stats.undo_bytes
    if g is not None:
        g.close()
    tel.close(read_back=False)
    return {"seconds": elapsed / steps, "reads_per_step": reads / steps, "bytes": held}


def optimizer_ms(size: str, reps: int = 30) -> dict[str, float]:
    """ms per torch AdamW step vs per masked step + update estimate, on the same state."""
    t = trainer(size)
    t.train_step()  # Adam's state exists
    opt, keep, one = t.optimizer, torch.tensor(True), torch.tensor(1.0)
    params = [p for g in opt.param_groups for p in g["params"]]
    directions = masked_step(opt, keep, one)

    def timed(step: Any) -> float:
        step()
        start = time.perf_counter()
        for _ in range(reps):
            step()
        return 1e3 * (time.perf_counter() - start) / reps

    out: dict[str, list[float]] = {"torch_step": [], "masked_step": []}
    for _ in range(3):  # interleaved
        out["torch_step"].append(timed(opt.step))
        out["masked_step"].append(
            timed(lambda: update_estimate(opt, masked_step(opt, keep, one), params_norm(params)))
        )
    del directions
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    model = trainer(args.size).model
    n_params = sum(p.numel() for p in model.parameters())
    results: dict[str, list[dict[str, float]]] = {k: [] for k in VARIANTS}
    for _ in range(args.reps):  # interleaved: the machine is shared
        for name, guard in VARIANTS.items():
            results[name].append(run(args.size, guard, args.steps))
    base = statistics.median(r["seconds"] for r in results["unguarded"])
    figures: dict[str, Any] = {
        "parameters": n_params,
        "variants": {},
        "optimizer_ms": optimizer_ms(args.size),
    }
    print(f"model {args.size}: {n_params:,} parameters; {args.steps} steps x {args.reps} reps")
    for name, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        row = {
            "ms_per_step": 1e3 * seconds,
            "ratio": seconds / base,
            "reads_per_step": statistics.median(r["reads_per_step"] for r in runs),
            "guard_bytes": runs[-1]["bytes"],
        }
        figures["variants"][name] = row
        print(
            f"{name:>17}: {row['ms_per_step']:7.1f} ms/step  ratio {row['ratio']:.3f}  "
            f"read-backs/step {row['reads_per_step']:.2f}  guard holds "
            f"{row['guard_bytes'] / 2**20:.3f} MiB"
        )
    ms = figures["optimizer_ms"]
    print(
        f"AdamW step: torch {ms['torch_step']:.1f} ms, masked + estimate {ms['masked_step']:.1f} ms"
    )
    record("guard_device", figures, settings=vars(args), load_before=load_before)


if __name__ == "__main__":
    main()
