"""Audit runner scaling: 2 workers vs 1, orchestration overhead per run, Ray vs the local pool.

Usage: .venv/bin/python benchmarks/scaling.py [--steps 3000] [--skip-ray]

All three use the same 8-run toy grid (2 dropout levels × {none, lr_spike} × 2 seeds). Numbers
depend on what else the machine is doing: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from _record import record
from rich.console import Console

from stabilitybench.audit.runner import execute_plan, plan_audit
from stabilitybench.store import RunStore


def grid(steps: int) -> dict[str, Any]:
    """The 8-run toy grid; `steps` optimizer steps per run."""
    return {
        "name": "scaling",
        "seeds": [0, 1],
        "workloads": [
            {
                "name": "toy",
                "kind": "toy",
                "total_steps": steps,
                "eval": {"every": max(steps // 10, 1), "batches": 1},
                "knobs": {"dropout": [0.0, 0.1]},
            }
        ],
        "perturbations": ["none", {"kind": "lr_spike", "at": 0.5, "factor": 3, "duration": 5}],
    }


def run_grid(steps: int, backend: str, workers: int, root: Path) -> tuple[float, float]:
    """Run the grid in a new folder; return (audit wall seconds, sum of the runs' own wall_s)."""
    root.mkdir(parents=True, exist_ok=True)
    spec_path = root / f"{backend}-{workers}-{steps}.yaml"
    spec_path.write_text(yaml.safe_dump(grid(steps)))
    out = root / f"{backend}-{workers}-{steps}"
    plan = plan_audit(spec_path, out)
    start = time.perf_counter()
    counts = execute_plan(plan, backend=backend, workers=workers, console=Console(quiet=True))
    wall = time.perf_counter() - start
    assert counts["done"] == 8, counts
    runs_s = sum(float(i["wall_s"]) for i in RunStore(out).infos())
    return wall, runs_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps per toy run")
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    print(f"cores: {os.cpu_count()}, load average before: {load_before:.2f}")
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cold, _ = run_grid(
            1, "local", 1, root / "cold"
        )  # starts the fork server (once per process)
        print(f"first audit in this process (fork server start-up, 8 one-step runs): {cold:.2f} s")

        tiny_wall, tiny_runs = run_grid(1, "local", 1, root / "tiny")
        print(
            f"orchestration overhead per run (8 one-step runs, 1 worker): "
            f"{(tiny_wall - tiny_runs) / 8:.3f} s  (audit {tiny_wall:.2f} s, runs {tiny_runs:.2f} s)"
        )

        one, one_runs = run_grid(args.steps, "local", 1, root / "w1")
        two, _ = run_grid(args.steps, "local", 2, root / "w2")
        figures.update(
            first_audit_s=cold,
            overhead_per_run_s=(tiny_wall - tiny_runs) / 8,
            run_s=one_runs / 8,
            one_worker_s=one,
            two_workers_s=two,
            speedup=one / two,
            overhead_per_run_long_s=(one - one_runs) / 8,
        )
        print(f"8 runs × {args.steps} steps (≈{one_runs / 8:.1f} s each):")
        print(f"  local, 1 worker : {one:7.2f} s   overhead per run {(one - one_runs) / 8:.3f} s")
        print(f"  local, 2 workers: {two:7.2f} s   speed-up {one / two:.2f}×")
        if not args.skip_ray:
            ray_wall, _ = run_grid(args.steps, "ray", 2, root / "ray")
            figures.update(ray_s=ray_wall, ray_over_local=ray_wall / two)
            print(
                f"  ray,   2 workers: {ray_wall:7.2f} s   ray / local(2) = {ray_wall / two:.2f}× "
                "(includes starting and stopping a local Ray instance)"
            )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    record("scaling", figures, settings=vars(args), load_before=load_before)


if __name__ == "__main__":
    main()
