"""`monitor score`: every registered detector on the runs of an audit (imported ones included).

Guards need no fit and score every run. Fitted detectors (the Meta-State Monitor, …) come from
a monitor fitted on ANOTHER audit (`--monitor OTHER/monitor`, loaded through each detector's
`load`); its features are matched to the runs' telemetry columns by name. A feature a run lacks
is said (one line per feature) and scored at its healthy median, as `FeatureExtractor` does for
any missing column; a run with none of the features cannot be scored and is an error that names
the features needed. Without `--monitor`, fitted detectors are skipped with a note (their
columns stay NaN). Each run gets `scores.parquet` in the layout `monitor fit` writes, and the
per-run alarm summaries (`ScoreResult`) go to `<audit>/monitor/score.json` for the report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stabilitybench.detectors.base import (
    BaseDetector,
    DetectorSettings,
    detector_classes,
)
from stabilitybench.errors import StabilityBenchError
from stabilitybench.evaluation.fitting import (
    FIT_FILE,
    SCORES_FILE,
    done_runs,
    require_full_telemetry,
    say,
    score_frame,
)
from stabilitybench.evaluation.results import MONITOR_DIR
from stabilitybench.io import write_json, write_parquet
from stabilitybench.metrics.serialize import load_json_as, to_jsonable
from stabilitybench.store import AUDIT_FILE, RunData, RunOutcome, RunStore

SCORE_FILE = "score.json"
MONITOR_HINT = (
    "fit one with `stabilitybench monitor fit OTHER_AUDIT` and pass `--monitor OTHER_AUDIT/monitor`"
)


@dataclass
class DetectorAlarms:
    """What one detector said on one run: its first native alarm and the signal behind it."""

    detector: str
    title: str
    column: str
    scored: bool
    first_alarm_step: int | None = None
    alarms: int = 0  # native alarm events (up-crossings)
    alarm_steps: int = 0  # steps in alarm
    max_score: float | None = None  # None when unscored; inf is JSON null too (see `diverged`)
    max_score_infinite: bool = False
    deviated_first: str | None = None  # `signal (+4.2σ)` at the first alarm
    note: str | None = None


@dataclass
class RunAlarms:
    """One scored run: its identity, length, divergence and every detector's alarms."""

    run_id: str
    label: str
    steps: int
    diverged_step: int | None
    detectors: list[DetectorAlarms] = field(default_factory=list)
    missing_features: list[str] = field(default_factory=list)

    def of(self, detector: str) -> DetectorAlarms | None:
        return next((d for d in self.detectors if d.detector == detector), None)


@dataclass
class ScoreResult:
    """The `monitor score` result (`<audit>/monitor/score.json`)."""

    monitor: str | None  # the monitor folder used, or None
    monitor_kind: str | None  # the workload kind the monitor was fitted on, when known
    features: list[str] = field(default_factory=list)  # the fitted model's features
    runs: list[RunAlarms] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def score_path(root: str | Path) -> Path:
    return Path(root) / MONITOR_DIR / SCORE_FILE


def load_score_result(root: str | Path) -> ScoreResult:
    """The alarms `monitor score` last wrote for an audit folder (for the report)."""
    return load_json_as(ScoreResult, score_path(root), "run `stabilitybench monitor score DIR`")


# -- the monitor folder ------------------------------------------------------------------------
def _has_model(folder: Path) -> bool:
    from stabilitybench.monitor.ssm import CONFIG_FILE

    return (folder / CONFIG_FILE).is_file()


def resolve_monitor(path: Path) -> Path:
    """The folder holding one fitted monitor: `path` itself, or its one workload subfolder
    (an audit's `monitor/`), or the `monitor/` of an audit folder."""
    if not path.is_dir():
        raise StabilityBenchError(f"--monitor {path}: no such folder; {MONITOR_HINT}")
    if _has_model(path):
        return path
    if (path / AUDIT_FILE).is_file() and (path / MONITOR_DIR).is_dir():
        return resolve_monitor(path / MONITOR_DIR)
    inside = sorted(p for p in path.iterdir() if p.is_dir() and _has_model(p))
    if len(inside) == 1:
        return inside[0]
    if inside:
        names = ", ".join(p.name for p in inside)
        raise StabilityBenchError(
            f"--monitor {path} holds monitors of several workloads ({names}); "
            f"pass one of them, e.g. --monitor {inside[0]}"
        )
    raise StabilityBenchError(
        f"--monitor {path} is not a fitted monitor (no monitor.json + model.safetensors); "
        + MONITOR_HINT
    )


