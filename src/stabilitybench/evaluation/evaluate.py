"""`monitor evaluate`: every registered detector as a prospective warning of collapse.

Per workload (never pooled across workloads), with thresholds calibrated leave-one-seed-out on
healthy runs for a target false-alarm rate (`protocol.Thresholds`), alarm episodes renewed every
SOP (= the horizon) and a least useful lead SPH, in optimizer steps: event recall beside chance
and the `clock` control, lead time, false alarms per 1,000 steps, time in warning, the step
AUROC with a bootstrap over seeds and the onset-window outcome AUROC (`episodes.py`); how
low-dimensional the healthy telemetry is (`manifold.py`); then the macro average over workloads.
Collapse labels and steps come from the runs' records (`metrics.records`). Fitting lives in
`fitting.py`; the statistics in `alarms.py`; the table in `printing.py`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from pydantic import ValidationError

from stabilitybench.detectors.base import detector_classes
from stabilitybench.errors import StabilityBenchError
from stabilitybench.evaluation.alarms import BOOTSTRAP, percentile_ci
from stabilitybench.evaluation.episodes import WorkloadRuns, evaluate_detector
from stabilitybench.evaluation.fitting import (
    BASELINE_HINT,
    FIT_FILE,
    SCORES_FILE,
    complete_scores,
    done_runs,
    fit_audit,
    require_runs,
)
from stabilitybench.evaluation.manifold import ManifoldResult, manifold_report, signal_columns
from stabilitybench.evaluation.printing import print_evaluation
from stabilitybench.evaluation.protocol import NO_LEAD_STEPS, ScoredRun
from stabilitybench.evaluation.results import (
    EVALUATION_FILE,
    MACRO_FIELDS,
    MONITOR_DIR,
    NO_VALUE,
    DetectorResult,
    Evaluation,
    Protocol,
    WorkloadResult,
    evaluation_path,
    load_evaluation,
)
from stabilitybench.io import read_json, write_json
from stabilitybench.metrics.records import RunRecord, audit_records
from stabilitybench.metrics.serialize import to_jsonable
from stabilitybench.settings import (
    MAX_TARGET_FALSE_ALARMS,
    WarningSettings,
    warning_by_workload,
)
from stabilitybench.store import RunStore

__all__ = [
    "EVALUATION_FILE",
    "FIT_FILE",
    "MONITOR_DIR",
    "SCORES_FILE",
    "WorkloadRuns",
    "evaluate_audit",
    "evaluate_detector",
    "fit_audit",
    "load_evaluation",
    "print_evaluation",
]
_FIT_HINT = "run `stabilitybench monitor fit DIR`"


def _no_fit(store: RunStore) -> StabilityBenchError:
    """The error for an audit without a fitted monitor; a findings folder's names no path (it is
    judged in a scratch copy: the documents say the same whoever judges them)."""
    if store.is_findings_folder:
        return StabilityBenchError(
            "no fitted monitor: the folder was exported without one (`export --no-fit`, or a "
            "slice without healthy runs); `merge` it with the other slices of its audit, or "
            "export the audit folder again"
        )
    return StabilityBenchError(f"no fitted monitor in {store.root}: {_FIT_HINT}")


def evaluate_audit(
    store: RunStore,
    target_false_alarms: float | None = None,
    horizon: int | None = None,
    *,
    sph: int | None = None,
    records: Sequence[RunRecord] | None = None,
    seed: int = 0,
    reps: int = BOOTSTRAP,
) -> Evaluation:
    """The `monitor evaluate --json` document; also written to `<audit>/monitor/evaluation.json`.

    The horizon (SOP), SPH and target come from the spec's `warning` (per workload, over the
    audit's); `target_false_alarms`, `horizon` and `sph` given here override them for every
    workload. `records`: the audit's run records, if already made. `seed` drives the bootstrap
    and the surrogates (the only randomness), so an evaluation is reproducible.
    """
    override = _override(target_false_alarms, horizon, sph)
    with_scores, protocol = _scored_runs(store, records, seed=seed, reps=reps)
    groups = _split(r for r in with_scores if r.record.guard == "none")
    spec = store.audit().spec
    audit_level = WarningSettings.model_validate(spec.get("warning") or {}).over(override)
    per_workload = warning_by_workload(spec)
    result = Evaluation(audit_level.target_false_alarms, audit_level.horizon, protocol)
    protocol.horizon = protocol.sop = audit_level.horizon
    protocol.sph, protocol.gap = audit_level.sph, audit_level.gap
    protocol.target_false_alarms = audit_level.target_false_alarms
    chosen = {n: per_workload.get(n, audit_level).over(override) for n in groups}
    for name, settings in chosen.items():
        settings.check(f"warning of workload {name!r}")
        _check_length(name, groups[name], settings)
    rng = np.random.default_rng(seed)
    draws: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    for name in sorted(groups):
        settings = chosen[name]
        result.workloads[name] = _evaluate_workload(
            name, groups[name], settings, protocol, draws, rng, reps
        )
    result.detectors = {
        detector: macro_average(
            {w: e.detectors[detector] for w, e in result.workloads.items()}, draws[detector]
        )
        for detector in detector_classes()
    }
    _explain(protocol)
    write_json(evaluation_path(store.root), to_jsonable(result))
    return result


def _scored_runs(
    store: RunStore, records: Sequence[RunRecord] | None, *, seed: int, reps: int
) -> tuple[list[ScoredRun], Protocol]:
    """The finished runs with scores, each with its record, and the protocol's bookkeeping;
    a user error if nothing can be evaluated yet."""
    runs = done_runs(store)
    if runs and records is None:
        records = audit_records(store)
    by_id = {r.run_id: r for r in records or ()}
    scored_all = [ScoredRun(run, by_id[run.run_id]) for run in runs]
    if any(r.is_baseline for r in runs):  # name the workload that lacks healthy runs
        _require_healthy(scored_all)
    require_runs(runs, need_perturbed=True)
    if not (store.root / MONITOR_DIR / FIT_FILE).exists():
        raise _no_fit(store)
    for run in runs:  # a detector that needs no fit, added after the scores were written
        if run.scores is not None and len(run.scores) > 0:
            run.scores = complete_scores(run, run.scores)
    with_scores = [r for r in scored_all if r.run.scores is not None and len(r.run.scores) > 0]
    if not with_scores:
        raise _no_fit(store)
    protocol = Protocol(
        no_lead_steps=NO_LEAD_STEPS,
        bootstrap_reps=reps,
        seed=seed,
        latent_dim=read_json(store.root / MONITOR_DIR / FIT_FILE).get("latent_dim"),
        n_unscored=len(runs) - len(with_scores),
        n_guarded=sum(r.record.guard != "none" for r in with_scores),
    )
    return with_scores, protocol


def _evaluate_workload(
    name: str,
    split: WorkloadRuns,
    settings: WarningSettings,
    protocol: Protocol,
    draws: dict[str, dict[str, np.ndarray]],
    rng: np.random.Generator,
    reps: int,
) -> WorkloadResult:
    """Every detector on one workload; its bootstrap draws go to `draws` for the macro CI."""
    protocol.n_unjudged += split.unjudged
    protocol.n_flagged_healthy += split.flagged
    entry = WorkloadResult(
        n_collapsed=len(split.collapsed),
        n_not_collapsed=len(split.judged) - len(split.collapsed),
        n_healthy=len(split.healthy),
        horizon=settings.horizon,
        target_false_alarms_per_1k=settings.target_false_alarms,
        sph=settings.sph,
        gap=settings.gap,
    )
    no_lead = sum(r.no_lead_possible(settings.sph) for r in split.collapsed)
    if no_lead:
        protocol.no_lead_possible[name] = no_lead
    for detector, cls in detector_classes().items():
        entry.detectors[detector], boot = evaluate_detector(cls, split, settings, rng, reps)
        if boot is not None:
            draws[detector][name] = boot
    entry.manifold = _manifold(split, settings)
    return entry


def _manifold(split: WorkloadRuns, settings: WarningSettings) -> ManifoldResult:
    """How many components the healthy telemetry needs, and how collapsing runs leave it."""
    collapsing = [
        (_signals(r), r.collapse_interval[0], r.onset_step)  # type: ignore[index]
        for r in split.judged
        if r.collapse_interval is not None
    ]
    healthy = [_signals(r) for r in split.healthy]
    knobs = {k for r in split.healthy for k in r.run.info.knobs}
    return manifold_report(healthy, collapsing, window=settings.horizon, knobs=knobs)


def _signals(run: ScoredRun) -> pd.DataFrame:
    """The run's step and the telemetry signals the manifold report reads."""
    table = run.run.telemetry
    return table[["step", *signal_columns([c for c in table.columns if c != "step"])]]


