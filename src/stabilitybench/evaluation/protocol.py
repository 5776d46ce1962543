"""The evaluation protocol: which runs a detector learns from, is calibrated on, is judged on.

Healthy runs (run.json `healthy`: perturbation `none` at the workload's `reference` knobs) train
the fitted detectors and set every threshold; a run of seed s is scored by a detector fitted on
the other seeds and judged against a threshold calibrated on the other seeds' healthy runs of
its workload (in-sample only when a workload's healthy runs all share one seed). Every other
unguarded run with a collapse verdict is judged. Its collapse *interval* `[c_lo, c_hi]` is the
dense collapse step (a point) when the dense signal timed it, else `[previous evaluation,
the evaluation that first showed the drop]` clipped at the onset: the collapse began somewhere
in it. A detector's alarms are its episodes' starts and renewals (`metrics.alarms`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stabilitybench.metrics.alarms import calibrate_threshold, renewed_alarms, warning_mask
from stabilitybench.metrics.records import RunRecord
from stabilitybench.store import RunData

HELD_OUT = "held-out seeds"
IN_SAMPLE = "in-sample (one healthy seed)"
# A collapse at most this many optimizer steps after a perturbation's onset leaves no room for
# a warning (a jolt that ends the run at once): reported, not counted against recall.
NO_LEAD_STEPS = 1


@dataclass(frozen=True, eq=False)
class ScoredRun:
    """A finished run with its scores.parquet and its record."""

    run: RunData
    record: RunRecord

    @property
    def workload(self) -> str:
        return self.record.workload

    @property
    def seed(self) -> int:
        return int(self.record.seed or 0)

    @property
    def steps(self) -> np.ndarray:
        assert self.run.scores is not None
        return self.run.scores["step"].to_numpy()

    def has(self, column: str) -> bool:
        return self.run.scores is not None and column in self.run.scores.columns

    def values(self, column: str) -> np.ndarray:
        """The scores of one column (n,), float."""
        assert self.run.scores is not None
        return self.run.scores[column].to_numpy(dtype=float)

    def flags(self, column: str) -> np.ndarray:
        """A boolean column (n,), e.g. a detector's native alarms."""
        assert self.run.scores is not None
        return self.run.scores[column].to_numpy(dtype=bool)

    def scored_by(self, column: str) -> bool:
        return self.has(column) and not np.all(np.isnan(self.values(column)))

    @property
    def healthy(self) -> bool:
        """run.json `healthy`; an audit written before that field: baseline and unguarded."""
        flag = self.run.info.healthy
        if isinstance(flag, bool):
            return flag
        return self.record.is_baseline and self.record.guard == "none"

    @property
    def collapsed(self) -> bool:
        return bool(self.record.collapsed)

    @property
    def collapse_at(self) -> int | None:
        """The optimizer step the run collapses at (None: it did not)."""
        collapse = self.record.collapse
        if collapse is None or not collapse.collapsed:
            return None
        if collapse.collapse_at is not None:
            return int(collapse.collapse_at)
        onset = collapse.onset_step
        if onset is None or collapse.collapse_step is None:
            return None
        return int(onset + collapse.collapse_step)

    @property
    def onset_step(self) -> int | None:
        """The perturbation's onset (optimizer step) when the run's events give one; for a
        recipe on trial (`RunRecord.on_trial`), the onset the spec fixes (`collapse.onset`):
        what is on trial starts there, so its runs that do not diverge are the hard negatives
        and the clock control counts from there. Healthy runs have no onset here."""
        onset = self.record.onset
        if onset.step is None:
            return None
        if onset.source == "events" or (onset.source == "spec" and self.record.on_trial):
            return onset.step
        return None

    @property
    def collapse_interval(self) -> tuple[int, int] | None:
        """[c_lo, c_hi]: where the collapse began (see the module); None without a collapse."""
        at, collapse = self.collapse_at, self.record.collapse
        if at is None or collapse is None:
            return None
        if collapse.collapse_timing != "evaluation" or collapse.collapse_eval_at is None:
            return at, at
        hi = int(collapse.collapse_eval_at)
        evals = self.run.evals
        steps = evals["step"].to_numpy() if len(evals) else np.zeros(0, dtype=np.int64)
        before = steps[steps < hi]
        lo = int(before.max()) if before.size else hi
        onset = self.onset_step
        return (max(lo, onset) if onset is not None else lo), hi

    def no_lead_possible(self, sph: int = NO_LEAD_STEPS) -> bool:
        """A collapse that began less than `sph` steps (at least one) after the run's own
        perturbation onset: no warning could have been in time."""
        interval, onset = self.collapse_interval, self.onset_step
        return interval is not None and onset is not None and interval[0] - onset < max(sph, 1)

    def outcome_window(self) -> tuple[int, int]:
        """[onset, first evaluation after onset] (to the last step when there is none)."""
        collapse, onset = self.record.collapse, self.record.onset.step
        assert collapse is not None and onset is not None
        end = collapse.first_eval_after_onset
        return onset, int(self.steps.max()) if end is None else end


@dataclass(frozen=True)
class AlarmState:
    """One run's alarm state at its threshold: in warning (n,) and alarms (n,), both bool."""

    on: np.ndarray
    alarms: np.ndarray


@dataclass
class Thresholds:
    """Per (workload, seed): the threshold calibrated on the other seeds' healthy runs."""

    column: str
    healthy: Sequence[ScoredRun]
    target: float
    in_sample: bool = False
    sop: int | None = None  # renewal period of an episode's alarm (None: one alarm per episode)
    gap: int = 0  # steps merged inside an episode

    def __post_init__(self) -> None:
        self._cache: dict[tuple[str, int], float] = {}
        self._groups: dict[str, list[ScoredRun]] = defaultdict(list)
        for run in self.healthy:
            self._groups[run.workload].append(run)
        for run in self.healthy:
            self.of(run)

    def of(self, run: ScoredRun) -> float:
        key = (run.workload, run.seed)
        if key not in self._cache:
            pool = self._groups.get(run.workload, [])
            others = [r for r in pool if r.seed != run.seed]
            if not others:
                others, self.in_sample = pool, True
            scores = [v for r in others if not np.all(np.isnan(v := r.values(self.column)))]
            self._cache[key] = (
                calibrate_threshold(scores, self.target, sop=self.sop, gap=self.gap)
                if others
                else math.inf
            )
        return self._cache[key]

    @property
    def calibration(self) -> str:
        return IN_SAMPLE if self.in_sample else HELD_OUT

    def median(self, runs: Sequence[ScoredRun]) -> float | None:
        """The median of the distinct finite thresholds used for these runs."""
        used = sorted({self.of(r) for r in runs})
        finite = [t for t in used if math.isfinite(t)]
        return float(np.median(finite)) if finite else None

    def state(self, run: ScoredRun) -> AlarmState:
        """The run's alarm episodes and alarms at its threshold."""
        on = warning_mask(run.values(self.column), self.of(run), self.gap)
        return AlarmState(on, renewed_alarms(on, run.steps, self.sop))

    def in_warning(self, run: ScoredRun) -> np.ndarray:
        """(n,) bool: the run's steps inside an alarm episode at its threshold."""
        return self.state(run).on

    def events(self, run: ScoredRun) -> np.ndarray:
        """(n,) bool: the run's alarms, its episodes' starts and renewals every `sop` steps."""
        return self.state(run).alarms
