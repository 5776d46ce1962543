"""One reading of the store: a typed `RunRecord` per run, computed once.

`audit_records(store)` reads every run.json and evaluation table, resolves each run's onset (a
perturbed run's own first perturbation window; a baseline borrows the earliest onset of its
matched perturbed runs), builds its dense performance signal from the telemetry (`dense_signal`)
and runs the collapse analysis with the audit's `collapse:` thresholds.
The summary, the early-warning evaluation and the report all consume these records; nothing
downstream derives an onset, a baseline flag or a collapse label again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from stabilitybench.errors import StabilityBenchError, validation_message
from stabilitybench.metrics import reliability as rel
from stabilitybench.metrics.collapse import (
    NO_DENSE_SIGNAL,
    Calibration,
    CollapseResult,
    analyze_collapse,
    calibrate,
    calibrate_fall_back,
    final_performance,
)
from stabilitybench.metrics.dense import DenseSignal, episode_return_signal, loss_signal
from stabilitybench.metrics.stability import stability_before_final, stability_score
from stabilitybench.settings import CollapseSettings
from stabilitybench.store import AuditRecord, RunInfo, RunStore
from stabilitybench.types import last_error_line

# Where a run's onset came from: its own events, (a baseline) matched perturbed runs, or the
# spec's `collapse.onset` (a fraction of the run, for runs that neither gives one).
ONSET_SOURCES = ("events", "matched_seed", "matched_knobs", "matched_workload", "spec")
# The telemetry columns the dense performance signal is made from (`metrics.dense`).
DENSE_COLUMNS = ("step", "env_step", "loss", "episode_return", "episodes")


@dataclass(frozen=True)
class Onset:
    """A run's perturbation onset: optimizer step, env step (RL) and where it came from."""

    step: int | None = None
    env_step: int | None = None
    source: str | None = None  # one of ONSET_SOURCES, None without an onset


@dataclass(frozen=True)
class Reliability:
    """Chan et al.'s within-run metrics, in units of the run's curve range (NaN: undefined)."""

    dispersion_across_time: float = math.nan
    short_term_risk: float = math.nan
    long_term_risk: float = math.nan


@dataclass(frozen=True, eq=False)
class EvalCurve:
    """A run's evaluations sorted by step: steps, perf and env steps (None for LM) (n,)."""

    steps: np.ndarray
    perf: np.ndarray
    env_steps: np.ndarray | None = None

    @classmethod
    def of(cls, evals: pd.DataFrame | None) -> EvalCurve:
        if evals is None or evals.empty or "perf" not in evals or "step" not in evals:
            return cls(np.array([]), np.array([]))
        frame = evals.sort_values("step", kind="stable")
        env = None
        if "env_step" in frame and frame["env_step"].notna().any():
            env = _numbers(frame["env_step"])
        return cls(_numbers(frame["step"]), _numbers(frame["perf"]), env)


@dataclass(frozen=True)
class RunTiming:
    """When a run started and finished (Unix seconds) and its wall time, from run.json."""

    started: float | None = None
    finished: float | None = None
    wall_s: float | None = None

    @classmethod
    def of(cls, info: RunInfo) -> RunTiming:
        return cls(info.started, info.finished, info.wall_s)


