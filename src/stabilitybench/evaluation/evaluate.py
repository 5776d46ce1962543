"""`monitor evaluate`: every registered detector as a prospective warning of collapse.

Per workload (never pooled across workloads), with thresholds calibrated leave-one-seed-out on
healthy runs for a target false-alarm rate (`protocol.Thresholds`) and a horizon H in optimizer
steps: event recall, lead time, false alarms per 1,000 steps on held-out healthy runs and on
judged runs that did not collapse, the step AUROC of "collapse within H" with a bootstrap
interval over runs, and the onset-window outcome AUROC; then the macro average over workloads.
Collapse labels and steps come from the runs' records (`metrics.records`). Fitting lives in
`fitting.py`; the statistics in `alarms.py`; the table in `printing.py`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydantic import ValidationError

from stabilitybench.detectors.base import BaseDetector, detector_classes
from stabilitybench.errors import StabilityBenchError
from stabilitybench.evaluation.alarms import (
    BOOTSTRAP,
    auroc,
    first_true_warning,
    pair_counts,
    percentile_ci,
    quartiles,
    run_bootstrap,
    too_few,
    warning_window,
    weighted_auroc,
    window_max,
)
from stabilitybench.evaluation.fitting import (
    BASELINE_HINT,
    FIT_FILE,
    SCORES_FILE,
    done_runs,
    fit_audit,
    require_runs,
)
from stabilitybench.evaluation.printing import print_evaluation
from stabilitybench.evaluation.protocol import NO_LEAD_STEPS, ScoredRun, Thresholds
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
    "evaluate_audit",
    "evaluate_detector",
    "fit_audit",
    "load_evaluation",
    "print_evaluation",
]
_FIT_HINT = "run `stabilitybench monitor fit DIR`"


@dataclass
class WorkloadRuns:
    """One workload's scored, unguarded runs split as the protocol uses them."""

    healthy: list[ScoredRun] = field(default_factory=list)
    judged: list[ScoredRun] = field(default_factory=list)  # unhealthy, with a collapse verdict
    unjudged: int = 0

    @property
    def collapsed(self) -> list[ScoredRun]:
        return [r for r in self.judged if r.collapsed]


def evaluate_audit(
    store: RunStore,
    target_false_alarms: float | None = None,
    horizon: int | None = None,
    *,
    records: Sequence[RunRecord] | None = None,
    seed: int = 0,
    reps: int = BOOTSTRAP,
) -> Evaluation:
    """The `monitor evaluate --json` document; also written to `<audit>/monitor/evaluation.json`.

    The horizon and target come from the spec's `warning` (per workload, over the audit's);
    `target_false_alarms` and `horizon` given here override them for every workload.
    `records`: the audit's run records, if already made. `seed` drives the bootstrap (the only
    randomness), so an evaluation is reproducible.
    """
    override = _override(target_false_alarms, horizon)
    with_scores, protocol = _scored_runs(store, records, seed=seed, reps=reps)
    groups = _split(r for r in with_scores if r.record.guard == "none")
    spec = store.audit().spec
    audit_level = WarningSettings.model_validate(spec.get("warning") or {}).over(override)
    per_workload = warning_by_workload(spec)
    result = Evaluation(audit_level.target_false_alarms, audit_level.horizon, protocol)
    rng = np.random.default_rng(seed)
    draws: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    for name in sorted(groups):
        settings = per_workload.get(name, audit_level).over(override)
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
        raise StabilityBenchError(f"no fitted monitor in {store.root}: {_FIT_HINT}")
    with_scores = [r for r in scored_all if r.run.scores is not None and len(r.run.scores) > 0]
    if not with_scores:
        raise StabilityBenchError(f"no fitted monitor in {store.root}: {_FIT_HINT}")
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
    entry = WorkloadResult(
        n_collapsed=len(split.collapsed),
        n_not_collapsed=len(split.judged) - len(split.collapsed),
        n_healthy=len(split.healthy),
        horizon=settings.horizon,
        target_false_alarms_per_1k=settings.target_false_alarms,
    )
    no_lead = sum(r.no_lead_possible for r in split.collapsed)
    if no_lead:
        protocol.no_lead_possible[name] = no_lead
    for detector, cls in detector_classes().items():
        entry.detectors[detector], boot = evaluate_detector(
            cls, split, settings.target_false_alarms, settings.horizon, rng, reps
        )
        if boot is not None:
            draws[detector][name] = boot
    return entry


def _explain(protocol: Protocol) -> None:
    """Notes on the runs the evaluation could not use."""
    if protocol.n_unscored:
        protocol.notes.append(
            f"{protocol.n_unscored} finished runs have no scores; rerun "
            "`stabilitybench monitor fit DIR`"
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
}


def _override(target: float | None, horizon: int | None) -> WarningSettings | None:
    """The command line's warning settings, checked by `WarningSettings` (strictly: no bool for
    a step count, no NaN); None where it gives none."""
    given = {"target_false_alarms": target, "horizon": horizon}
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
        if run.healthy:
            split.healthy.append(run)
        elif run.record.collapsed is None:
            split.unjudged += 1
        else:
            split.judged.append(run)
    return dict(groups)


