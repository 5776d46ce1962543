"""Did any recipe of a sweep train and then diverge on its own? Per run of an audit (or its
findings folder) with no perturbation: where the validation loss was lowest, where it ended, how
much of its gain it gave back after that, whether the training loss went non-finite, and the
stability probes' attention- and output-logit maxima (`probes: stability`).

    python benchmarks/lm_intrinsic_sweep.py results/paper_lm_intrinsic
    python benchmarks/lm_intrinsic_sweep.py results/paper_lm_intrinsic_edge --name lm_intrinsic_edge

A run *trained, then diverged* when, after its validation loss went below its first evaluation,
its training loss went non-finite or its validation loss gave back more than half of its gain
(the `collapse:` threshold's 0.5: (final - best) > 0.5 * (first - best)); it *diverged from the
start* when it never went below its first evaluation and ended above it. A plain rule for a sweep
with one seed per recipe, where the calibrated criterion has no other seeds to measure
evaluation noise on. Per recipe, how many of its runs diverged, with a Wilson 95 % CI. Writes
`benchmarks/results/<--name>.json` (`lm_intrinsic_sweep` by default).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
from _record import record

from stabilitybench.metrics.intervals import wilson_interval
from stabilitybench.store import RunStore
from stabilitybench.types import RunStatus

GIVE_BACK = 0.5  # the share of its gain a run gives back to count as diverged (collapse threshold)
OUTCOMES = ("trained", "trained, then diverged", "diverged from the start", "did not learn")
DIVERGED = OUTCOMES[1:3]
RECIPE_KNOBS = ("lr", "qk_layernorm", "z_loss", "adam_beta2")


def _max(telemetry: Any, column: str) -> float | None:
    if column not in telemetry.columns:
        return None
    values = telemetry[column].dropna()
    return float(values.max()) if len(values) else None


def run_figures(store: RunStore, run_id: str) -> dict[str, Any]:
    """One finished run's sweep figures."""
    run = store.load(run_id)
    evals = run.evals
    val = evals["val_loss"].to_numpy(dtype=float)  # NaN: a non-finite validation loss
    val = np.where(np.isfinite(val), val, np.inf)
    steps = evals["step"].to_numpy()
    best = int(np.argmin(val))
    gain = val[0] - val[best]
    given_back = (val[-1] - val[best]) / gain if gain > 0 else None
    loss = run.telemetry["loss"].to_numpy(dtype=float)
    nonfinite = bool((~np.isfinite(loss)).any())
    return {
        "workload": run.info.workload,
        "knobs": {k: run.info.knobs.get(k) for k in RECIPE_KNOBS if k in run.info.knobs},
        "seed": run.info.seed,
        "first_val_loss": float(val[0]),
        "best_val_loss": float(val[best]),
        "best_step": int(steps[best]),
        "final_val_loss": float(val[-1]),
        "given_back": given_back,
        "nonfinite_loss": nonfinite,
        "outcome": _outcome(val, best, given_back, nonfinite),
        "attn_logit_max": _max(run.telemetry, "attn_logit_max"),
        "out_logit_max": _max(run.telemetry, "out_logit_max"),
    }


def by_recipe(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per recipe (workload and knobs): how many of its runs diverged, with a Wilson 95 % CI."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(f"{r['workload']} {sorted(r['knobs'].items())}", []).append(r)
    out = []
    for group in groups.values():
        diverged = sum(r["outcome"] in DIVERGED for r in group)
        low, high = wilson_interval(diverged, len(group))
        out.append(
            {
                "workload": group[0]["workload"],
                "knobs": group[0]["knobs"],
                "runs": len(group),
                "diverged": diverged,
                "after_training": sum(r["outcome"] == OUTCOMES[1] for r in group),
                "diverged_ci": [low, high],
                "seeds": [r["seed"] for r in group],
            }
        )
    return out


def _outcome(val: np.ndarray, best: int, given_back: float | None, nonfinite: bool) -> str:
    """`trained, then diverged` (gave back more than `GIVE_BACK` of its gain, or a non-finite
    loss after it had learned), `trained`, `diverged from the start` (never below its first
    evaluation, and ended above it or non-finite), `did not learn`."""
    if given_back is None:
        return "diverged from the start" if nonfinite or val[-1] > val[0] else "did not learn"
    return "trained, then diverged" if nonfinite or given_back > GIVE_BACK else "trained"


def _fmt(value: float | None, spec: str) -> str:
    return (
        "–"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an audit folder or its findings folder")
    parser.add_argument(
        "--name", default="lm_intrinsic_sweep", help="benchmarks/results/<name>.json to write"
    )
    args = parser.parse_args()
    store = RunStore.open(args.folder)
    runs = [
        run_figures(store, run_id)
        for run_id in store.run_ids()
        if store.info(run_id).status == RunStatus.DONE
    ]
    runs.sort(key=lambda r: (r["workload"], sorted(r["knobs"].items()), r["seed"]))
    print(
        f"{'workload':<28} {'lr':>5} {'seed':>4} {'first':>6} {'best':>6} {'at':>5} "
        f"{'final':>6} {'back':>6} {'attn max':>9} {'out max':>8}  outcome"
    )
    for r in runs:
        print(
            f"{r['workload']:<28} {r['knobs'].get('lr', '–'):>5} {r['seed']:>4} "
            f"{r['first_val_loss']:>6.2f} {r['best_val_loss']:>6.2f} {r['best_step']:>5} "
            f"{r['final_val_loss']:>6.2f} {_fmt(r['given_back'], '>6.1%')} "
            f"{_fmt(r['attn_logit_max'], '>9.3g')} {_fmt(r['out_logit_max'], '>8.3g')}  "
            f"{r['outcome']}"
        )
    outcomes = {o: sum(r["outcome"] == o for r in runs) for o in OUTCOMES}
    print(", ".join(f"{n} {o}" for o, n in outcomes.items()) + f" (of {len(runs)} runs)")
    recipes = by_recipe(runs)
    for recipe in recipes:
        low, high = recipe["diverged_ci"]
        print(
            f"{recipe['workload']} lr {recipe['knobs'].get('lr')}: {recipe['diverged']} of "
            f"{recipe['runs']} diverged (trained, then diverged, or from the start) "
            f"[{low:.2f}, {high:.2f}]"
        )
    record(
        args.name,
        {
            "audit": store.audit().name,
            "runs": runs,
            "outcomes": outcomes,
            "n_runs": len(runs),
            "recipes": recipes,
        },
        settings={"folder": str(args.folder), "give_back": GIVE_BACK},
    )


if __name__ == "__main__":
    main()