def _number_or_none(value: object) -> float | None:
    """A JSON number as float (booleans and everything else: None)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


@dataclass(frozen=True, eq=False)
class RunRecord:
    """Everything the analysis layer knows about one run, derived once from the store."""

    run_id: str
    label: str | None
    workload: str
    kind: str | None
    knobs: Mapping[str, Any]
    perturbation: str  # the label; `none` for a baseline
    perturbation_kind: str
    magnitude: float | None
    seed: int | None
    status: str
    error: str | None  # the last line of a failed run's error
    onset: Onset = field(default_factory=Onset)
    collapse: CollapseResult | None = None  # None: not finished or no evaluation
    final_perf: float | None = None
    reliability: Reliability | None = None
    stability_score: float | None = None
    stability_before_final: float | None = None  # claim 1's score (`stability_before_final`)
    healthy: bool = False  # perturbation none, unguarded, the workload's reference knobs
    curve: EvalCurve = field(default_factory=lambda: EvalCurve.of(None), repr=False)
    timing: RunTiming = field(default_factory=RunTiming)
    error_text: str | None = field(default=None, repr=False)  # the whole stored error
    outcome_final_perf: float | None = None  # what the workload reported (run.json outcome)
    guard: str = "none"  # the guard's label (`detector:action(...)`), `none` if unguarded
    # unperturbed at the knob levels of a recipe on trial (`intrinsic_runs`), guarded or not (a
    # guard audit of that recipe): judged against the healthy runs, and a guard's interventions
    # there are not false alarms (the recipe is what may diverge)
    on_trial: bool = False

    @property
    def intrinsic(self) -> bool:
        """A recipe on trial itself: finished, unguarded, at those levels (unperturbed, at knob
        levels that are not the reference and that no perturbed run shares)."""
        return self.on_trial and self.guard == "none" and self.done

    @property
    def is_baseline(self) -> bool:
        return self.perturbation_kind == "none"

    @property
    def done(self) -> bool:
        return self.status == "done"

    @property
    def collapsed(self) -> bool | None:
        return None if self.collapse is None else self.collapse.collapsed

    @property
    def knobs_key(self) -> str:
        return knobs_key(self.knobs)

    def __json__(self) -> dict[str, Any]:
        """The documented `summary --json` run entry (flat)."""
        c, r = self.collapse, self.reliability or Reliability()
        return {
            "run_id": self.run_id,
            "label": self.label,
            "workload": self.workload,
            "kind": self.kind,
            "knobs": dict(self.knobs),
            "perturbation": self.perturbation,
            "perturbation_kind": self.perturbation_kind,
            "magnitude": self.magnitude,
            "seed": self.seed,
            "status": self.status,
            "collapsed": None if c is None else c.collapsed,
            "collapse_reason": None if c is None else c.reason,
            "irreversible": None if c is None else c.irreversible,
            "diverged": None if c is None else c.diverged,
            "onset_step": self.onset.step,
            "onset_source": self.onset.source,
            "intrinsic": self.intrinsic,
            "on_trial": self.on_trial,
            "collapse_step": None if c is None else c.collapse_step,
            "collapse_env_steps": None if c is None else c.collapse_env_steps,
            "collapse_at": None if c is None else c.collapse_at,
            "collapse_eval_step": None if c is None else c.collapse_eval_step,
            "collapse_eval_at": None if c is None else c.collapse_eval_at,
            "collapse_timing": None if c is None else c.collapse_timing,
            "collapse_timing_note": None if c is None else c.collapse_timing_note,
            "dense_signal": None if c is None else c.dense_signal,
            "recovery_steps": None if c is None else c.recovery_steps,
            "recovery_env_steps": None if c is None else c.recovery_env_steps,
            "progress_undefined": None if c is None else c.progress_undefined,
            "perf_0": None if c is None else c.perf_0,
            "perf_pre": None if c is None else c.perf_pre,
            "min_progress": None if c is None else c.min_progress,
            "noise": None if c is None else c.noise,
            "drop_threshold": None if c is None else c.drop_threshold,
            "final_perf": self.final_perf,
            "n_evals": int(self.curve.steps.size),
            "n_missing_evals": 0 if c is None else c.n_missing_evals,
            "dispersion_across_time": None if c is None else r.dispersion_across_time,
            "short_term_risk": None if c is None else r.short_term_risk,
            "long_term_risk": None if c is None else r.long_term_risk,
            "stability_score": self.stability_score,
            "stability_before_final": self.stability_before_final,
            "error": self.error,
        }


def _numbers(column: pd.Series) -> np.ndarray:
    return pd.to_numeric(column, errors="coerce").to_numpy(dtype=float)


def knobs_key(knobs: Mapping[str, Any]) -> str:
    """A hashable, order-free text of a knob setting."""
    return json.dumps(dict(knobs), sort_keys=True, default=str)


def perturbation_magnitude(kind: str, params: Mapping[str, Any]) -> float | None:
    """The value of the parameter the perturbation class declares as its size, or None."""
    from stabilitybench.perturbations import registry

    cls = registry().get(kind)
    name = None if cls is None else cls.magnitude_field
    value = None if name is None else params.get(name)
    return _number_or_none(value)


def collapse_config(
    audit: AuditRecord | Mapping[str, Any], infos: Sequence[RunInfo | Mapping[str, Any]]
) -> CollapseSettings:
    """Thresholds from audit.json's spec.collapse, else a run's spec.collapse, else defaults."""
    if not isinstance(audit, AuditRecord):
        audit = AuditRecord.model_validate(dict(audit))
    found = (c for c in (audit.spec, *(RunInfo.of(i).spec for i in infos)) if "collapse" in c)
    config = next((c["collapse"] for c in found if isinstance(c["collapse"], Mapping)), {})
    fields = dict(config)
    if "k" in fields:  # the older name of pre_evals
        fields.setdefault("pre_evals", fields.pop("k"))
    try:
        return CollapseSettings.model_validate(fields)
    except ValidationError as exc:
        raise StabilityBenchError(validation_message(exc, ("collapse",))) from None


def event_onset(events: pd.DataFrame | None) -> Onset:
    """The earliest perturbation window of a run's events table (source `events`); a guard's
    interventions (`kind` guard) are not perturbations."""
    if events is None or events.empty or "start_step" not in events:
        return Onset()
    if "kind" in events:
        events = events[events["kind"] != "guard"]
        if events.empty:
            return Onset()
    starts = _numbers(events["start_step"])
    if np.all(np.isnan(starts)):
        return Onset()
    i = int(np.nanargmin(starts))
    env = _numbers(events["start_env_step"])[i] if "start_env_step" in events else math.nan
    return Onset(int(starts[i]), None if np.isnan(env) else int(env), "events")


def within_run_reliability(perf: np.ndarray) -> Reliability:
    """Chan et al.'s within-run metrics on the finite part of the curve, in curve ranges."""
    curve = rel.finite_prefix(perf)
    span = abs(rel.curve_range(curve)) if curve.size >= 2 else 0.0
    if not span > 1e-12:
        return Reliability()
    normalised = curve / span
    return Reliability(
        rel.dispersion_across_time(normalised),
        rel.short_term_risk(normalised),
        rel.long_term_risk(normalised),
    )


