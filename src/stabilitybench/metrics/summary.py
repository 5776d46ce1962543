"""The audit summary: per-run records, per-condition aggregates with CIs, decoupling, dose-response.

`summarize(store)` reads only the store (through `records.audit_records`) and returns a typed
`AuditSummary`; `to_jsonable(summary)` is the `summary --json` document (every field is
documented in docs/readme/metrics.md); `metrics.summary_printing` renders it as tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stabilitybench.errors import StabilityBenchError
from stabilitybench.metrics.conditions import (
    ConditionSummary,
    condition_summary,
    number,
    paired_excess,
)
from stabilitybench.metrics.decoupling import Decoupling, audit_decoupling
from stabilitybench.metrics.dose_response import DoseResponse, dose_response
from stabilitybench.metrics.guards import GuardComparison, guard_comparisons, interventions_of
from stabilitybench.metrics.intervals import DEFAULT_REPS, wilson_interval
from stabilitybench.metrics.records import RunRecord, audit_records, collapse_config
from stabilitybench.metrics.serialize import to_jsonable
from stabilitybench.settings import CollapseSettings
from stabilitybench.store import RunInfo, RunStore

SEED = 0  # the bootstrap's seed: the same store always gives the same summary


@dataclass
class AuditInfo:
    """The audit as a whole: name, counts, the collapse thresholds and the bootstrap's settings."""

    name: str
    path: str
    n_runs: int
    status_counts: dict[str, int]
    n_done: int
    n_failed: int
    n_unfinished: int
    collapse: CollapseSettings
    bootstrap_reps: int
    confidence: float
    seed: int
    notes: list[str] = field(default_factory=list)


@dataclass
class ShamFlagRate:
    """The collapse criterion's false-positive rate on one workload: the share of its judged
    sham and unperturbed (unguarded) runs that were flagged collapsed, with a Wilson 95 % CI,
    and the share of those runs judged at all (the rest: not learned, not testable, …)."""

    workload: str
    sham_flag_rate: float | None
    sham_flag_rate_ci: list[float | None]
    n_flagged: int
    n_judged: int
    n_runs: int  # sham and unperturbed runs, judged or not
    share_judged: float | None


def sham_flag_rates(records: Sequence[RunRecord]) -> list[ShamFlagRate]:
    """Per workload, the flag rate of runs that nothing harmful happened to."""
    out = []
    for workload in dict.fromkeys(r.workload for r in records):
        controls = [
            r
            for r in records
            if r.workload == workload
            and r.done
            and r.guard == "none"
            and r.perturbation_kind in ("none", "sham")
            and not r.intrinsic  # a recipe on trial is what is judged, not a control
        ]
        judged = [r for r in controls if r.collapsed is not None]
        flagged = sum(bool(r.collapsed) for r in judged)
        low, high = wilson_interval(flagged, len(judged)) if judged else (None, None)
        out.append(
            ShamFlagRate(
                workload,
                flagged / len(judged) if judged else None,
                [number(low), number(high)],
                flagged,
                len(judged),
                len(controls),
                len(judged) / len(controls) if controls else None,
            )
        )
    return out


@dataclass
class AuditSummary:
    """The `summary --json` document, typed."""

    audit: AuditInfo
    conditions: list[ConditionSummary]
    runs: list[RunRecord]
    decoupling: Decoupling
    dose_response: DoseResponse
    guards: list[GuardComparison] = field(default_factory=list)  # empty: no guarded runs
    # per workload: how often the criterion flags runs that nothing harmful happened to
    false_positives: list[ShamFlagRate] = field(default_factory=list)

    def run(self, run_id: str) -> RunRecord | None:
        return next((r for r in self.runs if r.run_id == run_id), None)


def _check_runs(store: RunStore, infos: Sequence[RunInfo]) -> None:
    if not infos:
        raise StabilityBenchError(
            f"audit {store.root} has no runs yet; start them with "
            f"`stabilitybench audit SPEC --out {store.root}`"
        )
    if not any(i.status == "done" for i in infos):
        detail = ", ".join(f"{v} {k}" for k, v in store.status_counts().items() if v)
        raise StabilityBenchError(
            f"audit {store.root} has no finished runs ({detail}); resume it with "
            f"`stabilitybench audit SPEC --out {store.root}`, and see failures with "
            f"`stabilitybench status {store.root}`"
        )


def conditions_of(
    records: Sequence[RunRecord], rng: np.random.Generator, reps: int
) -> list[ConditionSummary]:
    """One summary per (workload, knobs, perturbation, guard), in order of first appearance;
    a guarded condition's baseline is the unperturbed condition under the same guard."""
    groups: dict[tuple[str, str, str, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.workload, r.knobs_key, r.perturbation, r.guard), []).append(r)
    out = []
    for key, members in groups.items():
        baseline = None if key[2] == "none" else groups.get((key[0], key[1], "none", key[3]))
        summary = condition_summary(members, baseline, rng, reps)
        if members[0].perturbation_kind not in ("none", "sham"):
            _add_excess(summary, members, key, groups, rng, reps)
        out.append(summary)
    return out


