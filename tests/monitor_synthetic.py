"""Small synthetic audits for the monitor tests: healthy runs, and perturbed runs that collapse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stabilitybench.store import RunStore

TOTAL_STEPS = 200
ONSET = 80
EVAL_EVERY = 20


def synthetic_telemetry(
    seed: int, n: int = TOTAL_STEPS, drift_at: int | None = None, factor: float = 1.0
) -> pd.DataFrame:
    """A decaying loss and gradient norm with noise; after `drift_at` both grow towards `factor`×."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    loss = np.exp(-t / 60) + 0.1 + 0.01 * rng.standard_normal(n)
    grad_norm = np.exp(-t / 90) * (1 + 0.1 * rng.standard_normal(n)) + 0.2
    cos = 0.3 + 0.05 * rng.standard_normal(n)
    if drift_at is not None:
        ramp = np.ones(n)
        ramp[drift_at:] = np.linspace(1.0, factor, n - drift_at)
        loss, grad_norm = loss * ramp, grad_norm * ramp
        cos[drift_at:] -= 0.3 * (factor > 2)
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
            "param_norm": 10 + 0.01 * t,
            "lr": np.full(n, 1e-3),
            "nonfinite_grads": np.zeros(n),
        }
    )


def synthetic_evals(telemetry: pd.DataFrame) -> pd.DataFrame:
    """perf = −(loss at the evaluation step): at step 0, then after every EVAL_EVERY steps."""
    steps = [0, *range(EVAL_EVERY - 1, len(telemetry), EVAL_EVERY)]
    perf = [-float(telemetry["loss"].iloc[s]) for s in steps]
    return pd.DataFrame({"step": steps, "env_step": [None] * len(steps), "perf": perf})


def write_run(store: RunStore, run_id: str, seed: int, factor: float | None) -> None:
    """A done run; factor None is a baseline, otherwise a perturbed run drifting to factor×."""
    writer = store.writer(run_id)
    perturbation = (
        {"kind": "none"}
        if factor is None
        else {
            "kind": "lr_spike",
            "label": f"lr_spike(factor={factor})",
            "params": {"factor": factor},
        }
    )
    writer.start(
        {
            "run_id": run_id,
            "workload": "synth",
            "kind": "toy",
            "seed": seed,
            "perturbation": perturbation,
            "spec": {"collapse": {"threshold": 0.5, "recovery": 0.9}},
        }
    )
    tel = synthetic_telemetry(
        seed, drift_at=None if factor is None else ONSET, factor=factor or 1.0
    )
    writer.write_table("telemetry", tel)
    writer.write_table("evals", synthetic_evals(tel))
    writer.write_events(
        []
        if factor is None
        else [
            {
                "kind": "lr_spike",
                "name": "lr_spike",
                "dimension": "optimization",
                "params": {"factor": factor},
                "start_step": ONSET,
                "end_step": ONSET + 9,
                "start_env_step": None,
                "end_env_step": None,
            }
        ]
    )
    writer.finish({"final_perf": float(-tel["loss"].iloc[-1])})


def make_audit(
    root: Path,
    seeds: tuple[int, ...] = (0, 1, 2),
    factors: tuple[float | None, ...] = (None, 1.2, 20.0),
) -> RunStore:
    """An audit folder with one run per (seed, factor)."""
    store = RunStore(root)
    store.write_audit({"name": "synthetic", "collapse": {"threshold": 0.5, "recovery": 0.9}})
    for seed in seeds:
        for factor in factors:
            write_run(store, f"s{seed}-{factor}", seed, factor)
    return store