def run_record(
    info: RunInfo | Mapping[str, Any],
    evals: pd.DataFrame | None,
    onset: Onset,
    config: CollapseSettings,
    *,
    telemetry: pd.DataFrame | None = None,
    events: pd.DataFrame | None = None,
    calibration: Calibration | None = None,
) -> RunRecord:
    """The record of one run from its run.json, evaluations and resolved onset; `telemetry`
    (at least `DENSE_COLUMNS`) and `events` give the dense signal that times a collapse;
    `calibration`: what matched unperturbed runs of other seeds show (see `calibration_for`)."""
    info = RunInfo.of(info)
    pert, status = info.perturbation, info.status.value
    curve = EvalCurve.of(evals if status == "done" else None)
    record = RunRecord(
        run_id=info.run_id,
        label=info.label or None,
        workload=info.workload,
        kind=info.kind or None,
        knobs=dict(info.knobs),
        perturbation=pert.shown,
        perturbation_kind=pert.kind,
        magnitude=perturbation_magnitude(pert.kind, pert.params),
        seed=info.seed,
        status=status,
        error=last_error_line(info.error) if status == "failed" else None,
        onset=onset,
        curve=curve,
        timing=RunTiming.of(info),
        error_text=info.error.strip() if info.error else None,
        outcome_final_perf=info.final_perf,
        guard=str(info.guard.get("label", "guarded")) if info.guard else "none",
        healthy=info.is_healthy,
    )
    if curve.steps.size == 0:
        return record
    dense, why = dense_signal(telemetry, events, kind=record.kind, config=config)
    return _with_collapse(record, config, dense, why, calibration)


def dense_signal(
    telemetry: pd.DataFrame | None,
    events: pd.DataFrame | None,
    *,
    kind: str | None,
    config: CollapseSettings,
) -> tuple[DenseSignal | None, str | None]:
    """A run's dense performance signal from its telemetry, or None and why there is none.

    Training-episode returns (`episode_return`, `episodes`) when the telemetry has them;
    otherwise, for a run that is not RL, the training `loss` (an RL loss is not a performance).
    A ±inf loss is a divergence point of either. The loss inside a window of a perturbation
    that changes the training batches (`scope == "batch"`: label noise, data shift) measures the
    perturbed batches, not the model, and is left out.
    """
    if telemetry is None or telemetry.empty or "step" not in telemetry:
        return None, NO_DENSE_SIGNAL
    steps = _numbers(telemetry["step"])
    env = _numbers(telemetry["env_step"]) if "env_step" in telemetry else None
    loss = _numbers(telemetry["loss"]) if "loss" in telemetry else None
    if "episode_return" in telemetry and np.isfinite(_numbers(telemetry["episode_return"])).any():
        bad = np.zeros(steps.size, dtype=bool) if loss is None else np.isinf(loss)
        signal = episode_return_signal(
            steps,
            _numbers(telemetry["episode_return"]),
            _numbers(telemetry["episodes"]) if "episodes" in telemetry else None,
            env_steps=env,
            nonfinite_steps=steps[bad],
            nonfinite_env_steps=None if env is None else env[bad],
            span=config.return_ema_span,
        )
        return signal, None
    if kind == "rl":
        return None, "no dense performance signal (no training-episode returns: episode_return)"
    if loss is None:
        return None, NO_DENSE_SIGNAL
    windows, names = _batch_windows(events)
    reason = (
        f"the loss in a {'/'.join(names)} window is measured on perturbed batches"
        if names
        else None
    )
    signal = loss_signal(
        steps,
        loss,
        env_steps=env,
        span=config.loss_ema_span,
        excluded=windows,
        excluded_reason=reason,
    )
    return signal, None if signal is not None else NO_DENSE_SIGNAL