def monitor_kind(folder: Path) -> str | None:
    """The workload kind of the audit the monitor was fitted on (its audit.json), if found."""
    for parent in (folder.parent, folder.parent.parent):
        if (parent / AUDIT_FILE).is_file():
            audit = RunStore(parent).audit()
            workloads = audit.spec.get("workloads") or []
            kinds = {str(w["kind"]) for w in workloads if isinstance(w, dict) and "kind" in w}
            return ", ".join(sorted(kinds)) or None
    return None


def load_fitted(folder: Path, notes: list[str]) -> dict[str, BaseDetector]:
    """Every registered fitted detector that keeps a saved model in `folder`."""
    loaded: dict[str, BaseDetector] = {}
    for name, cls in detector_classes().items():
        if not cls.fitted:
            continue
        detector = cls.load(folder)
        if detector is None:
            notes.append(f"{name}: keeps no saved model in {folder}; skipped")
        else:
            loaded[name] = detector  # type: ignore[assignment]
    if not loaded:
        raise StabilityBenchError(f"--monitor {folder}: no fitted detector could be loaded")
    return loaded


# -- feature matching --------------------------------------------------------------------------
def _label(run: RunData) -> str:
    return run.info.label or run.run_id


def _present(table: pd.DataFrame, column: str) -> bool:
    if column not in table.columns:
        return False
    return bool(pd.to_numeric(table[column], errors="coerce").notna().any())


def match_features(
    runs: Sequence[RunData], fitted: dict[str, BaseDetector], notes: list[str]
) -> dict[str, list[str]]:
    """Per run_id: the fitted features it lacks. One note per missing feature; a run with none
    of a model's features is an error naming them (the model cannot score it)."""
    missing: dict[str, list[str]] = {r.run_id: [] for r in runs}
    for name, detector in fitted.items():
        needed = detector.inputs()
        for run in runs:
            lacks = [c for c in needed if not _present(run.telemetry, c)]
            if needed and len(lacks) == len(needed):
                raise StabilityBenchError(
                    f"--monitor: run {_label(run)!r} has none of the features the {name} model "
                    f"was fitted on; it needs at least one of: {', '.join(needed)} (its columns: "
                    f"{', '.join(map(str, run.telemetry.columns))}; import with "
                    "--map TAG=COLUMN to store a tag under one of these names)"
                )
            missing[run.run_id] += [c for c in lacks if c not in missing[run.run_id]]
        for column in needed:
            without = [_label(r) for r in runs if column in missing[r.run_id]]
            if without:
                which = (
                    f"every run ({len(runs)})"
                    if len(without) == len(runs)
                    else f"{len(without)} of {len(runs)} runs ({', '.join(without)})"
                )
                notes.append(
                    f"{name}: feature {column} is missing in {which}; scored at its healthy median"
                )
    return missing


# -- one run's alarms --------------------------------------------------------------------------
def _events(flags: np.ndarray) -> int:
    previous = np.concatenate([[False], flags[:-1]])
    return int((flags & ~previous).sum())


def detector_alarms(
    detector: BaseDetector,
    frame: pd.DataFrame,
    table: pd.DataFrame,
    scored: bool,
    index_names: Mapping[str, Sequence[str]] | None = None,
) -> DetectorAlarms:
    """First alarm, alarm count, max score and the signal that deviated first, from the run's
    scores.parquet frame and its telemetry."""
    out = DetectorAlarms(detector.name, detector.title, detector.column, scored=scored)
    if not scored:
        return out
    values = frame[detector.column].to_numpy(dtype=float)
    flags = frame[f"{detector.column}_native"].to_numpy(dtype=bool)
    finite = values[~np.isnan(values)]
    if finite.size:
        top = float(finite.max())
        out.max_score_infinite = math.isinf(top)
        out.max_score = top
    out.alarms, out.alarm_steps = _events(flags), int(flags.sum())
    if flags.any():
        index = int(np.argmax(flags))
        out.first_alarm_step = int(frame["step"].iloc[index])
        out.deviated_first = detector.attribution(table, index, index_names)
    return out


