"""Slowdown of SB3 training with `StabilityCallback` at its defaults and at every=1, side by side.

Each repetition builds a fresh, identically seeded model per condition and times only
`model.learn()`; conditions are interleaved (their order rotates each repetition) so that the
load of a shared machine hits all alike. Printed: the median over repetitions of each
condition's time / the time without telemetry — by wall clock and by this process's CPU time
(steadier when other processes compete for the cores) — and the spread of the wall ratios.

    .venv/bin/python benchmarks/rl_overhead.py            # PPO CartPole + PPO HalfCheetah-v5
    .venv/bin/python benchmarks/rl_overhead.py --sac      # also SAC Pendulum-v1
    .venv/bin/python benchmarks/rl_overhead.py --paper    # examples/paper_rl.yaml's recipes

Beside the ratios it prints env steps/s with and without telemetry (the paper audits' algorithms,
issue 16), from the same interleaved repetitions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from _record import record

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
PAPER_SPEC = Path(__file__).resolve().parents[1] / "examples" / "paper_rl.yaml"
PAPER_STEPS = {"ppo": 8192, "sac": 1100, "td3": 1100}  # shortened; SAC/TD3 learn from step 100


def paper_cases(path: Path = PAPER_SPEC) -> dict[str, dict[str, Any]]:
    """A spec's RL workloads (examples/paper_rl.yaml's by default), shortened, with each swept
    knob at its reference."""
    spec = yaml.safe_load(path.read_text())
    cases = {}
    for workload in spec["workloads"]:
        reference = workload.get("reference") or {}
        knobs = {
            k: reference.get(k, v[0]) if isinstance(v, list) else v
            for k, v in workload.get("knobs", {}).items()
        }
        if workload["algo"] != "ppo":
            knobs["learning_starts"] = 100
        cases[f"paper-{workload['name']}"] = {
            "algo": workload["algo"],
            "env": workload["env"],
            "total_steps": PAPER_STEPS[workload["algo"]],
            "knobs": knobs,
        }
    return cases


CASES.update(paper_cases())
PAPER = [name for name in CASES if name.startswith("paper-")]
CONDITIONS: dict[str, dict[str, Any] | None] = {
    "off": None,
    "defaults": {},  # StabilityCallback(): probes every 4th step, grad_norm_raw every step
    "every=1": {"every": 1},
}


def time_learn(
    case: dict[str, Any], kwargs: dict[str, Any] | None, seed: int
) -> tuple[float, float, int]:
    """Wall and CPU seconds of one `learn()` call, and the rows the telemetry recorded."""
    settings = parse_config({"name": "bench", "kind": "rl", **case})
    model = build_model(settings, seed)
    callback = StabilityCallback(**kwargs) if kwargs is not None else None
    wall, cpu = time.perf_counter(), time.process_time()
    model.learn(settings.total_steps, callback=callback)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rows = len(callback.close()) if callback is not None else 0
    return wall, cpu, rows


def measure(name: str, reps: int) -> dict[str, Any]:
    """Interleaved repetitions; per condition the median wall and CPU ratio to `off`."""
    case = CASES[name]
    names = list(CONDITIONS)
    wall: dict[str, list[float]] = {c: [] for c in names}
    cpu: dict[str, list[float]] = {c: [] for c in names}
    rows = 0
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for condition in order:
            w, c, seen = time_learn(case, CONDITIONS[condition], seed=rep)
            wall[condition].append(w)
            cpu[condition].append(c)
            rows = max(rows, seen)
    out: dict[str, Any] = {"rows": rows, "off_wall": statistics.median(wall["off"])}
    steps = case["total_steps"]
    out["steps_per_s"] = {c: steps / statistics.median(wall[c]) for c in names}
    for condition in names[1:]:
        w_ratios = [a / b for a, b in zip(wall[condition], wall["off"], strict=True)]
        c_ratios = [a / b for a, b in zip(cpu[condition], cpu["off"], strict=True)]
        out[condition] = (
            statistics.median(w_ratios),
            statistics.median(c_ratios),
            min(w_ratios),
            max(w_ratios),
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="interleaved repetitions per case")
    parser.add_argument("--sac", action="store_true", help="also measure SAC on Pendulum-v1")
    parser.add_argument("--paper", action="store_true", help=f"the cases {', '.join(PAPER)}")
    parser.add_argument("--cases", nargs="*", default=None, help=f"subset of {', '.join(CASES)}")
    parser.add_argument(
        "--spec",
        type=Path,
        default=None,
        help="an audit spec whose RL workloads to measure instead (e.g. examples/paper_rl_td3.yaml)",
    )
    args = parser.parse_args()
    if args.spec is not None:
        spec_cases = paper_cases(args.spec.resolve())
        CASES.update(spec_cases)
        args.cases = args.cases or list(spec_cases)
    torch.set_num_threads(1)
    os.chdir(tempfile.mkdtemp())  # mujoco writes MUJOCO_LOG.TXT into the working directory
    names = args.cases or (
        PAPER
        if args.paper
        else ["ppo-cartpole", "ppo-halfcheetah"] + (["sac-pendulum"] if args.sac else [])
    )
    load_before = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, 1 thread, {args.reps} interleaved repetitions, "
        f"load average {load_before:.1f} on {os.cpu_count()} cores at the start"
    )
    print(
        f"{'case':<16} {'env steps':>9} {'opt steps':>9} {'off s':>6} {'callback':>9} "
        f"{'wall x':>7} {'cpu x':>7} {'wall range':>13} {'steps/s off':>11} {'on':>7}"
    )
    cases: dict[str, Any] = {}
    for name in names:
        r = measure(name, args.reps)
        cases[name] = {
            "algo": CASES[name]["algo"],
            "env": CASES[name]["env"],
            "env_steps": CASES[name]["total_steps"],
            "optimizer_steps": r["rows"],
            "off_wall_s": r["off_wall"],
            "env_steps_per_s": r["steps_per_s"],
            "ratios": {
                condition: dict(
                    zip(("wall", "cpu", "wall_min", "wall_max"), r[condition], strict=True)
                )
                for condition in list(CONDITIONS)[1:]
            },
        }
        for condition in list(CONDITIONS)[1:]:
            w, c, lo, hi = r[condition]
            print(
                f"{name:<16} {CASES[name]['total_steps']:>9} {r['rows']:>9} "
                f"{r['off_wall']:>6.1f} {condition:>9} {w:>7.3f} {c:>7.3f} {lo:>6.3f}-{hi:.3f} "
                f"{r['steps_per_s']['off']:>11.0f} {r['steps_per_s'][condition]:>7.0f}",
                flush=True,
            )
    name = "rl_overhead_paper" if args.paper and not args.cases else "rl_overhead"
    if args.spec is not None:
        name = f"rl_overhead_{args.spec.stem}"
    settings = {**vars(args), "spec": None if args.spec is None else str(args.spec)}
    record(name, {"cases": cases}, settings=settings, load_before=load_before)


if __name__ == "__main__":
    main()
