"""Peak meta-state deviation per perturbation magnitude of a fitted audit (does it saturate?).

    stabilitybench audit examples/toy_slow_buildup.yaml --out toy --workers 1
    stabilitybench monitor fit toy
    PYTHONPATH=src python benchmarks/msd_growth.py toy

Prints, per magnitude (0 = unperturbed), the median [min, max] over seeds of each run's peak
`msd` and `pca` score from its scores.parquet (leave-one-seed-out scores).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from stabilitybench.store import RunStore


def main(audit: str) -> int:
    store = RunStore.open(Path(audit))
    rows = []
    for run in store.iter_runs():
        if run.scores is None:
            continue
        params = (run.info.get("perturbation") or {}).get("params") or {}
        magnitude = next((v for v in params.values() if isinstance(v, int | float)), 0)
        if "at" in params:  # the first number that is not the onset
            magnitude = next(
                (v for k, v in params.items() if k not in {"at", "duration"}), magnitude
            )
        rows.append(
            {
                "magnitude": magnitude,
                "msd_peak": float(run.scores["msd"].max()),
                "pca_peak": float(run.scores["pca"].max()),
            }
        )
    table = pd.DataFrame(rows).groupby("magnitude").agg(["median", "min", "max"]).round(1)
    print(table.to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
