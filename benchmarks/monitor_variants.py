"""Meta-State Monitor variants measured with the real protocol (`monitor fit` + `evaluate`).

Each audit given is copied to a temporary folder (its `monitor/` and every run's scores are
rewritten there, never in the folder given); for each variant the real `fit_audit` runs with the
variant's `MonitorConfig` options, then `evaluate_audit` at the given horizon and false-alarm
target. Printed per audit, workload and variant: the msm's event recall, median lead, false
alarms per 1k steps on held-out healthy runs and on runs that did not collapse, and the step
AUROC with its bootstrap CI; the guards' recall/lead/AUROC for comparison. `--json PATH` writes
every number.

    PYTHONPATH=src python benchmarks/monitor_variants.py /work/runs/lm_buildup \
        /work/runs/rl_buildup --variants default,change --json /tmp/variants.json

Cost: a fit + evaluate takes about 30 s on lm_buildup, 6 min on rl_buildup's PPO runs (3,200
rows each) and 2 min on the quickstart, on 2 loaded cores; pick variants with `--variants`.

An audit still being written (runs without `"status": "done"` in run.json) is copied without
its unfinished runs; `AUDIT@SUBSTRING` keeps only the runs of that audit's workloads whose name
contains SUBSTRING (`/work/runs/rl_buildup@ppo`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# name → MonitorConfig options (fit_audit's `monitor_options`). "default" is today's default.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "no_param_norm": {"exclude_features": ["param_norm"]},
    "change": {"feature_view": "change"},
    "level+change": {"feature_view": "level+change"},
    "change_ema0.3": {"feature_view": "change", "ema": 0.3},
    "change_features_only": {"feature_view": "change", "terms": ["features"]},
    "change_no_param_norm": {"feature_view": "change", "exclude_features": ["param_norm"]},
    "change_features_no_param_norm": {
        "feature_view": "change",
        "terms": ["features"],
        "exclude_features": ["param_norm"],
    },
    "rise": {"relative": True},
    "change_features_rise": {"feature_view": "change", "terms": ["features"], "relative": True},
    "change32_features_no_param_norm": {
        "feature_view": "change",
        "change_window": 32,
        "terms": ["features"],
        "exclude_features": ["param_norm"],
    },
}
GUARDS = ("ews", "megatron", "zclip", "olmo", "lightning", "adam_rms", "eos", "pca")


def copy_audit(source: Path, target: Path, workload: str | None) -> int:
    """Copy the audit's audit.json and its finished runs (no monitor/); returns runs copied."""
    target.mkdir(parents=True)
    for name in ("audit.json",):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    copied = 0
    for run in sorted((source / "runs").iterdir()):
        info_path = run / "run.json"
        if not info_path.is_file():
            continue
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if info.get("status") != "done":
            continue
        if workload and workload not in str(info.get("workload", "")):
            continue
        shutil.copytree(run, target / "runs" / run.name, ignore=shutil.ignore_patterns("scores*"))
        copied += 1
    return copied


def measure(audit: Path, options: dict[str, Any], horizon: int, target: float) -> dict[str, Any]:
    from stabilitybench.evaluation.evaluate import evaluate_audit, fit_audit
    from stabilitybench.metrics.serialize import to_jsonable
    from stabilitybench.store import RunStore

    shutil.rmtree(audit / "monitor", ignore_errors=True)
    store = RunStore.open(audit)
    started = time.perf_counter()
    fit = fit_audit(store, latent_dim=4, seed=0, monitor_options=options)
    result = to_jsonable(evaluate_audit(store, target_false_alarms=target, horizon=horizon))
    out: dict[str, Any] = {"wall_s": time.perf_counter() - started, "workloads": {}}
    for name, entry in result["workloads"].items():
        detectors = entry["detectors"]
        row = {
            d: {
                k: detectors[d].get(k)
                for k in (
                    "event_recall",
                    "lead_time_median",
                    "false_alarms_per_1k",
                    "false_alarms_per_1k_not_collapsed",
                    "auroc",
                    "auroc_ci",
                )
            }
            for d in ("msm", *GUARDS)
            if d in detectors
        }
        features = fit["workloads"].get(name, {}).get("fit_info", {}).get("features", [])
        out["workloads"][name] = {
            "n_collapsed": entry.get("n_collapsed"),
            "n_not_collapsed": entry.get("n_not_collapsed"),
            "n_healthy": entry.get("n_healthy"),
            "features": features,
            "detectors": row,
        }
    return out


def _num(value: Any, fmt: str = ".2f") -> str:
    return "—" if value is None else format(value, fmt)


def line(variant: str, r: dict[str, Any]) -> str:
    ci = r.get("auroc_ci") or [None, None]
    return (
        f"{variant:22s} recall {_num(r['event_recall'])}  lead {_num(r['lead_time_median'], '.0f'):>4s}"
        f"  FA {_num(r['false_alarms_per_1k'])}  FA nc {_num(r['false_alarms_per_1k_not_collapsed'])}"
        f"  AUROC {_num(r['auroc'])} [{_num(ci[0])}, {_num(ci[1])}]"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audits", nargs="+", help="audit folders, optionally AUDIT@WORKLOAD")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--horizon", type=int, default=100)
    parser.add_argument("--target", type=float, default=1.0, help="false alarms per 1k steps")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    chosen = [v for v in args.variants.split(",") if v]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    import torch

    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sb-variants-") as tmp:
        for i, given in enumerate(args.audits):
            path, _, workload = given.partition("@")
            audit = Path(path)
            copy = Path(tmp) / f"{i}-{audit.name}"
            n = copy_audit(audit, copy, workload or None)
            print(f"== {given} ({n} finished runs)", flush=True)
            results[given] = {}
            for variant in chosen:
                found = measure(copy, VARIANTS[variant], args.horizon, args.target)
                results[given][variant] = {"options": VARIANTS[variant], **found}
                for workload, entry in found["workloads"].items():
                    print(f"  [{workload}] {line(variant, entry['detectors']['msm'])}", flush=True)
            last = results[given][chosen[-1]]["workloads"]
            for workload, entry in last.items():
                for guard in GUARDS:
                    if guard in entry["detectors"]:
                        print(f"  [{workload}] {line(guard, entry['detectors'][guard])}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
