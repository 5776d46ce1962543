"""Guarded vs unguarded: each guarded condition beside the same condition without a guard.

`guard_comparisons(records, interventions)` is pure over the run records and each guarded run's
interventions (the `kind: guard` rows of its events table, read by `summary`); it is the
`guards` list of `summary --json`.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stabilitybench.metrics.intervals import iqm, stratified_bootstrap_ci, wilson_interval
from stabilitybench.metrics.records import RunRecord


@dataclass(frozen=True)
class Intervention:
    """One guard event as the summary needs it."""

    step: int
    action: str
    rolled_back_to: int | None = None
    recorded_lost: int | None = None  # what the guard counted (events since it records it)

    @property
    def steps_lost(self) -> int:
        """Updates this intervention threw away, as the guard counted them (a second rollback to
        the same snapshot loses only what was trained since the first); for events written
        before the guard recorded it: 1 for a skip (or a moment reset, which undoes its step),
        the steps since the snapshot for a rollback, 0 for an LR cut."""
        if self.recorded_lost is not None:
            return self.recorded_lost
        if self.action == "rollback" and self.rolled_back_to is not None:
            return self.step + 1 - self.rolled_back_to
        return 1 if self.action in ("skip", "reset_moments") else 0


def interventions_of(events: Any) -> list[Intervention]:
    """The guard rows of an events table (a DataFrame with kind, name, params, start_step)."""
    if events is None or len(events) == 0 or "kind" not in events:
        return []
    out = []
    for row in events[events["kind"] == "guard"].to_dict("records"):
        params = row.get("params")
        values = json.loads(params) if isinstance(params, str) else dict(params or {})
        back, lost = values.get("rolled_back_to"), values.get("steps_lost")
        out.append(
            Intervention(
                int(row["start_step"]),
                str(row["name"]),
                None if back is None else int(back),
                None if lost is None else int(lost),
            )
        )
    return out


@dataclass
class Rate:
    """A rate over judged runs with its 95% Wilson interval."""

    n: int
    k: int
    rate: float | None
    ci: list[float | None]

    @classmethod
    def of(cls, k: int, n: int) -> Rate:
        low, high = wilson_interval(k, n)
        return cls(n, k, k / n if n else None, [low if n else None, high if n else None])


ON_TRIAL_CONDITION = "none (recipe on trial)"
"""How tables name the condition of a guarded recipe on trial (`GuardComparison.on_trial`)."""

Condition = tuple[str, str, str, str]
"""(workload, knobs key, perturbation, guard label) — runs of one condition differ by seed."""


@dataclass
class GuardComparison:
    """One guarded condition and the same (workload, knobs, perturbation) unguarded."""

    workload: str
    knobs: Mapping[str, Any]
    perturbation: str
    guard: str
    n_runs: int  # finished guarded runs
    n_unguarded: int  # finished unguarded runs of the same condition
    collapse: Rate
    collapse_unguarded: Rate
    irreversible: Rate
    irreversible_unguarded: Rate
    interventions_per_run: float | None
    by_action: dict[str, int] = field(default_factory=dict)
    steps_lost_per_run: float | None = None  # updates skipped or rolled back, mean per run
    extra_compute: float | None = None  # steps lost / steps trained, over the guarded runs
    wall_time_ratio: float | None = None  # median guarded wall_s / median unguarded wall_s
    false_interventions_per_run: float | None = None  # on healthy (unperturbed) guarded runs
    # unperturbed at a recipe on trial's knob levels (`RunRecord.on_trial`): what may diverge is
    # the recipe, so its interventions are not false alarms
    on_trial: bool = False
    final: Level | None = None  # final performance, guarded
    final_unguarded: Level | None = None  # the same condition unguarded
    # Guarded IQM − unguarded IQM with a percentile-bootstrap CI (runs resampled per arm).
    final_difference: Level | None = None


@dataclass(frozen=True)
class Level:
    """A point estimate (IQM of final performance, or a difference of two) with its 95% CI."""

    value: float | None
    ci: list[float | None]
    n: int


def _finite_finals(records: Sequence[RunRecord]) -> list[float]:
    """Final performance of finished runs; a diverged run (−inf) counts as the worst run seen."""
    values = [r.final_perf for r in records if r.done and r.final_perf is not None]
    values = [v for v in values if not math.isnan(v)]
    finite = [v for v in values if math.isfinite(v)]
    floor = min(finite) if finite else 0.0
    return [v if math.isfinite(v) else floor for v in values]


def _level(values: Sequence[float], rng: np.random.Generator, reps: int) -> Level | None:
    if not values:
        return None
    low, high = stratified_bootstrap_ci(np.asarray(values), rng=rng, reps=reps)
    return Level(iqm(values), [low, high], len(values))


def _difference(
    x: Sequence[float], y: Sequence[float], rng: np.random.Generator, reps: int
) -> Level | None:
    """IQM(x) − IQM(y), CI by resampling each arm's runs (x: (n,), y: (m,))."""
    if not x or not y:
        return None
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    diffs = np.array(
        [
            iqm(xa[rng.integers(0, len(xa), len(xa))]) - iqm(ya[rng.integers(0, len(ya), len(ya))])
            for _ in range(reps)
        ]
    )
    low, high = np.percentile(diffs, [2.5, 97.5])
    return Level(iqm(xa) - iqm(ya), [float(low), float(high)], len(xa) + len(ya))


