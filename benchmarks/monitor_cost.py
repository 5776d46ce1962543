"""Cost of the Meta-State Monitor: `monitor.step` per call, and fitting on 20 baseline runs.

Run: `.venv/bin/python benchmarks/monitor_cost.py` (one torch thread, synthetic telemetry with
the columns of the `cheap` probe preset: 20 runs × 2,000 optimizer steps).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import pandas as pd
import torch
from _record import record


def synthetic_run(seed: int, steps: int) -> pd.DataFrame:
    """Telemetry of a healthy run: decaying loss and gradient norm with noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    grad_norm = np.exp(-t / (steps / 3)) * (1 + 0.1 * rng.standard_normal(steps)) + 0.2
    loss = np.exp(-t / (steps / 4)) + 0.1 + 0.01 * rng.standard_normal(steps)
    cos = 0.3 + 0.05 * rng.standard_normal(steps)
    return pd.DataFrame(
        {
            "step": t,
            "loss": loss,
            "grad_norm": grad_norm,
            "grad_norm_max_layer": grad_norm / 2,
            "grad_cos_prev": cos,
            "grad_cos_ema": cos / 2,
            "update_norm": grad_norm * 1e-3,
            "update_ratio": grad_norm * 1e-4,
            "param_norm": 10 + 1e-3 * t,
            "lr": np.full(steps, 1e-3),
            "nonfinite_grads": np.zeros(steps),
        }
    )


class _Run:
    """The two attributes of RunData that `MetaStateMonitor.fit` reads."""

    def __init__(self, seed: int, telemetry: pd.DataFrame) -> None:
        self.seed, self.telemetry = seed, telemetry


def main() -> None:
    from stabilitybench.monitor.ssm import MetaStateMonitor

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    runs = [_Run(seed % 4, synthetic_run(seed, args.steps)) for seed in range(args.runs)]
    start = time.perf_counter()
    monitor = MetaStateMonitor(latent_dim=4, seed=0).fit(runs)
    fit_s = time.perf_counter() - start
    rows = synthetic_run(99, args.steps).to_dict("records")
    monitor.reset()
    timings = []
    for i in range(args.calls):
        row = rows[i % len(rows)]
        if i % len(rows) == 0:
            monitor.reset()
        t0 = time.perf_counter_ns()
        monitor.step(row)
        timings.append(time.perf_counter_ns() - t0)
    median_us = statistics.median(timings) / 1000
    print(
        f"fit: {args.runs} baseline runs x {args.steps} steps in {fit_s:.1f} s "
        f"({monitor.fit_info['epochs']} epochs, budget 60 s)"
    )
    print(
        f"monitor.step: median {median_us:.1f} us per call over {args.calls} calls (budget 200 us)"
    )
    figures = {
        "fit_s": fit_s,
        "fit_epochs": monitor.fit_info["epochs"],
        "step_median_us": median_us,
    }
    record("monitor_cost", figures, settings=vars(args), load_before=load_before)


if __name__ == "__main__":
    main()