def evaluate_detector(
    cls: type[BaseDetector],
    split: WorkloadRuns,
    target: float,
    horizon: int,
    rng: np.random.Generator,
    reps: int = BOOTSTRAP,
) -> tuple[DetectorResult, np.ndarray | None]:
    """One detector on one workload; also its step-AUROC bootstrap draws (for the macro CI)."""
    column = cls.column
    result = DetectorResult()
    healthy = [r for r in split.healthy if r.scored_by(column)]
    judged = [r for r in split.judged if r.scored_by(column)]
    if not healthy:
        result.note(
            f"no `{column}` scores on this workload's healthy runs (a signal it reads was not "
            "recorded)"
        )
        return result, None
    thresholds = Thresholds(column, healthy, target)
    if thresholds.in_sample:
        result.note("thresholds calibrated in-sample: the healthy runs share one seed")
    events = {id(r): thresholds.events(r) for r in [*healthy, *judged]}
    _warnings(result, judged, events, horizon)
    result.false_alarms_per_1k = _rate(healthy, events)
    calm = [r for r in judged if not r.collapsed]
    if calm:
        result.false_alarms_per_1k_not_collapsed = _rate(calm, events)
    else:
        result.note("no judged run without a collapse: no false-alarm rate on them")
    draws = _step_auroc(result, [*healthy, *judged], column, horizon, rng, reps)
    _outcome_auroc(result, [r for r in judged if r.record.onset.source == "events"], column)
    if len(judged) < len(split.judged):
        result.note(f"{len(split.judged) - len(judged)} judged runs have no `{column}` score")
    return result, draws


def _warnings(
    result: DetectorResult,
    judged: Sequence[ScoredRun],
    events: dict[int, np.ndarray],
    horizon: int,
) -> None:
    """Event recall and lead times over the collapses that leave room for a warning."""
    collapsed = [r for r in judged if r.collapsed and r.collapse_at is not None]
    no_lead = [r for r in collapsed if r.no_lead_possible]
    if no_lead:
        result.note(
            f"{len(no_lead)} collapses came within {NO_LEAD_STEPS} step of a perturbation's "
            "onset (no lead possible): left out of event recall and lead time"
        )
    leadable = [r for r in collapsed if not r.no_lead_possible]
    if not leadable:
        result.note(too_few("event recall", len(leadable), len(judged) - len(collapsed)))
        return
    leads = []
    for run in leadable:
        assert run.collapse_at is not None
        warned = first_true_warning(events[id(run)], run.steps, run.collapse_at, horizon)
        if warned is not None:
            leads.append(run.collapse_at - warned)
    result.event_recall = len(leads) / len(leadable)
    result.lead_time_median, result.lead_time_iqr = quartiles(leads)
    if not leads:
        result.note(f"no true warning within {horizon} steps before any collapse")


def _rate(runs: Sequence[ScoredRun], events: dict[int, np.ndarray]) -> float:
    """Alarms per 1,000 steps over these runs."""
    steps = sum(len(events[id(r)]) for r in runs)
    count = sum(int(events[id(r)].sum()) for r in runs)
    return 1000.0 * count / steps if steps else 0.0


def _step_auroc(
    result: DetectorResult,
    runs: Sequence[ScoredRun],
    column: str,
    horizon: int,
    rng: np.random.Generator,
    reps: int,
) -> np.ndarray | None:
    """Step AUROC of "collapse within H" over every scored step before a collapse; bootstrap
    over runs. Steps a detector could not score (NaN) are left out, and so are collapses that
    leave no room for a lead (their steps before the jolt could not be warned of)."""
    scores, labels = [], []
    runs = [r for r in runs if not r.no_lead_possible]
    for run in runs:
        values, steps = run.values(column), run.steps
        keep = ~np.isnan(values)
        label = np.zeros(len(steps), dtype=bool)
        if run.collapse_at is not None:
            keep &= steps < run.collapse_at
            label = warning_window(steps, run.collapse_at, horizon)
        scores.append(values[keep])
        labels.append(label[keep])
    pairs, positives, negatives = pair_counts(scores, labels)
    if positives.sum() == 0 or negatives.sum() == 0:
        result.note(f"no scored step within {horizon} steps before a collapse: no step AUROC")
        return None
    result.auroc = weighted_auroc(pairs, positives, negatives, np.ones(len(runs)))
    n_runs_pos = int((positives > 0).sum())
    if n_runs_pos < 2:
        result.note(
            f"too few collapsed runs for a bootstrap CI of the step AUROC: {n_runs_pos} (need 2)"
        )
        return None
    draws = run_bootstrap(pairs, positives, negatives, rng, reps)
    result.auroc_ci = percentile_ci(draws)
    if result.auroc_ci is None:
        result.note("no step-AUROC CI: most bootstrap draws lacked collapsed or calm steps")
    return draws


def _outcome_auroc(result: DetectorResult, runs: Sequence[ScoredRun], column: str) -> None:
    """AUROC of the window maximum (onset → first evaluation after it): collapsed vs not."""
    maxima = [window_max(r.values(column), r.steps, *r.outcome_window()) for r in runs]
    scores = np.nan_to_num(np.asarray(maxima, dtype=float), nan=-np.inf)
    labels = np.asarray([r.collapsed for r in runs], dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not (n_pos >= 1 and n_neg >= 1):
        result.note(too_few("the outcome AUROC (runs with an onset)", n_pos, n_neg))
        return
    finite = np.where(np.isposinf(scores), np.finfo(float).max, scores)
    result.outcome_auroc = auroc(finite, labels)


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