def _judged(records: Sequence[RunRecord]) -> tuple[Rate, Rate]:
    judged = [r for r in records if r.done and r.collapsed is not None]
    collapsed = [r for r in judged if r.collapsed]
    irreversible = [r for r in collapsed if r.collapse is not None and r.collapse.irreversible]
    return Rate.of(len(collapsed), len(judged)), Rate.of(len(irreversible), len(judged))


def _median(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return statistics.median(finite) if finite else None


def guard_comparisons(
    records: Sequence[RunRecord],
    interventions: Mapping[str, Sequence[Intervention]],
    steps: Mapping[str, int] | None = None,
    rng: np.random.Generator | None = None,
    reps: int = 2000,
) -> list[GuardComparison]:
    """Per guarded (workload, knobs, perturbation, guard): its rates beside the unguarded ones.

    `interventions`: run id → its interventions; `steps`: run id → optimizer steps trained (for
    the extra-compute fraction); `rng`/`reps`: the bootstrap of the final-performance CIs.
    Final performance of a diverged run (−inf) counts as the worst finite run of the condition.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    groups: dict[Condition, list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.workload, r.knobs_key, r.perturbation, r.guard), []).append(r)
    return [
        _comparison(
            condition,
            members,
            groups.get((*condition[:3], "none"), []),
            interventions,
            steps or {},
            rng,
            reps,
        )
        for condition, members in groups.items()
        if condition[3] != "none"
    ]


def _comparison(
    condition: Condition,
    members: Sequence[RunRecord],
    unguarded: Sequence[RunRecord],
    interventions: Mapping[str, Sequence[Intervention]],
    steps: Mapping[str, int],
    rng: np.random.Generator,
    reps: int,
) -> GuardComparison:
    """One guarded condition's runs (`members`) beside the same condition's `unguarded` runs."""
    workload, _, perturbation, guard = condition
    done = [r for r in members if r.done]
    plain = [r for r in unguarded if r.done]
    collapse, irreversible = _judged(done)
    collapse_u, irreversible_u = _judged(plain)
    events = [list(interventions.get(r.run_id, ())) for r in done]
    by_action: dict[str, int] = {}
    for run_events in events:
        for i in run_events:
            by_action[i.action] = by_action.get(i.action, 0) + 1
    lost = [sum(i.steps_lost for i in e) for e in events]
    trained = [int(steps.get(r.run_id, 0)) for r in done]
    guarded_wall = _median([r.timing.wall_s for r in done])
    plain_wall = _median([r.timing.wall_s for r in plain])
    n = len(done)
    return GuardComparison(
        workload=workload,
        knobs=dict(members[0].knobs),
        perturbation=perturbation,
        guard=guard,
        n_runs=n,
        n_unguarded=len(plain),
        collapse=collapse,
        collapse_unguarded=collapse_u,
        irreversible=irreversible,
        irreversible_unguarded=irreversible_u,
        interventions_per_run=sum(len(e) for e in events) / n if n else None,
        by_action=by_action,
        steps_lost_per_run=sum(lost) / n if n else None,
        extra_compute=sum(lost) / sum(trained) if sum(trained) else None,
        wall_time_ratio=guarded_wall / plain_wall
        if guarded_wall is not None and plain_wall
        else None,
        false_interventions_per_run=(sum(len(e) for e in events) / n if n else None)
        if members[0].is_baseline and not members[0].on_trial
        else None,
        on_trial=members[0].on_trial,
        **_finals_of(done, plain, rng, reps),
    )


def _finals_of(
    done: Sequence[RunRecord], plain: Sequence[RunRecord], rng: np.random.Generator, reps: int
) -> dict[str, Level | None]:
    both = _finite_finals([*done, *plain])  # one floor for −inf across the two arms
    floor = min(both) if both else 0.0

    def finals(records: Sequence[RunRecord]) -> list[float]:
        values = [r.final_perf for r in records if r.done and r.final_perf is not None]
        return [v if math.isfinite(v) else floor for v in values if not math.isnan(v)]

    guarded, unguarded = finals(done), finals(plain)
    return {
        "final": _level(guarded, rng, reps),
        "final_unguarded": _level(unguarded, rng, reps),
        "final_difference": _difference(guarded, unguarded, rng, reps),
    }