def _add_excess(
    summary: ConditionSummary,
    members: Sequence[RunRecord],
    key: tuple[str, str, str, str],
    groups: dict[tuple[str, str, str, str], list[RunRecord]],
    rng: np.random.Generator,
    reps: int,
) -> None:
    """The condition's collapse rate beyond its control arm (sham, else unperturbed), by seed."""
    shams = [
        r
        for (w, k, _, g), rs in groups.items()
        if (w, k, g) == (key[0], key[1], key[3])
        for r in rs
        if r.perturbation_kind == "sham"
    ]
    control = shams or groups.get((key[0], key[1], "none", key[3]), [])
    if not control:
        return
    summary.control = "sham" if shams else "none"
    excess, ci, pairs = paired_excess(members, control, rng, reps)
    summary.collapse_excess, summary.collapse_excess_ci, summary.n_pairs = excess, ci, pairs


def audit_notes(records: Sequence[RunRecord]) -> list[str]:
    """What the reader must know about runs left out or judged differently."""
    notes = []
    failed = sum(r.status == "failed" for r in records)
    unfinished = sum(r.status in ("pending", "running") for r in records)
    if failed:
        notes.append(f"{failed} failed run(s) are listed but excluded from every aggregate")
    if unfinished:
        notes.append(
            f"{unfinished} unfinished run(s) (pending/running) are excluded; "
            "resume the audit to include them"
        )
    collapses = [r.collapse for r in records if r.collapse is not None]
    if missing := sum(c.n_missing_evals for c in collapses):
        notes.append(f"{missing} NaN evaluation(s) were treated as missing and skipped")
    if undefined := sum(c.progress_undefined and c.onset_step is not None for c in collapses):
        notes.append(
            f"{undefined} run(s) did not learn before onset: collapse judged on the relative scale"
        )
    timed = [c for c in collapses if c.collapsed]
    if fallback := sum(c.collapse_timing == "evaluation" for c in timed):
        notes.append(
            f"{fallback} of {len(timed)} collapse(s) timed at their confirming evaluation, not "
            "to the step (runs[].collapse_timing_note says why)"
        )
    if unjudged := sum(r.done and r.collapsed is None for r in records):
        notes.append(
            f"{unjudged} finished run(s) have no perturbation onset to judge collapse against"
        )
    return notes


def summarize(store: RunStore, *, reps: int = DEFAULT_REPS, seed: int = SEED) -> AuditSummary:
    """The audit summary. Failed and unfinished runs are listed but excluded from every aggregate.

    Raises StabilityBenchError for an audit without runs or without finished runs.
    """
    infos = store.infos()
    _check_runs(store, infos)
    audit = store.audit()
    config = collapse_config(audit, infos)
    records = audit_records(store, config)
    rng = np.random.default_rng(seed)
    conditions = conditions_of(records, rng, reps)
    info = AuditInfo(
        name=audit.name or store.root.name,
        path=str(store.root),
        n_runs=len(records),
        status_counts=store.status_counts(),
        n_done=sum(r.done for r in records),
        n_failed=sum(r.status == "failed" for r in records),
        n_unfinished=sum(r.status in ("pending", "running") for r in records),
        collapse=config,
        bootstrap_reps=reps,
        confidence=0.95,
        seed=seed,
        notes=audit_notes(records),
    )
    unguarded = [r for r in records if r.guard == "none"]  # the findings are about training
    decoupled = audit_decoupling(unguarded, rng, reps)
    guarded = [r for r in records if r.guard != "none" and r.done]
    interventions = {r.run_id: interventions_of(store.table(r.run_id, "events")) for r in guarded}
    steps = {r.run_id: _steps_trained(store, r.run_id) for r in guarded}
    comparisons = guard_comparisons(records, interventions, steps, rng, reps) if guarded else []
    return AuditSummary(
        info,
        conditions,
        records,
        decoupled,
        dose_response(unguarded),
        comparisons,
        sham_flag_rates(records),
    )


def _steps_trained(store: RunStore, run_id: str) -> int:
    outcome = store.info(run_id).outcome
    return 0 if outcome is None or outcome.steps is None else outcome.steps


def summary_document(store: RunStore, *, reps: int = DEFAULT_REPS, seed: int = SEED) -> Any:
    """`summarize` as the `summary --json` document (strict JSON: NaN/inf are null)."""
    return to_jsonable(summarize(store, reps=reps, seed=seed))