def _batch_windows(events: pd.DataFrame | None) -> tuple[list[tuple[int, int]], list[str]]:
    """`[start_step, end_step]` of every perturbation window that changes training batches."""
    if events is None or events.empty or "kind" not in events or "start_step" not in events:
        return [], []
    from stabilitybench.perturbations import registry

    classes = registry()
    windows: list[tuple[int, int]] = []
    names: list[str] = []
    ends = _numbers(events["end_step"]) if "end_step" in events else None
    for i, (kind, start) in enumerate(
        zip(events["kind"], _numbers(events["start_step"]), strict=True)
    ):
        cls = classes.get(str(kind))
        if cls is None or cls.scope != "batch" or not np.isfinite(start):
            continue
        end = ends[i] if ends is not None and np.isfinite(ends[i]) else np.inf
        windows.append((int(start), int(end) if np.isfinite(end) else 2**62))
        if str(kind) not in names:
            names.append(str(kind))
    return windows, names


def _with_collapse(
    record: RunRecord,
    config: CollapseSettings,
    dense: DenseSignal | None,
    why: str | None,
    calibration: Calibration | None,
) -> RunRecord:
    from dataclasses import replace

    curve, onset = record.curve, record.onset
    result = analyze_collapse(
        curve.steps,
        curve.perf,
        onset.step,
        calibration=calibration,
        env_steps=curve.env_steps,
        onset_env_step=onset.env_step,
        settings=config,
        dense=dense,
        no_dense_reason=why,
    )
    reliability = within_run_reliability(curve.perf)
    steps_after = None
    if result.collapsed and result.onset_step is not None and result.collapse_at is not None:
        steps_after = int(np.nanmax(curve.steps) - result.collapse_at)
    score = stability_score(
        result.collapsed,
        result.irreversible,
        result.recovery_steps,
        steps_after,
        reliability.dispersion_across_time,
    )
    return replace(
        record,
        collapse=result,
        final_perf=final_performance(curve.perf),
        reliability=reliability,
        stability_score=score,
        stability_before_final=stability_before_final(curve.perf),
    )


def baseline_onsets(records: Sequence[RunRecord]) -> dict[str, Onset]:
    """Onset for each finished baseline: the earliest among matched perturbed runs (workload,
    knobs, seed), else among perturbed runs of the same workload and knobs, else the workload."""
    by_match: dict[tuple[Any, ...], list[Onset]] = {}
    for r in records:
        if r.onset.step is None:
            continue
        for key in _match_keys(r):
            by_match.setdefault(key[0], []).append(r.onset)
    out: dict[str, Onset] = {}
    for r in records:
        if not (r.done and r.is_baseline):
            continue
        out[r.run_id] = Onset()
        for key, source in _match_keys(r):
            if by_match.get(key):
                best = min(by_match[key], key=lambda o: o.step or 0)
                out[r.run_id] = Onset(best.step, best.env_step, source)
                break
    return out


def _match_keys(r: RunRecord) -> tuple[tuple[tuple[Any, ...], str], ...]:
    return (
        ((r.workload, r.knobs_key, r.seed), "matched_seed"),
        ((r.workload, r.knobs_key), "matched_knobs"),
        ((r.workload,), "matched_workload"),
    )


