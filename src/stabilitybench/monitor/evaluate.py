"""Fit the monitor on an audit (leave-one-seed-out) and compare it with the reactive guards.

`fit_audit` fits, per workload, one Meta-State Monitor on all baseline runs (the one users load,
in `<audit>/monitor/<workload>/`; also at `<audit>/monitor/` when the audit has one workload) and
one per held-out seed: runs of seed s are scored by a monitor fitted on baseline runs of the
other seeds, so no run is scored by a model that saw it (a perturbed run of seed s shares its
pre-onset trajectory with the baseline run of seed s). The PCA detector is fitted the same way.
Every done run gets `scores.parquet`: `step`, `env_step`, `msd`, `z_1..z_k`, one column per
baseline detector, and `<name>_native` alarm flags.

`evaluate_audit` computes, per detector, collapse-prediction AUROC (bootstrap CI), recall,
precision, lead times and false alarms per 1,000 baseline steps at a threshold calibrated on
held-out baseline runs, plus the same figures for each guard's native rule.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stabilitybench.errors import StabilityBenchError
from stabilitybench.io import read_json, write_json, write_parquet
from stabilitybench.monitor.detectors import GUARDS, PCADetector
from stabilitybench.monitor.ssm import (
    MetaStateMonitor,
    alarm_events,
    calibrate_threshold,
)
from stabilitybench.store import RunData, RunStore

MONITOR_DIR = "monitor"
EVALUATION_FILE = "evaluation.json"
FIT_FILE = "fit.json"
SCORES_FILE = "scores.parquet"
DETECTORS = ("msm", "zclip", "olmo", "lightning", "megatron", "ews", "pca")
SCORE_COLUMN = {"msm": "msd", **{d: d for d in DETECTORS if d != "msm"}}
NATIVE = ("zclip", "olmo", "lightning", "megatron", "ews", "pca")
BOOTSTRAP = 2000

_FIT_HINT = "run `stabilitybench monitor fit DIR`"
_BASELINE_HINT = "add `- none` to `perturbations` in the audit spec and rerun `stabilitybench audit SPEC --out DIR`"
_PERTURBED_HINT = (
    "add a perturbation such as `{kind: lr_spike, at: 0.3, factor: 10, duration: 10}` to "
    "`perturbations` in the audit spec and rerun `stabilitybench audit SPEC --out DIR`"
)


# -- pure statistics ---------------------------------------------------------------------------


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney, ties count 1/2); scores/labels: (n,), labels bool."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_bootstrap_ci(
    scores: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    reps: int = BOOTSTRAP,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile CI of the AUROC, resampling positives and negatives separately (stratified)."""
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels, dtype=bool)
    pos, neg = scores[labels], scores[~labels]
    values = np.empty(reps)
    for i in range(reps):
        p = pos[rng.integers(0, len(pos), len(pos))]
        n = neg[rng.integers(0, len(neg), len(neg))]
        values[i] = auroc(
            np.concatenate([p, n]), np.r_[np.ones(len(p), bool), np.zeros(len(n), bool)]
        )
    tail = (1 - level) / 2
    lo, hi = np.quantile(values, [tail, 1 - tail])
    return float(lo), float(hi)


def first_alarm_index(alarms: np.ndarray, steps: np.ndarray, onset: int) -> int | None:
    """Index of the first alarm at or after `onset` (alarms, steps: (n,)), or None."""
    hits = np.flatnonzero(np.asarray(alarms, dtype=bool) & (np.asarray(steps) >= onset))
    return int(hits[0]) if hits.size else None


def window_max(scores: np.ndarray, steps: np.ndarray, start: int, end: int) -> float:
    """Largest score over steps in [start, end] (NaN if no step there or all NaN)."""
    mask = (steps >= start) & (steps <= end)
    values = np.asarray(scores, dtype=float)[mask]
    values = values[~np.isnan(values)]
    return float(values.max()) if values.size else math.nan


# -- fitting -----------------------------------------------------------------------------------


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _say(console: Any, text: str) -> None:
    if console is not None:
        console.print(text, highlight=False)


