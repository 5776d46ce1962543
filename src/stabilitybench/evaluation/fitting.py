"""`monitor fit`: fit every registered detector on healthy runs and write each run's scores.

Per workload, each fitted detector (Meta-State Monitor, PCA, …) is fitted once on all its
healthy runs (the Meta-State Monitor users load is saved in `<audit>/monitor/<workload>/`, and
at `<audit>/monitor/` when the audit has one workload) and once per held-out seed: runs of seed
s are scored by detectors fitted on healthy runs of the other seeds, so no run is scored by a
model that saw it. Every scored run gets `scores.parquet`: `step`, `env_step`, then each
registered detector's columns (its score and `<column>_native`; the monitor adds `z_1..z_k`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stabilitybench.detectors.base import BaseDetector, DetectorSettings, detector_classes
from stabilitybench.errors import StabilityBenchError
from stabilitybench.evaluation.results import MONITOR_DIR
from stabilitybench.io import write_json, write_parquet
from stabilitybench.metrics.serialize import to_jsonable
from stabilitybench.store import RunData, RunStore
from stabilitybench.types import RunStatus

FIT_FILE = "fit.json"
ATTRIBUTION_FILE = "attribution.json"  # per run: what moved the monitor at its first alarm
SCORES_FILE = "scores.parquet"
BASELINE_HINT = (
    "add `- none` to `perturbations` in the audit spec and rerun "
    "`stabilitybench audit SPEC --out DIR`"
)
PERTURBED_HINT = (
    "add a perturbation such as `{kind: lr_spike, at: 0.3, factor: 10, duration: 10}` to "
    "`perturbations` in the audit spec and rerun `stabilitybench audit SPEC --out DIR`"
)
IMPORTED_HINT = (
    "score them with every detector with `stabilitybench monitor score DIR "
    "--monitor OTHER_AUDIT/monitor` (a monitor fitted on another audit's healthy runs)"
)
Fitted = dict[str, BaseDetector]


def say(console: Any, text: str) -> None:
    if console is not None:
        console.print(text, highlight=False)


def workload_of(run: RunData) -> str:
    return run.info.workload or "?"


def is_healthy(run: RunData) -> bool:
    """A run the detectors learn from: perturbation none, unguarded and the workload's reference
    knobs (run.json's `healthy`; a run written before it existed: unperturbed and unguarded)."""
    return run.info.is_healthy


def done_runs(store: RunStore) -> list[RunData]:
    """Finished runs that recorded telemetry."""
    return [r for r in store.iter_runs() if len(r.telemetry) > 0]


def unscored_runs(store: RunStore) -> list[str]:
    """Finished runs of an audit fitted before they finished (a resumed audit): runs with
    telemetry and no scores, in a workload that has a finished healthy run. Empty for an audit
    not fitted yet and for a findings folder (its scores are what they are)."""
    if store.is_findings_folder or not (store.root / MONITOR_DIR / FIT_FILE).exists():
        return []
    done = [info for info in store.infos() if info.status == RunStatus.DONE]
    fitted = {info.workload for info in done if info.is_healthy}
    return [
        info.run_id
        for info in done
        if info.workload in fitted
        and (store.run_dir(info.run_id) / "telemetry.parquet").is_file()
        and not (store.run_dir(info.run_id) / SCORES_FILE).is_file()
    ]


def needs_fit(store: RunStore) -> bool:
    """Whether the audit in `store` has to be fitted before it is evaluated: never fitted, or
    runs finished after the fit (`unscored_runs`: the fit is done again on all of them)."""
    if store.is_findings_folder:
        return False
    return not (store.root / MONITOR_DIR / FIT_FILE).exists() or bool(unscored_runs(store))


def require_runs(runs: Sequence[RunData], need_perturbed: bool) -> None:
    if not any(is_healthy(r) for r in runs):
        raise StabilityBenchError(
            f"the audit has no finished baseline runs (perturbation none); {BASELINE_HINT}"
        )
    # runs to judge warnings against: perturbed runs, or unperturbed runs away from the
    # healthy recipe (recipes on trial: an audit of intrinsic instability)
    if need_perturbed and not any(not r.is_baseline or not is_healthy(r) for r in runs):
        if runs and all(r.info.kind == "imported" for r in runs):
            raise StabilityBenchError(
                "the audit holds imported runs only, with no perturbed runs to judge warnings "
                f"against; {IMPORTED_HINT}"
            )
        raise StabilityBenchError(f"the audit has no finished perturbed runs; {PERTURBED_HINT}")


def require_full_telemetry(store: RunStore) -> None:
    """Refuse a findings folder: its runs keep only the telemetry the analysis reads, and their
    scores were fitted on the audit's full telemetry (a fit here would replace them)."""
    if store.is_findings_folder:
        raise StabilityBenchError(
            f"{store.root} is a findings folder: its runs keep only the telemetry the analysis "
            "reads and their scores come from the audit's; fit or score the audit folder and "
            f"export it again, or judge this folder as it is with `stabilitybench findings "
            f"{store.root} --rejudge`"
        )


def safe_name(name: str) -> str:
    """The folder of a workload's monitor: a hash, never built from the name (which is free text:
    `..`, `a/b` or two names that differ only in punctuation must not reach the filesystem)."""
    import hashlib

    return "workload-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:12]


def fit_detectors(settings: DetectorSettings, healthy: Sequence[RunData]) -> Fitted:
    """Every registered fitted detector, fitted on these healthy runs."""
    return {
        name: cls.create(settings).fit(healthy)  # type: ignore[misc]
        for name, cls in detector_classes().items()
        if cls.fitted
    }


def score_frame(run: RunData, fold: Fitted | None, settings: DetectorSettings) -> pd.DataFrame:
    """One run's scores.parquet: every detector's columns (fitted ones from the run's fold)."""
    table = run.telemetry
    n = len(table)
    steps = table["step"].to_numpy(dtype=np.int64) if "step" in table.columns else np.arange(n)
    columns: dict[str, Any] = {"step": steps}
    if "env_step" in table.columns:
        columns["env_step"] = pd.to_numeric(table["env_step"], errors="coerce").to_numpy()
    flagged = with_perturbed_flag(table, run.events)  # what the clock control counts from
    for name, cls in detector_classes().items():
        if not cls.fitted:
            columns.update(cls.create(settings).score_columns(flagged))  # type: ignore[attr-defined]
        elif fold is None or name not in fold:
            columns.update(cls.create(settings).empty_columns(n))  # type: ignore[attr-defined]
        else:
            columns.update(fold[name].score_columns(table))
    return pd.DataFrame(columns)


def complete_scores(run: RunData, frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` (a run's scores.parquet) with the columns of every registered detector that needs
    no fit and that it lacks (`<column>`, `<column>_native`), scored from the run's telemetry;
    `frame` itself when it lacks none.

    Scores written before a detector existed (a findings folder's, an older audit's) so gain it
    without a refit. The telemetry is scored whole, then its rows are matched to the frame's by
    `step` (a frame row with no telemetry row scores NaN, no alarm). Telemetry without the
    `perturbed` flag (a slim copy written before it was kept) gets it back from the run's
    events: set from the first perturbation window's start on.
    """
    wanted = [
        cls
        for cls in detector_classes().values()
        if not cls.fitted and not {cls.column, f"{cls.column}_native"} <= set(frame.columns)
    ]
    if not wanted:
        return frame
    table = with_perturbed_flag(run.telemetry, run.events)
    rows = _matching_rows(frame, table)
    matched = rows >= 0
    out = frame.copy()
    for cls in wanted:
        scored = cls.create(DetectorSettings()).score_columns(table)  # type: ignore[attr-defined]
        for name, values in scored.items():
            if name in out.columns:
                continue
            values = np.asarray(values)
            if values.dtype == bool:
                out[name] = np.where(matched, values[np.maximum(rows, 0)], False)
            else:
                out[name] = np.where(matched, values[np.maximum(rows, 0)], np.nan)
    return out


def with_perturbed_flag(telemetry: pd.DataFrame, events: pd.DataFrame | None) -> pd.DataFrame:
    """`telemetry` with a `perturbed` column: its own, else rebuilt from `events` (true from the
    earliest perturbation window's start step on; a guard's interventions are not perturbations;
    false everywhere on a run without any)."""
    from stabilitybench.detectors.controls import PERTURBED_COLUMN
    from stabilitybench.metrics.records import event_onset

    if PERTURBED_COLUMN in telemetry.columns:
        return telemetry
    onset = event_onset(events).step
    flags = np.zeros(len(telemetry), dtype=bool)
    if onset is not None and "step" in telemetry.columns:
        steps = pd.to_numeric(telemetry["step"], errors="coerce").to_numpy(dtype=float)
        flags = steps >= onset
    return telemetry.assign(**{PERTURBED_COLUMN: flags})


def _matching_rows(frame: pd.DataFrame, table: pd.DataFrame) -> np.ndarray:
    """Per row of `frame`, its row of `table` (n,): the same row where both have the same steps
    in the same order (as `score_frame` writes them), else the first row with its step; −1 where
    there is none."""
    rows = np.arange(len(frame))
    if "step" not in frame.columns or "step" not in table.columns:
        return np.where(rows < len(table), rows, -1)
    steps = pd.to_numeric(table["step"], errors="coerce")
    if len(frame) == len(table) and np.array_equal(
        pd.to_numeric(frame["step"], errors="coerce").to_numpy(dtype=float),
        steps.to_numpy(dtype=float),
        equal_nan=True,
    ):
        return rows
    positions = pd.Series(np.arange(len(table)), index=steps)
    positions = positions[~positions.index.duplicated(keep="first")]
    wanted = pd.to_numeric(frame["step"], errors="coerce")
    return positions.reindex(wanted).fillna(-1).to_numpy(dtype=np.int64)


def read_attributions(root: Path) -> dict[str, Any]:
    """An audit's monitor/attribution.json (run_id → what moved the monitor at its first
    alarm), or {} when `monitor fit` has not written one or it cannot be read."""
    import json

    path = root / MONITOR_DIR / ATTRIBUTION_FILE
    try:
        found = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def first_alarm_attribution(
    run: RunData, frame: pd.DataFrame, fold: Fitted
) -> dict[str, Any] | None:
    """At the monitor's first native alarm on a run: the dominant term and the features (and
    layers) that moved the deviation most, from the model that scored the run (its fold)."""
    from stabilitybench.detectors.msm import MSMDetector

    detector = next((d for d in fold.values() if isinstance(d, MSMDetector)), None)
    if detector is None or f"{detector.column}_native" not in frame.columns:
        return None
    flags = frame[f"{detector.column}_native"].to_numpy(dtype=bool)
    if not flags.any():
        return None
    index = int(np.argmax(flags))
    explained = detector.monitor.explain(run.telemetry, index, run.info.telemetry_index)
    return {
        "detector": detector.name,
        "label": run.info.label or None,
        "workload": workload_of(run),
        "step": explained.step,
        "term": explained.term,
        "text": explained.text(),
        "contributions": [
            {"feature": c.feature, "layer": c.layer, "share": c.share, "z": c.z}
            for c in explained.contributions
        ],
    }


def recalibrate_native(full: Fitted, out_of_fold: Sequence[pd.DataFrame]) -> None:
    """Set each fitted detector's native threshold (the one a guard acts on) from the healthy
    runs' out-of-fold scores, when there are at least two such runs.

    The model fitted on all healthy runs calibrates its threshold on one held-out seed, whose
    maximum then decides a 1-per-1k target; a new healthy run exceeds it often. The healthy
    runs scored leave-one-seed-out are out of sample for a model fitted on as many runs, and
    there are as many of them as seeds.
    """
    if len(out_of_fold) < 2:
        return
    for detector in full.values():
        recalibrate = getattr(detector, "recalibrate", None)
        column = detector.column
        if recalibrate is None or not all(column in f.columns for f in out_of_fold):
            continue
        scores = [f[column].to_numpy(dtype=float) for f in out_of_fold]
        recalibrate(
            scores, f"out-of-fold scores of {len(scores)} healthy runs (leave one seed out)"
        )


def _folds(
    group: Sequence[RunData], full: Fitted, settings: DetectorSettings, console: Any
) -> dict[int, Fitted | None]:
    """Per seed of the workload: detectors fitted on the other seeds' healthy runs (or None)."""
    baseline = [r for r in group if is_healthy(r)]
    folds: dict[int, Fitted | None] = {}
    for held in sorted({int(r.seed or 0) for r in group}):
        train = [r for r in baseline if int(r.seed or 0) != held]
        if not train:
            folds[held] = None
        elif [r.run_id for r in train] == [r.run_id for r in baseline]:
            folds[held] = full
        else:
            folds[held] = fit_detectors(settings, train)
            say(console, f"  seed {held} held out: fitted on {len(train)} runs")
    return folds


def _fit_workload(
    store: RunStore,
    name: str,
    group: Sequence[RunData],
    settings: DetectorSettings,
    *,
    console: Any = None,
    single: bool = False,
    attributions: dict[str, Any],
) -> dict[str, Any]:
    """Fit one workload's detectors, save the full monitor, write its runs' scores (and each
    run's first-alarm attribution into `attributions`)."""
    baseline = [r for r in group if is_healthy(r)]
    baseline_seeds = sorted({int(r.seed or 0) for r in baseline})
    say(console, f"[bold]{name}[/]: {len(baseline)} healthy runs, seeds {baseline_seeds}")
    full = fit_detectors(settings, baseline)
    folder = store.root / MONITOR_DIR / safe_name(name)
    folds = _folds(group, full, settings, console)
    out_of_fold: list[pd.DataFrame] = []
    for run in group:
        fold = folds.get(int(run.seed or 0))
        frame = score_frame(run, fold, settings)
        write_parquet(store.run_dir(run.run_id) / SCORES_FILE, frame)
        if fold is not None and (found := first_alarm_attribution(run, frame, fold)) is not None:
            attributions[run.run_id] = found
        if fold is not None and fold is not full and is_healthy(run):
            out_of_fold.append(frame)
    recalibrate_native(full, out_of_fold)
    for detector in full.values():
        if detector.save(folder) and single:
            detector.save(store.root / MONITOR_DIR)
        if (text := detector.describe()) is not None:
            say(console, f"  {text} → {folder}")
    return {
        "baseline_runs": len(baseline),
        "baseline_seeds": baseline_seeds,
        "scored_runs": len(group),
        "leave_one_seed_out": sum(f is not None for f in folds.values()),
        "unscored_seeds": [s for s, f in folds.items() if f is None],
        "model": str(folder.relative_to(store.root)),
        "fit_info": next((d.fit_info for d in full.values() if d.fit_info), {}),
        "detectors": {n: d.fit_info for n, d in full.items() if d.fit_info},
    }


def fit_audit(
    store: RunStore,
    latent_dim: int = 4,
    seed: int = 0,
    console: Any = None,
    monitor_options: Mapping[str, Any] | None = None,
    include_controls: bool = False,
) -> dict[str, Any]:
    """Fit the detectors (all-healthy + leave-one-seed-out) and write every run's scores.parquet.

    `monitor_options`: extra `MonitorConfig` fields (e.g. `max_epochs`) for every monitor fitted.
    `include_controls`: the ablation whose fitted detectors read the columns the audit controls
    (learning rate, entropy coefficient, perturbation flags); fit.json says which were read.
    """
    if latent_dim < 1:
        raise StabilityBenchError(f"--latent-dim must be an integer >= 1, got {latent_dim}")
    require_full_telemetry(store)
    settings = DetectorSettings(latent_dim, seed, dict(monitor_options or {}), include_controls)
    runs = done_runs(store)
    require_runs(runs, need_perturbed=False)
    groups: dict[str, list[RunData]] = defaultdict(list)
    for run in runs:
        groups[workload_of(run)].append(run)
    fitted = {n: g for n, g in sorted(groups.items()) if any(is_healthy(r) for r in g)}
    started = time.perf_counter()
    summary: dict[str, Any] = {
        "latent_dim": latent_dim,
        "seed": seed,
        "include_controls": include_controls,
        "workloads": {},
    }
    attributions: dict[str, Any] = {}
    for name, group in fitted.items():
        summary["workloads"][name] = _fit_workload(
            store,
            name,
            group,
            settings,
            console=console,
            single=len(fitted) == 1,
            attributions=attributions,
        )
    summary["workloads_without_baseline"] = sorted(set(groups) - set(fitted))
    summary["wall_s"] = time.perf_counter() - started
    write_json(store.root / MONITOR_DIR / ATTRIBUTION_FILE, to_jsonable(attributions))
    write_json(store.root / MONITOR_DIR / FIT_FILE, summary)
    n_scored = sum(len(g) for g in fitted.values())
    say(console, f"scores written for {n_scored} runs in {summary['wall_s']:.1f} s")
    return summary