def _diverged_step(run: RunData) -> int | None:
    outcome = run.info.outcome or RunOutcome()
    step = outcome.diverged_step
    if step is None and outcome.diverged:
        evals = run.evals
        bad = evals[np.isneginf(evals["perf"].to_numpy(dtype=float))] if len(evals) else evals
        step = int(bad["step"].iloc[0]) if len(bad) else None
    return None if step is None else int(step)


# -- the verb ----------------------------------------------------------------------------------
def score_audit(
    store: RunStore, monitor: str | Path | None = None, console: Any = None
) -> ScoreResult:
    """Score every finished run with every registered detector; write scores.parquet per run
    and `monitor/score.json`. Everything is checked before anything is written."""
    require_full_telemetry(store)
    runs = done_runs(store)
    if not runs:
        raise StabilityBenchError(
            f"{store.root} has no finished runs with telemetry to score; import logs with "
            "`stabilitybench import SOURCE --out DIR` or run `stabilitybench audit SPEC --out DIR`"
        )
    settings = DetectorSettings()
    classes = detector_classes()
    result = ScoreResult(monitor=None, monitor_kind=None)
    fitted: dict[str, BaseDetector] = {}
    if monitor is not None:
        folder = resolve_monitor(Path(monitor))
        fitted = load_fitted(folder, result.notes)
        result.monitor, result.monitor_kind = str(folder), monitor_kind(folder)
        result.features = list(dict.fromkeys(c for d in fitted.values() for c in d.inputs()))
        missing = match_features(runs, fitted, result.notes)
        kinds = {r.info.kind or "?" for r in runs}
        if result.monitor_kind and result.monitor_kind not in kinds:
            result.notes.insert(
                0,
                f"the monitor was fitted on {result.monitor_kind} runs and these are "
                f"{', '.join(sorted(kinds))}: its deviation compares them with healthy "
                f"{result.monitor_kind} training, through the features they share",
            )
    else:
        missing = {r.run_id: [] for r in runs}
        skipped = [n for n, c in classes.items() if c.fitted]
        if skipped:
            result.notes.append(
                f"{', '.join(skipped)}: fitted detectors, skipped without a monitor; pass "
                "--monitor OTHER_AUDIT/monitor (a monitor fitted on healthy runs of another audit)"
            )
    if (store.root / MONITOR_DIR / FIT_FILE).exists():
        result.notes.append(
            "this replaces the scores.parquet files `monitor fit` wrote (its held-out folds); "
            "rerun `stabilitybench monitor fit DIR` to restore them for `monitor evaluate`"
        )
    frames = []
    for run in runs:
        frame = score_frame(run, fitted or None, settings)
        result.runs.append(_run_alarms(run, frame, fitted, settings, missing[run.run_id]))
        frames.append((run, frame))
    for run, frame in frames:
        write_parquet(store.run_dir(run.run_id) / SCORES_FILE, frame)
    write_json(score_path(store.root), to_jsonable(result))
    say(console, f"scores written for {len(runs)} runs")
    return result


def _run_alarms(
    run: RunData,
    frame: pd.DataFrame,
    fitted: Mapping[str, BaseDetector],
    settings: DetectorSettings,
    missing: list[str],
) -> RunAlarms:
    """One run's alarms under every registered detector (fitted ones only from `fitted`)."""
    alarms = RunAlarms(
        run_id=run.run_id,
        label=_label(run),
        steps=len(run.telemetry),
        diverged_step=_diverged_step(run),
        missing_features=missing,
    )
    for name, cls in detector_classes().items():
        detector = fitted[name] if name in fitted else cls.create(settings)
        entry = detector_alarms(
            detector,  # type: ignore[arg-type]
            frame,
            run.telemetry,
            scored=not cls.fitted or name in fitted,
            index_names=run.info.telemetry_index,
        )
        if not entry.scored:
            entry.note = "skipped: not in the monitor" if fitted else "skipped: no --monitor"
        alarms.detectors.append(entry)
    return alarms