def _workload(run: RunData) -> str:
    return str(
        run.info.get("workload") or run.info.get("spec", {}).get("workload", {}).get("name", "?")
    )


def _done_runs(store: RunStore) -> list[RunData]:
    return [r for r in store.iter_runs() if len(r.telemetry) > 0]


def _require_runs(runs: Sequence[RunData], need_perturbed: bool) -> None:
    if not any(r.is_baseline for r in runs):
        raise StabilityBenchError(
            f"the audit has no finished baseline runs (perturbation none); {_BASELINE_HINT}"
        )
    if need_perturbed and not any(not r.is_baseline for r in runs):
        raise StabilityBenchError(f"the audit has no finished perturbed runs; {_PERTURBED_HINT}")


def fit_audit(
    store: RunStore,
    latent_dim: int = 4,
    seed: int = 0,
    console: Any = None,
    monitor_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit the monitors (all-baseline + leave-one-seed-out) and write every run's scores.parquet.

    `monitor_options`: extra `MonitorConfig` fields (e.g. `max_epochs`) for every monitor fitted.
    """
    options = dict(monitor_options or {})
    if latent_dim < 1:
        raise StabilityBenchError(f"--latent-dim must be an integer >= 1, got {latent_dim}")
    runs = _done_runs(store)
    _require_runs(runs, need_perturbed=False)
    groups: dict[str, list[RunData]] = defaultdict(list)
    for run in runs:
        groups[_workload(run)].append(run)
    monitor_dir = store.root / MONITOR_DIR
    summary: dict[str, Any] = {"latent_dim": latent_dim, "seed": seed, "workloads": {}}
    started = time.perf_counter()
    fitted_groups = [
        (name, group) for name, group in sorted(groups.items()) if any(r.is_baseline for r in group)
    ]
    for name, group in fitted_groups:
        baseline = [r for r in group if r.is_baseline]
        seeds = sorted({int(r.seed or 0) for r in group})
        baseline_seeds = sorted({int(r.seed or 0) for r in baseline})
        _say(
            console,
            f"[bold]{_escape(name)}[/]: {len(baseline)} baseline runs, seeds {baseline_seeds}",
        )
        full = MetaStateMonitor(latent_dim=latent_dim, seed=seed, **options).fit(baseline)
        folder = monitor_dir / _safe_name(name)
        full.save(folder)
        if len(fitted_groups) == 1:
            full.save(monitor_dir)
        _say(
            console,
            f"  full monitor → {_escape(str(folder))} (threshold {full.threshold:.3g}, {full.fit_info['epochs']} epochs)",
        )
        folds: dict[int, tuple[MetaStateMonitor, PCADetector] | None] = {}
        for held in seeds:
            train = [r for r in baseline if int(r.seed or 0) != held]
            if not train:
                folds[held] = None
                continue
            if [r.run_id for r in train] == [r.run_id for r in baseline]:
                folds[held] = (full, PCADetector(latent_dim).fit([r.telemetry for r in train]))
                continue
            monitor = MetaStateMonitor(latent_dim=latent_dim, seed=seed, **options).fit(train)
            folds[held] = (monitor, PCADetector(latent_dim).fit([r.telemetry for r in train]))
            _say(console, f"  seed {held} held out: fitted on {len(train)} runs")
        for run in group:
            fold = folds.get(int(run.seed or 0))
            write_parquet(
                store.run_dir(run.run_id) / SCORES_FILE, _score_run(run, fold, latent_dim)
            )
        summary["workloads"][name] = {
            "baseline_runs": len(baseline),
            "baseline_seeds": baseline_seeds,
            "scored_runs": len(group),
            "leave_one_seed_out": sum(f is not None for f in folds.values()),
            "unscored_seeds": [s for s, f in folds.items() if f is None],
            "model": str(folder.relative_to(store.root)),
            "fit_info": full.fit_info,
        }
    skipped = sorted(set(groups) - {n for n, _ in fitted_groups})
    summary["workloads_without_baseline"] = skipped
    summary["wall_s"] = time.perf_counter() - started
    write_json(monitor_dir / FIT_FILE, summary)
    _say(
        console,
        f"scores written for {sum(len(g) for _, g in fitted_groups)} runs in {summary['wall_s']:.1f} s",
    )
    return summary


def _safe_name(name: str) -> str:
    """The folder of a workload's monitor: a hash, never built from the name (which is free text:
    `..`, `a/b` or two names that differ only in punctuation must not reach the filesystem)."""
    import hashlib

    return "workload-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:12]


def _score_run(
    run: RunData, fold: tuple[MetaStateMonitor, PCADetector] | None, latent_dim: int
) -> pd.DataFrame:
    """One run's scores.parquet: MSM (held-out fold), latents, guard scores and native alarms."""
    table = run.telemetry
    steps = (
        table["step"].to_numpy(dtype=np.int64) if "step" in table.columns else np.arange(len(table))
    )
    out = pd.DataFrame({"step": steps})
    if "env_step" in table.columns:
        out["env_step"] = pd.to_numeric(table["env_step"], errors="coerce").to_numpy()
    if fold is None:
        out["msd"] = np.nan
        for i in range(latent_dim):
            out[f"z_{i + 1}"] = np.nan
        out["msd_alarm"] = False
    else:
        monitor, _ = fold
        scored = monitor.score(table)
        out["msd"] = scored["msd"].to_numpy()
        for i in range(latent_dim):
            out[f"z_{i + 1}"] = scored[f"z_{i + 1}"].to_numpy()
        out["msd_alarm"] = scored["alarm"].to_numpy()
    for guard_cls in GUARDS:
        guard = guard_cls()
        scores = guard.score(table)
        out[guard.name] = scores
        out[f"{guard.name}_native"] = guard._native(scores)
    if fold is None:
        out["pca"] = np.nan
        out["pca_native"] = False
    else:
        pca = fold[1]
        scores = pca.score(table)
        out["pca"] = scores
        out["pca_native"] = pca._native(scores)
    return out


