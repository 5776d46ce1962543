"""Model selection for the Meta-State Monitor on build-up audits, by the issue-12 targets.

For each workload of each audit: per held-out seed, the monitor (one GRU fit) and PCA are fitted
on the healthy runs of the other seeds; every run of the held-out seed is scored. Variants of the
MSD that differ only in which deviation terms they take the max of share that fit. The guards
score every run as they are. Per held-out seed, each detector's threshold is calibrated on the
other seeds' healthy runs for the target false-alarm rate. Then, per workload:

- event recall: collapsed runs with an alarm in [collapse − H, collapse),
- lead: collapse step − the first such alarm (median, IQR),
- false alarms per 1,000 steps on held-out healthy runs,
- step AUROC of "collapse within (t, t + H]" over every step before the collapse of every run
  (healthy, perturbed, knob runs), pooled within the workload only.

Collapse steps: the run's collapse evaluation (metrics.records), moved earlier to the first step
after the previous evaluation at which a dense signal (EMA of the training loss for LM, of the
training episodes' returns for RL) is below the collapse level; a non-finite loss is a collapse
at that step. This is this script's stand-in for the dense timing the collapse branch adds.

    PYTHONPATH=src python benchmarks/monitor_model_selection.py AUDIT [AUDIT ...] \\
        [--horizon 100] [--target 1.0] [--json out.json]

Reads the audit folders only (writes nothing into them).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stabilitybench.detectors.base import DetectorSettings, detector_classes
from stabilitybench.detectors.pca import PCADetector
from stabilitybench.evaluation.alarms import auroc
from stabilitybench.evaluation.fitting import is_healthy
from stabilitybench.metrics.alarms import alarm_events, calibrate_threshold
from stabilitybench.metrics.records import RunRecord, audit_records
from stabilitybench.monitor.ssm import DEFAULT_TERMS, TERMS, MetaStateMonitor
from stabilitybench.store import RunData, RunStore

VARIANTS: dict[str, tuple[str, ...]] = {
    "msm[prediction+features] (default)": DEFAULT_TERMS,
    "msm[latent+prediction+features]": TERMS,
    "msm[latent]": ("latent",),
    "msm[latent+prediction]": ("latent", "prediction"),
    "msm[features]": ("features",),
}
EMA_ALPHA = 0.1  # of the dense performance signal
INT_OPTIONS = {"hidden", "window", "batch_size", "max_epochs", "patience", "bins", "warmup_steps"}


@dataclass
class Scored:
    run: RunData
    record: RunRecord
    healthy: bool
    collapse: int | None  # optimizer step of the collapse, dense-timed; None: no collapse
    steps: np.ndarray
    scores: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return int(self.run.seed or 0)


def ema(values: np.ndarray, alpha: float = EMA_ALPHA) -> np.ndarray:
    """EMA over the finite entries, carried over missing ones (NaN before the first)."""
    out = np.full(len(values), np.nan)
    level = math.nan
    for i, v in enumerate(values):
        if math.isfinite(v):
            level = v if math.isnan(level) else (1 - alpha) * level + alpha * v
        out[i] = level
    return out


def dense_collapse(run: RunData, record: RunRecord) -> int | None:
    """The collapse step, dense-timed (see the module docstring); None without a collapse."""
    result = record.collapse
    if result is None or not result.collapsed or result.collapse_at is None:
        return None
    table = run.telemetry
    steps = table["step"].to_numpy(dtype=np.int64)
    at = int(result.collapse_at)
    if "loss" in table.columns and record.kind == "lm":
        loss = pd.to_numeric(table["loss"], errors="coerce").to_numpy(dtype=float)
        bad = np.nonzero(~np.isfinite(loss) & ~np.isnan(loss))[0]
        if bad.size and steps[bad[0]] <= at:
            return int(steps[bad[0]])
        signal = -ema(np.where(np.isfinite(loss), loss, np.nan))
    elif "episode_return" in table.columns:
        signal = ema(pd.to_numeric(table["episode_return"], errors="coerce").to_numpy(float))
    else:
        return at
    threshold = float(run.info.get("spec", {}).get("collapse", {}).get("threshold", 0.5))
    perf_0, perf_pre = result.perf_0, result.perf_pre
    if not (math.isfinite(perf_0) and math.isfinite(perf_pre)) or perf_pre == perf_0:
        return at
    level = perf_0 + threshold * (perf_pre - perf_0)
    evals = run.evals["step"].to_numpy(dtype=np.int64) if len(run.evals) else np.zeros(0, int)
    before = evals[evals < at]
    start = int(before.max()) + 1 if before.size else 0
    window = np.nonzero((steps >= start) & (steps <= at) & (signal < level))[0]
    return int(steps[window[0]]) if window.size else at


def smooth_max(columns: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    """The MSD of a term subset: EMA of the max of standardised terms (+inf passes through)."""
    raw = np.max(np.stack(columns), axis=0)
    out = np.zeros(len(raw))
    level: float | None = None
    for i, value in enumerate(raw):
        if not math.isfinite(value):
            out[i] = math.inf
            continue
        level = value if level is None else (1 - alpha) * level + alpha * value
        out[i] = level
    return out


def score_workload(
    group: list[Scored],
    settings: DetectorSettings,
    log: Any,
    options: dict[str, Any],
    emas: Sequence[float],
) -> list[str]:
    """Fill every run's `scores` (leave one seed out for the fitted ones); returns the names.
    `options`: MonitorConfig fields; `emas`: extra smoothing weights tried on the same fit."""
    names: list[str] = []
    guards = {n: c for n, c in detector_classes().items() if not c.fitted}
    for item in group:
        for name, cls in guards.items():
            item.scores[name] = cls.create(settings).score(item.run.telemetry)  # type: ignore[attr-defined]
    names.extend(guards)
    for held in sorted({g.seed for g in group}):
        train = [g.run for g in group if g.healthy and g.seed != held]
        if not train:
            continue
        started = time.perf_counter()
        monitor = MetaStateMonitor(latent_dim=settings.latent_dim, seed=settings.seed, **options)
        monitor.fit(train)
        pca = PCADetector(settings.latent_dim).fit(train)
        log(
            f"    seed {held}: fitted on {len(train)} runs in {time.perf_counter() - started:.0f} s"
        )
        for item in (g for g in group if g.seed == held):
            frame = monitor.score(item.run.telemetry)
            for variant, terms in VARIANTS.items():
                columns = [frame[f"msd_{t}"].to_numpy(dtype=float) for t in terms]
                item.scores[variant] = smooth_max(columns, monitor.config.ema)
                for alpha in emas:
                    item.scores[f"{variant} ema={alpha:g}"] = smooth_max(columns, alpha)
            item.scores["pca"] = pca.score(item.run.telemetry)
    names.extend(VARIANTS)
    names.extend(f"{v} ema={a:g}" for v in VARIANTS for a in emas)
    names.append("pca")
    return names


def evaluate(group: list[Scored], name: str, horizon: int, target: float) -> dict[str, Any]:
    """The issue-12 figures of one detector on one workload (see the module docstring)."""
    thresholds: dict[int, float] = {}
    for held in sorted({g.seed for g in group}):
        pool = [g.scores[name] for g in group if g.healthy and g.seed != held and name in g.scores]
        thresholds[held] = calibrate_threshold(pool, target) if pool else math.inf
    leads: list[int] = []
    collapsed = [g for g in group if g.collapse is not None and name in g.scores]
    for g in collapsed:
        flags = np.nan_to_num(g.scores[name], nan=-np.inf) >= thresholds[g.seed]
        window = (g.steps < g.collapse) & (g.steps >= g.collapse - horizon)  # type: ignore[operator]
        hits = np.nonzero(flags & window)[0]
        if hits.size:
            leads.append(int(g.collapse - g.steps[hits[0]]))  # type: ignore[operator]
    healthy = [g for g in group if g.healthy and name in g.scores]
    events = sum(int(alarm_events(g.scores[name], thresholds[g.seed]).sum()) for g in healthy)
    healthy_steps = sum(len(g.steps) for g in healthy)
    values, labels = [], []
    for g in group:
        if name not in g.scores:
            continue
        before = g.steps < g.collapse if g.collapse is not None else np.ones(len(g.steps), bool)
        label = (
            (g.collapse - g.steps <= horizon) & before
            if g.collapse is not None
            else np.zeros(len(g.steps), bool)
        )
        score = np.asarray(g.scores[name], dtype=float)[before]
        keep = ~np.isnan(score)
        values.append(score[keep])
        labels.append(label[before][keep])
    all_values, all_labels = np.concatenate(values), np.concatenate(labels)
    step_auroc = (
        auroc(all_values, all_labels) if all_labels.any() and not all_labels.all() else None
    )
    return {
        "event_recall": len(leads) / len(collapsed) if collapsed else None,
        "n_collapsed": len(collapsed),
        "lead_median": float(np.median(leads)) if leads else None,
        "lead_iqr": [float(np.percentile(leads, 25)), float(np.percentile(leads, 75))]
        if leads
        else None,
        "false_alarms_per_1k": 1000.0 * events / healthy_steps if healthy_steps else None,
        "step_auroc": step_auroc,
    }


def _peaks(group: list[Scored], names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per condition (knobs / perturbation, seeds pooled): the median peak score before any
    collapse, per detector — which conditions a detector finds far from healthy."""
    by: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for g in group:
        label = (g.record.label or "").rsplit("/seed", 1)[0]
        end = g.collapse if g.collapse is not None else int(g.steps.max()) + 1
        for name in names:
            if name in g.scores:
                values = np.asarray(g.scores[name], dtype=float)[g.steps < end]
                finite = values[np.isfinite(values)]
                if finite.size:
                    by[label][name].append(float(finite.max()))
    return {c: {n: float(np.median(v)) for n, v in d.items()} for c, d in sorted(by.items())}