def _check_length(name: str, split: WorkloadRuns, settings: WarningSettings) -> None:
    """SPH must leave room for a warning inside the workload's runs."""
    runs = [*split.healthy, *split.judged]
    length = max((int(r.steps.max()) + 1 for r in runs if len(r.steps)), default=0)
    if length and settings.sph >= length:
        raise StabilityBenchError(
            f"warning.sph of workload {name!r} is {settings.sph} optimizer steps, not less than "
            f"its runs' length ({length}): no warning could come in time; set a smaller `sph`"
        )


def _explain(protocol: Protocol) -> None:
    """Notes on the runs the evaluation could not use."""
    if protocol.n_unscored:
        protocol.notes.append(
            f"{protocol.n_unscored} finished runs have no scores; rerun "
            "`stabilitybench monitor fit DIR`"
        )
    if protocol.n_flagged_healthy:
        protocol.notes.append(
            f"{protocol.n_flagged_healthy} healthy runs are flagged collapsed by the collapse "
            "criterion and are left out (never a healthy reference)"
        )
    if protocol.n_unjudged:
        protocol.notes.append(
            f"{protocol.n_unjudged} unhealthy runs have no collapse verdict (no evaluation to "
            "judge them by) and are left out"
        )


FLAG_MESSAGES = {
    "target_false_alarms": (
        f"--target-false-alarms must be a number in (0, {MAX_TARGET_FALSE_ALARMS:g}] (false "
        "alarms per 1,000 steps), got {value}"
    ),
    "horizon": "--horizon must be a whole number of optimizer steps >= 1, got {value}",
    "sph": "--sph must be a whole number of optimizer steps >= 0, got {value}",
}