# -- evaluation --------------------------------------------------------------------------------


def _onset(run: RunData) -> tuple[int | None, int | None]:
    events = run.events
    if events is None or len(events) == 0 or "start_step" not in events.columns:
        return None, None
    events = events.reset_index(drop=True)
    steps = pd.to_numeric(events["start_step"], errors="coerce").dropna()
    if steps.empty:
        return None, None
    position = int(np.argmin(steps.to_numpy(dtype=float)))
    env = (
        events["start_env_step"].iloc[steps.index[position]]
        if "start_env_step" in events.columns
        else None
    )
    env_value = None if env is None or pd.isna(env) else int(env)
    return int(steps.min()), env_value


def _label(store: RunStore, run: RunData, onset: int, onset_env: int | None) -> dict[str, Any]:
    """Collapse label of a perturbed run (DESIGN.md definitions, via stabilitybench.metrics)."""
    from stabilitybench.metrics.collapse import analyze_collapse
    from stabilitybench.metrics.summary import collapse_config

    evals = run.evals
    config = collapse_config(store, [run.info])  # the same thresholds the summary uses
    steps = evals["step"].to_numpy(dtype=float) if len(evals) else np.zeros(0)
    perf = evals["perf"].to_numpy(dtype=float) if len(evals) else np.zeros(0)
    env = None
    if len(evals) and "env_step" in evals.columns:
        env_values = pd.to_numeric(evals["env_step"], errors="coerce").to_numpy(dtype=float)
        env = None if np.all(np.isnan(env_values)) else env_values
    result = analyze_collapse(
        steps,
        perf,
        onset,
        env_steps=env,
        onset_env_step=onset_env,
        threshold=config["threshold"],
        recovery=config["recovery"],
        k=int(config["pre_evals"]),
    )
    after = steps[steps >= onset]
    first_eval = int(after.min()) if after.size else None
    collapse_at = (
        None
        if not result.collapsed or result.collapse_step is None
        else onset + result.collapse_step
    )
    collapse_env = None
    if collapse_at is not None and env is not None:
        match = np.flatnonzero(steps == collapse_at)
        if match.size and np.isfinite(env[match[0]]):
            collapse_env = int(env[match[0]])
    return {
        "collapsed": result.collapsed,
        "collapse_step": collapse_at,
        "collapse_env_step": collapse_env,
        "first_eval_after_onset": first_eval,
    }