def load(audit: Path) -> dict[str, list[Scored]]:
    store = RunStore.open(audit)
    records = {r.run_id: r for r in audit_records(store)}
    groups: dict[str, list[Scored]] = defaultdict(list)
    for run in store.iter_runs():
        if len(run.telemetry) == 0 or run.run_id not in records:
            continue
        record = records[run.run_id]
        steps = run.telemetry["step"].to_numpy(dtype=np.int64)
        groups[record.workload].append(
            Scored(run, record, is_healthy(run), dense_collapse(run, record), steps)
        )
    return groups


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, list):
        return f"[{value[0]:.0f}, {value[1]:.0f}]"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audits", nargs="+", type=Path)
    parser.add_argument("--horizon", type=int, default=100, help="H, optimizer steps")
    parser.add_argument("--target", type=float, default=1.0, help="false alarms per 1,000 steps")
    parser.add_argument("--latent-dim", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--option", action="append", default=[], help="MonitorConfig field, e.g. feature_floor=0.5"
    )
    parser.add_argument("--ema", type=float, action="append", default=[], help="extra EMA weights")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    settings = DetectorSettings(latent_dim=args.latent_dim)
    options = {k: float(v) for k, v in (o.split("=", 1) for o in args.option)}
    options = {k: int(v) if k in INT_OPTIONS else v for k, v in options.items()}
    out: dict[str, Any] = {
        "horizon": args.horizon,
        "target": args.target,
        "options": options,
        "workloads": {},
    }

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    for audit in args.audits:
        for workload, group in sorted(load(audit).items()):
            n_healthy = sum(g.healthy for g in group)
            n_collapsed = sum(g.collapse is not None for g in group)
            log(
                f"{audit.name}/{workload}: {len(group)} runs, {n_healthy} healthy, "
                f"{n_collapsed} collapsed"
            )
            if n_healthy < 2 or n_collapsed == 0:
                log("  skipped: needs >= 2 healthy runs and a collapse")
                continue
            names = score_workload(group, settings, log, options, args.ema)
            table = {n: evaluate(group, n, args.horizon, args.target) for n in names}
            out["workloads"][workload] = {
                "runs": len(group),
                "healthy": n_healthy,
                "collapsed": n_collapsed,
                "collapses": sorted(
                    (g.record.label or g.run.run_id, g.collapse) for g in group if g.collapse
                ),
                "detectors": table,
                "peak_by_condition": _peaks(group, names),
            }
            print(
                f"\n{workload} (H={args.horizon}, {args.target}/1k): {len(group)} runs, "
                f"{n_healthy} healthy, {n_collapsed} collapsed"
            )
            print(
                f"{'detector':34} {'recall':>6} {'lead':>6} {'lead IQR':>12} "
                f"{'FA/1k':>6} {'stepAUROC':>9}"
            )
            for n, m in table.items():
                print(
                    f"{n:34} {_fmt(m['event_recall']):>6} {_fmt(m['lead_median']):>6} "
                    f"{_fmt(m['lead_iqr']):>12} {_fmt(m['false_alarms_per_1k']):>6} "
                    f"{_fmt(m['step_auroc']):>9}"
                )
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
