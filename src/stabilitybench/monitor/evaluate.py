"""`monitor evaluate`: compare every registered detector as an early warning of collapse.

For each detector: collapse-prediction AUROC of the score right after onset (bootstrap CI),
and recall, precision, lead times and false alarms per 1,000 healthy steps at a threshold
calibrated on held-out healthy runs (`protocol.Thresholds`), plus the same figures for the
detector's own native rule. Collapse labels come from the runs' records (`metrics.records`).
Fitting lives in `fitting.py`; the statistics in `alarms.py`; the table in `printing.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from stabilitybench.errors import StabilityBenchError
from stabilitybench.io import read_json, write_json
from stabilitybench.metrics.records import audit_records
from stabilitybench.metrics.serialize import to_jsonable
from stabilitybench.monitor.alarms import (
    AlarmStats,
    alarm_stats,
    auroc,
    auroc_bootstrap_ci,
    too_few,
    window_max,
)
from stabilitybench.monitor.fitting import (
    FIT_FILE,
    SCORES_FILE,
    done_runs,
    fit_audit,
    require_runs,
)
from stabilitybench.monitor.printing import print_evaluation
from stabilitybench.monitor.protocol import ScoredRun, Thresholds
from stabilitybench.monitor.registry import BaseDetector, detector_classes
from stabilitybench.monitor.results import (
    EVALUATION_FILE,
    MONITOR_DIR,
    DetectorResult,
    Evaluation,
    evaluation_path,
    load_evaluation,
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


def evaluate_audit(
    store: RunStore, target_false_alarms: float = 1.0, *, seed: int = 0
) -> Evaluation:
    """The `monitor evaluate --json` document; also written to `<audit>/monitor/evaluation.json`.

    `seed` drives the AUROC bootstrap (the only randomness), so an evaluation is reproducible.
    """
    _check_target(target_false_alarms)
    runs = done_runs(store)
    require_runs(runs, need_perturbed=True)
    with_scores = [r for r in runs if r.scores is not None and len(r.scores) > 0]
    if not with_scores or not (store.root / MONITOR_DIR / FIT_FILE).exists():
        raise StabilityBenchError(f"no fitted monitor in {store.root}: {_FIT_HINT}")
    records = {r.run_id: r for r in audit_records(store)}
    # Guarded runs are not what the detectors are evaluated on (a guard changes the run).
    scored = [
        ScoredRun(run, records[run.run_id])
        for run in with_scores
        if records[run.run_id].guard == "none"
    ]
    healthy = [r for r in scored if r.record.is_baseline]
    perturbed = [r for r in scored if not r.record.is_baseline]
    require_runs([r.run for r in scored], need_perturbed=True)
    judged = [
        r for r in perturbed if r.record.onset.step is not None and r.record.collapsed is not None
    ]
    rng = np.random.default_rng(seed)
    n_collapsed = sum(bool(r.record.collapsed) for r in judged)
    result = Evaluation(
        target_false_alarms_per_1k=float(target_false_alarms),
        n_collapsed=n_collapsed,
        n_recovered=len(judged) - n_collapsed,
        n_baseline=len(healthy),
        n_unjudged=len(perturbed) - len(judged),
        n_unscored=len(runs) - len(scored),
        latent_dim=read_json(store.root / MONITOR_DIR / FIT_FILE).get("latent_dim"),
        seed=seed,
        detectors={
            name: evaluate_detector(cls, healthy, judged, target_false_alarms, rng)
            for name, cls in detector_classes().items()
        },
    )
    if result.n_unscored:
        result.notes.append(
            f"{result.n_unscored} finished runs have no scores; rerun "
            "`stabilitybench monitor fit DIR`"
        )
    write_json(evaluation_path(store.root), to_jsonable(result))
    return result


def _check_target(target: float) -> None:
    if not (isinstance(target, int | float) and math.isfinite(target) and target > 0):
        raise StabilityBenchError(
            "--target-false-alarms must be a number > 0 (false alarms per 1,000 steps), "
            f"got {target}"
        )


def evaluate_detector(
    cls: type[BaseDetector],
    healthy: Sequence[ScoredRun],
    judged: Sequence[ScoredRun],
    target: float,
    rng: np.random.Generator,
) -> DetectorResult:
    """One detector: AUROC after onset, alarm statistics at the calibrated and native rules."""
    column = cls.column
    usable = [r for r in judged if r.scored_by(column)]
    usable_healthy = [r for r in healthy if r.scored_by(column)]
    thresholds = Thresholds(column, usable_healthy, target)
    result = DetectorResult(calibration=None)
    _auroc(result, usable, column, rng)
    trials = [r.trial() for r in usable]
    alarm_stats(
        trials,
        [thresholds.alarms(r) for r in usable],
        [thresholds.alarms(r) for r in usable_healthy],
        result,
    )
    result.calibration = thresholds.calibration
    result.threshold_median = thresholds.median([*usable_healthy, *usable])
    native = f"{column}_native"
    if all(r.has(native) for r in [*usable, *usable_healthy]):
        result.native = alarm_stats(
            trials,
            [r.flags(native) for r in usable],
            [r.flags(native) for r in usable_healthy],
            AlarmStats(),
        )
    return result


def _auroc(
    result: DetectorResult, usable: Sequence[ScoredRun], column: str, rng: np.random.Generator
) -> None:
    """AUROC of the window maximum (onset → first evaluation after it): collapsed vs recovered."""
    maxima = [window_max(r.values(column), r.steps, *r.outcome_window()) for r in usable]
    scores = np.nan_to_num(np.asarray(maxima, dtype=float), nan=-np.inf)
    labels = np.asarray([bool(r.record.collapsed) for r in usable], dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not (n_pos >= 1 and n_neg >= 1):
        result.note(too_few("AUROC", n_pos, n_neg))
        return
    finite = np.where(np.isposinf(scores), np.finfo(float).max, scores)
    result.auroc = auroc(finite, labels)
    if n_pos >= 2 and n_neg >= 2:
        result.auroc_ci = list(auroc_bootstrap_ci(finite, labels, rng))
    else:
        result.note(too_few("a bootstrap CI (need >= 2 of each)", n_pos, n_neg))