def _too_few(what: str, counts: dict[str, int]) -> str:
    return f"too few runs for {what}: " + ", ".join(f"{v} {k}" for k, v in counts.items())


def evaluate_audit(store: RunStore, target_false_alarms: float = 1.0) -> dict[str, Any]:
    """The `monitor evaluate --json` document; also written to `<audit>/monitor/evaluation.json`."""
    if not (
        isinstance(target_false_alarms, int | float)
        and math.isfinite(target_false_alarms)
        and target_false_alarms > 0
    ):
        raise StabilityBenchError(
            f"--target-false-alarms must be a number > 0 (false alarms per 1,000 steps), got {target_false_alarms}"
        )
    runs = _done_runs(store)
    _require_runs(runs, need_perturbed=True)
    scored = [r for r in runs if r.scores is not None and len(r.scores) > 0]
    if not scored or not (store.root / MONITOR_DIR / FIT_FILE).exists():
        raise StabilityBenchError(f"no fitted monitor in {store.root}: {_FIT_HINT}")
    unscored = len(runs) - len(scored)
    baseline = [r for r in scored if r.is_baseline]
    perturbed = [r for r in scored if not r.is_baseline]
    _require_runs([*baseline, *perturbed], need_perturbed=True)

    labelled: list[tuple[RunData, int, dict[str, Any]]] = []
    unjudged = 0
    for run in perturbed:
        onset, onset_env = _onset(run)
        if onset is None:
            unjudged += 1
            continue
        label = _label(store, run, onset, onset_env)
        if label["collapsed"] is None:
            unjudged += 1
            continue
        labelled.append((run, onset, label))
    n_collapsed = sum(1 for _, _, lab in labelled if lab["collapsed"])
    n_recovered = len(labelled) - n_collapsed

    rng = np.random.default_rng(0)
    detectors: dict[str, Any] = {}
    for name in DETECTORS:
        detectors[name] = _evaluate_detector(name, baseline, labelled, target_false_alarms, rng)

    fit_meta = read_json(store.root / MONITOR_DIR / FIT_FILE)
    result: dict[str, Any] = {
        "target_false_alarms_per_1k": float(target_false_alarms),
        "n_collapsed": n_collapsed,
        "n_recovered": n_recovered,
        "n_baseline": len(baseline),
        "n_unjudged": unjudged,
        "n_unscored": unscored,
        "latent_dim": fit_meta.get("latent_dim"),
        "detectors": detectors,
    }
    write_json(store.root / MONITOR_DIR / EVALUATION_FILE, result)
    return result


def _thresholds(
    column: str, baseline: Sequence[RunData], target: float
) -> tuple[Callable[[RunData], float], str]:
    """Threshold for a run: calibrated on baseline runs of the same workload and other seeds.

    Falls back to all baseline runs of the workload (in-sample) when it has a single seed.
    """
    by_group: dict[tuple[str, int], float] = {}
    groups: dict[str, list[RunData]] = defaultdict(list)
    for run in baseline:
        groups[_workload(run)].append(run)
    in_sample = False

    def scores_of(runs: Sequence[RunData]) -> list[np.ndarray]:
        out = []
        for r in runs:
            assert r.scores is not None
            values = r.scores[column].to_numpy(dtype=float)
            if not np.all(np.isnan(values)):
                out.append(values)
        return out

    def threshold(run: RunData) -> float:
        nonlocal in_sample
        key = (_workload(run), int(run.seed or 0))
        if key not in by_group:
            pool = groups.get(key[0], [])
            others = [r for r in pool if int(r.seed or 0) != key[1]]
            if not others:
                others, in_sample = pool, True
            by_group[key] = calibrate_threshold(scores_of(others), target) if others else math.inf
        return by_group[key]

    for run in baseline:
        threshold(run)
    return threshold, "in-sample (one baseline seed)" if in_sample else "held-out seeds"


