"""Steps per second of the RL workload with telemetry off and on, measured side by side.

Each repetition builds a fresh, identically seeded model for each mode and times only
`model.learn()`; the two modes alternate which one goes first, and the script prints the median
of the per-repetition ratios (on / off). Evaluation is not timed (it is the same in both modes).

    .venv/bin/python benchmarks/rl_overhead.py            # PPO CartPole + PPO HalfCheetah-v5
    .venv/bin/python benchmarks/rl_overhead.py --sac      # also SAC Pendulum-v1
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import torch

from stabilitybench.integrations.sb3 import StabilityCallback
from stabilitybench.workloads.rl import build_model, parse_config

CASES: dict[str, dict[str, Any]] = {
    "ppo-cartpole": {"algo": "ppo", "env": "CartPole-v1", "total_steps": 8192, "knobs": {}},
    "ppo-halfcheetah": {"algo": "ppo", "env": "HalfCheetah-v5", "total_steps": 8192, "knobs": {}},
    "sac-pendulum": {
        "algo": "sac",
        "env": "Pendulum-v1",
        "total_steps": 1100,
        "knobs": {"learning_starts": 100},
    },
}


def time_learn(case: dict[str, Any], telemetry: bool, seed: int) -> tuple[float, int]:
    """Env steps per second of one `learn()` call, and the optimizer steps telemetry saw."""
    settings = parse_config({"name": "bench", "kind": "rl", **case})
    model = build_model(settings, seed)
    callback = StabilityCallback() if telemetry else None
    start = time.perf_counter()
    model.learn(settings.total_steps, callback=callback)
    elapsed = time.perf_counter() - start
    rows = len(callback.close()) if callback is not None else 0
    return model.num_timesteps / elapsed, rows


def measure(name: str, reps: int) -> dict[str, float]:
    """Interleaved repetitions of off/on; median steps/s of each and median ratio on/off."""
    case = CASES[name]
    off, on, ratios = [], [], []
    rows = 0
    for rep in range(reps):
        order = (False, True) if rep % 2 == 0 else (True, False)
        result: dict[bool, float] = {}
        for telemetry in order:
            result[telemetry], seen = time_learn(case, telemetry, seed=rep)
            rows = max(rows, seen)
        off.append(result[False])
        on.append(result[True])
        ratios.append(result[True] / result[False])
    return {
        "off_sps": statistics.median(off),
        "on_sps": statistics.median(on),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "optimizer_steps": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions per case")
    parser.add_argument("--sac", action="store_true", help="also measure SAC on Pendulum-v1")
    parser.add_argument("--cases", nargs="*", default=None, help=f"subset of {', '.join(CASES)}")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.chdir(tempfile.mkdtemp())  # mujoco writes MUJOCO_LOG.TXT into the working directory
    names = args.cases or ["ppo-cartpole", "ppo-halfcheetah"] + (
        ["sac-pendulum"] if args.sac else []
    )
    print(f"torch {torch.__version__}, 1 thread, {args.reps} interleaved repetitions, median")
    print(
        f"{'case':<16} {'env steps':>9} {'opt steps':>9} {'off steps/s':>12} {'on steps/s':>11} "
        f"{'on/off':>7} {'range':>13}"
    )
    for name in names:
        r = measure(name, args.reps)
        print(
            f"{name:<16} {CASES[name]['total_steps']:>9} {r['optimizer_steps']:>9.0f} "
            f"{r['off_sps']:>12.0f} {r['on_sps']:>11.0f} {r['ratio']:>7.3f} "
            f"{r['ratio_min']:>6.3f}-{r['ratio_max']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