def _override(
    target: float | None, horizon: int | None, sph: int | None = None
) -> WarningSettings | None:
    """The command line's warning settings, checked by `WarningSettings` (strictly: no bool for
    a step count, no NaN); None where it gives none."""
    given = {"target_false_alarms": target, "horizon": horizon, "sph": sph}
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return None
    try:
        return WarningSettings.model_validate(given, strict=True)
    except ValidationError as exc:
        field = str(exc.errors()[0]["loc"][0])
        raise StabilityBenchError(FLAG_MESSAGES[field].format(value=given[field])) from None


def _require_healthy(runs: Sequence[ScoredRun]) -> None:
    """Every workload needs healthy runs: they set every threshold."""
    workloads = sorted({r.workload for r in runs})
    missing = [w for w in workloads if not any(r.healthy for r in runs if r.workload == w)]
    if missing:
        names = ", ".join(repr(w) for w in missing)
        raise StabilityBenchError(
            f"workload {names} has no finished healthy runs (perturbation `none` at the "
            f"workload's `reference` knobs) to calibrate thresholds on; {BASELINE_HINT}, and "
            "give the workload a `reference:` among its swept knob values"
        )


def _split(runs: Iterable[ScoredRun]) -> dict[str, WorkloadRuns]:
    groups: dict[str, WorkloadRuns] = defaultdict(WorkloadRuns)
    for run in runs:
        split = groups[run.workload]
        if run.healthy and run.record.collapsed is True:
            split.flagged += 1  # the criterion flags it: not a healthy reference
        elif run.healthy:
            split.healthy.append(run)
        elif run.record.collapsed is None:
            split.unjudged += 1
        else:
            split.judged.append(run)
    return dict(groups)


def macro_average(
    per_workload: dict[str, DetectorResult], draws: dict[str, np.ndarray]
) -> DetectorResult:
    """The mean over workloads of each figure that a workload has (never a pooled figure)."""
    out = DetectorResult()
    for name in MACRO_FIELDS:
        values = [getattr(r, name) for r in per_workload.values() if getattr(r, name) is not None]
        setattr(out, name, float(np.mean(values)) if values else None)
        missing = [w for w, r in per_workload.items() if getattr(r, name) is None]
        if values and missing:
            out.note(f"{name}: the mean of {len(values)} of {len(per_workload)} workloads")
        elif not values:
            out.note(f"{name}: {NO_VALUE}")
    iqrs = [r.lead_time_iqr for r in per_workload.values() if r.lead_time_iqr is not None]
    if iqrs:
        out.lead_time_iqr = [
            float(np.mean([q[0] for q in iqrs])),
            float(np.mean([q[1] for q in iqrs])),
        ]
    with_auroc = [w for w, r in per_workload.items() if r.auroc is not None]
    if with_auroc and all(w in draws for w in with_auroc):
        out.auroc_ci = percentile_ci(np.mean([draws[w] for w in with_auroc], axis=0))
    elif with_auroc:
        out.note("auroc_ci: a workload has too few collapsed runs for a bootstrap")
    return out