def _evaluate_detector(
    name: str,
    baseline: Sequence[RunData],
    labelled: Sequence[tuple[RunData, int, dict[str, Any]]],
    target: float,
    rng: np.random.Generator,
) -> dict[str, Any]:
    column = SCORE_COLUMN[name]
    usable = [
        t
        for t in labelled
        if t[0].scores is not None
        and not np.all(np.isnan(t[0].scores[column].to_numpy(dtype=float)))
    ]
    usable_baseline = [
        r
        for r in baseline
        if r.scores is not None and not np.all(np.isnan(r.scores[column].to_numpy(dtype=float)))
    ]
    threshold_of, calibration = _thresholds(column, usable_baseline, target)

    window_scores, labels = [], []
    for run, onset, label in usable:
        assert run.scores is not None
        steps = run.scores["step"].to_numpy()
        end = (
            label["first_eval_after_onset"]
            if label["first_eval_after_onset"] is not None
            else int(steps.max())
        )
        window_scores.append(
            window_max(run.scores[column].to_numpy(dtype=float), steps, onset, end)
        )
        labels.append(bool(label["collapsed"]))
    scores_arr = np.nan_to_num(np.asarray(window_scores, dtype=float), nan=-np.inf)
    labels_arr = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels_arr.sum()), int((~labels_arr).sum())
    counts = {"collapsed": n_pos, "recovered": n_neg}
    entry: dict[str, Any] = {}
    if n_pos >= 1 and n_neg >= 1:
        finite = np.where(np.isposinf(scores_arr), np.finfo(float).max, scores_arr)
        entry["auroc"] = auroc(finite, labels_arr)
        if n_pos >= 2 and n_neg >= 2:
            entry["auroc_ci"] = list(auroc_bootstrap_ci(finite, labels_arr, rng))
        else:
            entry["auroc_ci"] = _too_few("a bootstrap CI (need >= 2 of each)", counts)
    else:
        entry["auroc"] = _too_few("AUROC", counts)
        entry["auroc_ci"] = entry["auroc"]

    def alarms_at(run: RunData) -> np.ndarray:
        assert run.scores is not None
        values = run.scores[column].to_numpy(dtype=float)
        return np.nan_to_num(values, nan=-np.inf) >= threshold_of(run)

    entry.update(_alarm_metrics(usable, usable_baseline, alarms_at, counts))
    entry["calibration"] = calibration
    thresholds = sorted({threshold_of(r) for r in [*usable_baseline, *(t[0] for t in usable)]})
    finite_thr = [t for t in thresholds if math.isfinite(t)]
    entry["threshold_median"] = float(np.median(finite_thr)) if finite_thr else None
    if name in NATIVE:
        native_column = f"{column}_native"

        def native_at(run: RunData) -> np.ndarray:
            assert run.scores is not None
            return run.scores[native_column].to_numpy(dtype=bool)

        entry["native"] = _alarm_metrics(usable, usable_baseline, native_at, counts)
    return entry