def audit_records(store: RunStore, config: CollapseSettings | None = None) -> list[RunRecord]:
    """Every run's record, in run-id order (the one place onsets and collapse labels are made)."""
    infos = store.infos()
    config = config or collapse_config(store.audit() if store.exists() else AuditRecord(), infos)
    onsets: dict[str, Onset] = {}
    events: dict[str, pd.DataFrame] = {}
    for info in infos:
        rid = info.run_id
        if info.status == "done" and info.perturbation.kind != "none":
            events[rid] = store.table(rid, "events")
            onsets[rid] = event_onset(events[rid])
    # First pass: identities and onsets only, to match baselines to perturbed runs.
    bare = [run_record(i, None, onsets.get(i.run_id, Onset()), config) for i in infos]
    onsets.update(baseline_onsets([r for r in bare if r.done]))
    if config.onset is not None:
        for info in infos:
            if info.status == "done" and onsets.get(info.run_id, Onset()).step is None:
                onsets[info.run_id] = spec_onset(info, config.onset)
    trial = intrinsic_runs(bare)
    levels = {(r.workload, r.knobs_key) for r in bare if r.run_id in trial}
    bare = [
        replace(r, on_trial=r.is_baseline and (r.workload, r.knobs_key) in levels) for r in bare
    ]
    evals = {r.run_id: store.table(r.run_id, "evals") for r in bare if r.done}
    baselines = _baseline_curves(bare, evals)
    records = []
    for info, first in zip(infos, bare, strict=True):
        rid, onset = info.run_id, onsets.get(info.run_id, Onset())
        record = run_record(
            info,
            evals.get(rid),
            onset,
            config,
            telemetry=store.table(rid, "telemetry", columns=DENSE_COLUMNS)
            if rid in evals
            else None,
            events=events.get(rid),
            calibration=calibration_for(first, onset, baselines, config),
        )
        records.append(replace(record, on_trial=first.on_trial))
    return records


def spec_onset(info: RunInfo, fraction: float) -> Onset:
    """The spec's `collapse.onset` for one run: `fraction` of its planned optimizer steps (RL:
    of its env steps, and the optimizer steps those give); no onset for a run without a
    workload config (an imported run)."""
    workload = info.spec.get("workload") if isinstance(info.spec, Mapping) else None
    if not isinstance(workload, Mapping) or "total_steps" not in workload:
        return Onset()
    if workload.get("kind") == "rl":
        from stabilitybench.workloads.rl import parse_config

        settings = parse_config(dict(workload))
        return Onset(
            round(fraction * settings.expected_updates()),
            round(fraction * settings.total_steps),
            "spec",
        )
    return Onset(round(fraction * int(workload["total_steps"])), None, "spec")


def intrinsic_runs(records: Sequence[RunRecord]) -> set[str]:
    """The run ids of recipes on trial: finished, unperturbed, unguarded runs that are not
    healthy and whose workload and knob levels no perturbed run shares (there they would be
    the baselines of a perturbation, as a stochasticity level's unperturbed runs are)."""
    perturbed = {(r.workload, r.knobs_key) for r in records if not r.is_baseline}
    return {
        r.run_id
        for r in records
        if r.done
        and r.is_baseline
        and r.guard == "none"
        and not r.healthy
        and (r.workload, r.knobs_key) not in perturbed
    }


BaselineCurves = dict[tuple[str, str], list[tuple[int | None, EvalCurve]]]
HEALTHY = "healthy"  # the key (workload, HEALTHY) holds a workload's healthy runs


def _baseline_curves(
    records: Sequence[RunRecord], evals: Mapping[str, pd.DataFrame]
) -> BaselineCurves:
    """The evaluation curves of finished, unperturbed, unguarded runs, by (workload, knobs),
    and the workload's healthy ones by (workload, HEALTHY)."""
    out: BaselineCurves = {}
    for r in records:
        if r.done and r.is_baseline and r.run_id in evals:
            curve = EvalCurve.of(evals[r.run_id])
            out.setdefault((r.workload, r.knobs_key), []).append((r.seed, curve))
            if r.healthy:
                out.setdefault((r.workload, HEALTHY), []).append((r.seed, curve))
    return out


def calibration_for(
    record: RunRecord, onset: Onset, baselines: BaselineCurves, config: CollapseSettings
) -> Calibration | None:
    """What the matched baselines of *other* seeds (same workload and knobs, not perturbed, not
    guarded; for a run at a recipe on trial's levels, `on_trial`, guarded or not: the workload's
    healthy runs) show from this run's onset on; for a run without an onset, what the workload's
    healthy runs of other seeds show (`calibrate_fall_back`); None without such runs."""
    healthy = [
        (c.steps, c.perf)
        for seed, c in baselines.get((record.workload, HEALTHY), [])
        if seed != record.seed
    ]
    if onset.step is None:
        if record.kind == "imported":  # logs of unknown health calibrate nothing
            return None
        return calibrate_fall_back(
            healthy, confirm=config.confirm_evals, quantile=config.baseline_quantile
        )
    # A recipe on trial, guarded or not, is judged against the healthy runs, not against its own
    # recipe's other seeds (which share what is on trial).
    matched = (
        healthy
        if record.on_trial
        else [
            (c.steps, c.perf)
            for seed, c in baselines.get((record.workload, record.knobs_key), [])
            if seed != record.seed
        ]
    )
    return calibrate(
        matched,
        onset.step,
        k=config.pre_evals,
        confirm=config.confirm_evals,
        quantile=config.baseline_quantile,
    )