def _alarm_metrics(
    labelled: Sequence[tuple[RunData, int, dict[str, Any]]],
    baseline: Sequence[RunData],
    alarms_of: Callable[[RunData], np.ndarray],
    counts: dict[str, int],
) -> dict[str, Any]:
    """Recall, precision, lead times and false alarms per 1,000 baseline steps for one alarm rule."""
    leads, env_leads = [], []
    hits = alarmed = collapsed = 0
    for run, onset, label in labelled:
        assert run.scores is not None
        steps = run.scores["step"].to_numpy()
        alarms = alarms_of(run)
        first = first_alarm_index(alarms, steps, onset)
        if label["collapsed"]:
            collapsed += 1
            if first is None:
                continue
            lead = int(label["collapse_step"] - steps[first])
            leads.append(lead)
            if label["collapse_env_step"] is not None and "env_step" in run.scores.columns:
                alarm_env = run.scores["env_step"].iloc[first]
                if pd.notna(alarm_env):
                    env_leads.append(int(label["collapse_env_step"] - alarm_env))
            if lead > 0:
                hits += 1
                alarmed += 1
        elif first is not None:
            alarmed += 1
    out: dict[str, Any] = {}
    out["recall"] = hits / collapsed if collapsed else _too_few("recall", counts)
    out["precision"] = hits / alarmed if alarmed else "no alarms on perturbed runs"
    for key, values in (("lead_time", leads), ("lead_time_env_steps", env_leads)):
        if values:
            q25, q50, q75 = np.percentile(values, [25, 50, 75])
            out[f"{key}_median"] = float(q50)
            out[f"{key}_iqr"] = [float(q25), float(q75)]
        elif key == "lead_time_env_steps" and not any(
            lab["collapse_env_step"] is not None for _, _, lab in labelled
        ):
            out[f"{key}_median"] = None  # not an RL audit: there are no env steps
            out[f"{key}_iqr"] = None
        else:
            text = (
                "no alarm at or after onset in any collapsed run"
                if collapsed
                else _too_few("lead time", counts)
            )
            out[f"{key}_median"] = text
            out[f"{key}_iqr"] = text
    if baseline:
        events = sum(int(alarm_events(alarms_of(r), 0.5).sum()) for r in baseline)
        steps_total = sum(len(r.scores) for r in baseline if r.scores is not None)
        out["false_alarms_per_1k"] = 1000.0 * events / steps_total if steps_total else 0.0
    else:
        out["false_alarms_per_1k"] = "too few runs: 0 baseline runs with scores"
    return out


# -- printing ----------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return "n/a"
    if isinstance(value, list):
        return "[" + ",".join(_fmt(v, digits) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_evaluation(result: dict[str, Any], console: Any) -> None:
    """The evaluation as a rich table, with notes for figures that could not be estimated."""
    from rich.table import Table

    table = Table(
        title=(
            f"early warning at {result['target_false_alarms_per_1k']:g} false alarms / 1k steps "
            f"({result['n_collapsed']} collapsed, {result['n_recovered']} recovered, "
            f"{result['n_baseline']} baseline runs)"
        )
    )
    for column in (
        "detector",
        "AUROC [95% CI]",
        "recall",
        "prec.",
        "lead [IQR]",
        "FA/1k",
        "native R/P/FA",
    ):
        table.add_column(column, justify="left" if column == "detector" else "right")
    notes: list[str] = []
    for name, entry in result["detectors"].items():
        native = entry.get("native", {})
        for key in ("auroc", "recall", "lead_time_median"):
            if isinstance(entry.get(key), str) and entry[key] not in notes:
                notes.append(entry[key])
        native_text = (
            "/".join(_fmt(native.get(k)) for k in ("recall", "precision", "false_alarms_per_1k"))
            if native
            else "—"
        )
        table.add_row(
            name,
            f"{_fmt(entry.get('auroc'))} {_fmt(entry.get('auroc_ci'))}",
            _fmt(entry.get("recall")),
            _fmt(entry.get("precision")),
            f"{_fmt(entry.get('lead_time_median'), 0)} {_fmt(entry.get('lead_time_iqr'), 0)}",
            _fmt(entry.get("false_alarms_per_1k")),
            native_text,
        )
    console.print(table)
    for note in notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    if result.get("n_unscored"):
        console.print(
            f"[yellow]note:[/] {result['n_unscored']} finished runs have no scores; rerun "
            "`stabilitybench monitor fit DIR`",
            highlight=False,
        )


def load_evaluation(root: str | Path) -> dict[str, Any]:
    """The last evaluation written for an audit folder (for the report)."""
    path = Path(root) / MONITOR_DIR / EVALUATION_FILE
    if not path.exists():
        raise StabilityBenchError(f"{path} not found; run `stabilitybench monitor evaluate DIR`")
    data: dict[str, Any] = read_json(path)
    return data
