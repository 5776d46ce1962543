"""Point estimates of collapse: progress, collapse step, irreversibility, recovery time.

Definitions (DESIGN.md): performance is higher-is-better; progress
`q_t = (perf_t − perf_0) / (perf_pre − perf_0)` with `perf_0` the first evaluation and `perf_pre`
the mean of the last `k` evaluations before the perturbation onset. A run collapses at the first
evaluation at or after onset with `q < threshold`; the collapse is irreversible if `q` never again
reaches `recovery`; the recovery time is the number of optimizer steps from the collapse
evaluation to the first evaluation that reaches `recovery`. An infinite `perf` (the store's mark
of a non-finite loss) is a collapse that is irreversible. A NaN `perf` is a missing evaluation
(the store never writes NaN for a divergence) and is skipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from stabilitybench.types import COLLAPSE_PRE_EVALS as DEFAULT_PRE_EVALS
from stabilitybench.types import COLLAPSE_RECOVERY as DEFAULT_RECOVERY
from stabilitybench.types import COLLAPSE_THRESHOLD as DEFAULT_THRESHOLD

# Below this gain (relative to the perf level) the run did not learn before onset and the
# progress ratio would divide noise by noise.
MIN_GAIN_FRACTION = 1e-3


def final_performance(perf: ArrayLike, last: int = 3) -> float:
    """Mean of the last `last` evaluations that are not NaN (perf: (n_evals,), may hold -inf).

    Returns -inf when any of them is -inf (a diverged run), NaN when there is no evaluation.
    """
    values = np.asarray(perf, dtype=float)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan")
    tail = values[-last:]
    if np.any(np.isinf(tail)):
        return float(tail[np.isinf(tail)][0])
    return float(tail.mean())


def reference_levels(
    steps: ArrayLike, perf: ArrayLike, onset_step: int, k: int = DEFAULT_PRE_EVALS
) -> tuple[float, float]:
    """`(perf_0, perf_pre)`: the first finite evaluation and the mean of the last `k` before onset.

    steps: (n_evals,) int optimizer steps; perf: (n_evals,) float (NaN rows are skipped).
    An evaluation at `step >= onset_step` is after onset. `perf_pre` is NaN when no finite
    evaluation precedes onset.
    """
    steps_arr = np.asarray(steps, dtype=float)
    perf_arr = np.asarray(perf, dtype=float)
    finite = np.isfinite(perf_arr)
    if not finite.any():
        return float("nan"), float("nan")
    perf_0 = float(perf_arr[finite][0])
    before = finite & (steps_arr < onset_step)
    if not before.any():
        return perf_0, float("nan")
    perf_pre = float(perf_arr[before][-k:].mean())
    return perf_0, perf_pre


def progress_scale(
    perf_0: float, perf_pre: float, min_gain_fraction: float = MIN_GAIN_FRACTION
) -> tuple[float, float, bool]:
    """`(origin, scale, undefined)` such that `q = (perf − origin) / scale`.

    Normally `origin = perf_0` and `scale = perf_pre − perf_0`. When the run did not learn before
    onset (`perf_pre − perf_0 <= min_gain_fraction · max(|perf_0|, |perf_pre|)`, or `perf_pre` is
    missing), progress is undefined and collapse is judged on a relative scale instead:
    `q = 1 + (perf − perf_pre) / |perf_pre|` (q = 1 at the pre-onset level, q = 0 once perf has
    fallen by `|perf_pre|`). If `|perf_pre|` is also ~0, `scale` is NaN and only
    infinite perf can mark a collapse.
    """
    if not np.isfinite(perf_pre) or not np.isfinite(perf_0):
        return float("nan"), float("nan"), True
    gain = perf_pre - perf_0
    level = max(abs(perf_0), abs(perf_pre))
    if gain > min_gain_fraction * level and gain > 0:
        return perf_0, gain, False
    if abs(perf_pre) > 1e-12:
        return perf_pre - abs(perf_pre), abs(perf_pre), True
    return float("nan"), float("nan"), True


def progress(perf: ArrayLike, perf_0: float, perf_pre: float) -> np.ndarray:
    """Progress q_t (perf: (n_evals,) float, may hold ±inf/NaN) → (n_evals,) float.

    -inf perf gives -inf progress; NaN stays NaN. With undefined progress (see `progress_scale`)
    the relative fallback scale is used; if that is undefined too, every finite q is NaN.
    """
    origin, scale, _ = progress_scale(perf_0, perf_pre)
    values = np.asarray(perf, dtype=float)
    with np.errstate(invalid="ignore"):
        q = (values - origin) / scale
    q[np.isneginf(values)] = -np.inf
    q[np.isposinf(values)] = -np.inf  # +inf can only come from a broken loss: a divergence
    return q


def collapse_index(
    q: ArrayLike, after_onset: ArrayLike, threshold: float = DEFAULT_THRESHOLD
) -> int | None:
    """Index of the first evaluation at/after onset with q < threshold (q, after_onset: (n,)).

    NaN q (missing evaluation) never counts as a collapse; -inf always does.
    """
    q_arr = np.asarray(q, dtype=float)
    mask = np.asarray(after_onset, dtype=bool) & ~np.isnan(q_arr) & (q_arr < threshold)
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def recovery_index(
    q: ArrayLike, collapse_at: int, recovery: float = DEFAULT_RECOVERY
) -> int | None:
    """Index of the first evaluation after `collapse_at` with q >= recovery, or None (q: (n,)).

    None means the collapse is irreversible. Nothing after a -inf evaluation counts: a
    diverged run has stopped training.
    """
    q_arr = np.asarray(q, dtype=float)
    for i in range(collapse_at + 1, q_arr.size):
        if np.isneginf(q_arr[i]):
            return None
        if q_arr[i] >= recovery:
            return i
    return None


@dataclass(frozen=True)
class CollapseConfig:
    """The audit's collapse thresholds (`collapse:` in the spec); the one place defaults live."""

    threshold: float = DEFAULT_THRESHOLD
    recovery: float = DEFAULT_RECOVERY
    pre_evals: int = DEFAULT_PRE_EVALS

    def to_dict(self) -> dict[str, float]:
        return {"threshold": self.threshold, "recovery": self.recovery, "pre_evals": self.pre_evals}


@dataclass(frozen=True)
class CollapseResult:
    """Collapse analysis of one run (steps are optimizer steps; env steps for RL)."""

    collapsed: bool | None  # None: could not be judged (no onset, no evaluation after onset)
    irreversible: bool | None
    collapse_step: int | None  # optimizer steps from onset to the collapse evaluation
    collapse_env_steps: int | None
    recovery_steps: int | None  # optimizer steps from collapse to re-crossing `recovery`
    recovery_env_steps: int | None
    diverged: bool  # an infinite perf was recorded
    progress_undefined: bool  # no learning before onset: judged on the relative scale
    onset_step: int | None
    perf_0: float
    perf_pre: float
    min_progress: float  # lowest q at/after onset (-inf for a divergence, NaN if none)
    n_missing_evals: int  # NaN perf rows that were skipped
    # Absolute positions, for the early-warning evaluation. `collapse_at` is the optimizer step
    # the collapse is timed at (today the collapse evaluation; a dense performance signal may set
    # it more precisely with `dataclasses.replace`); `collapse_at_env` its env step (RL).
    collapse_at: int | None = None
    collapse_at_env: int | None = None
    first_eval_after_onset: int | None = None  # the first evaluation step >= onset

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def analyze_collapse(
    steps: ArrayLike,
    perf: ArrayLike,
    onset_step: int | None,
    *,
    env_steps: ArrayLike | None = None,
    onset_env_step: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    recovery: float = DEFAULT_RECOVERY,
    k: int = DEFAULT_PRE_EVALS,
) -> CollapseResult:
    """Collapse, irreversibility and recovery of one run.

    steps: (n_evals,) int optimizer step of each evaluation; perf: (n_evals,) float, may hold
    -inf (divergence) and NaN (missing, skipped); env_steps: (n_evals,) or None (RL: the env
    step of each evaluation; `onset_env_step` is the event's `start_env_step`).
    `onset_step`: the perturbation's first step (for a baseline, the matched perturbed runs'
    onset); None means there is nothing to judge against, so `collapsed` is None unless the run
    diverged. A divergence before onset counts as a collapse with a negative `collapse_step`.
    """
    curve = _Curve.of(steps, perf, env_steps)
    if onset_step is None:
        return curve.result(
            None, True, None, float("nan"), float("-inf") if curve.diverged else float("nan")
        )
    perf_0, perf_pre = reference_levels(curve.steps, curve.perf, onset_step, k)
    _, _, undefined = progress_scale(perf_0, perf_pre)
    q = progress(curve.perf, perf_0, perf_pre)
    after = curve.steps >= onset_step
    post_q = q[after]
    min_q = (
        float(np.nanmin(post_q)) if post_q.size and not np.all(np.isnan(post_q)) else float("nan")
    )
    base = curve.result(onset_step, undefined, perf_0, perf_pre, min_q)
    if not after.any():
        if not curve.diverged:
            return base
        # Diverged before onset: training stopped, the collapse precedes the perturbation.
        first_inf = int(np.flatnonzero(np.isinf(curve.perf))[0])
        return curve.collapsed_at(replace(base, min_progress=float("-inf")), first_inf, None, None)
    at = collapse_index(q, after, threshold)
    if at is None:
        return replace(base, collapsed=False, irreversible=False)
    back = recovery_index(q, at, recovery)
    return curve.collapsed_at(base, at, back, onset_env_step)


@dataclass(frozen=True)
class _Curve:
    """One run's evaluations without missing rows, sorted by step."""

    steps: np.ndarray  # (n,) optimizer steps
    perf: np.ndarray  # (n,)
    env: np.ndarray | None  # (n,) env steps (RL) or None
    n_missing: int
    first_steps: np.ndarray  # (m,) every evaluation step, missing rows included

    @classmethod
    def of(cls, steps: ArrayLike, perf: ArrayLike, env_steps: ArrayLike | None) -> _Curve:
        steps_arr = np.asarray(steps, dtype=float)
        perf_arr = np.asarray(perf, dtype=float)
        keep = ~np.isnan(perf_arr)
        order = np.argsort(steps_arr[keep], kind="stable")
        env = None if env_steps is None else np.asarray(env_steps, dtype=float)[keep][order]
        return cls(
            steps_arr[keep][order], perf_arr[keep][order], env, int((~keep).sum()), steps_arr
        )

    @property
    def diverged(self) -> bool:
        return bool(np.isinf(self.perf).any())

    def env_at(self, i: int) -> float | None:
        if self.env is None or not np.isfinite(self.env[i]):
            return None
        return float(self.env[i])

    def result(
        self,
        onset: int | None,
        undefined: bool,
        perf_0: float | None,
        perf_pre: float,
        min_q: float,
    ) -> CollapseResult:
        """The not-collapsed result (or, without an onset, the verdict on a divergence alone)."""
        finite = self.perf[np.isfinite(self.perf)]
        first = finite[0] if finite.size else float("nan")
        later = self.first_steps[self.first_steps >= onset] if onset is not None else np.zeros(0)
        judged_on_divergence = onset is None and self.diverged
        return CollapseResult(
            collapsed=True if judged_on_divergence else None,
            irreversible=True if judged_on_divergence else None,
            collapse_step=None,
            collapse_env_steps=None,
            recovery_steps=None,
            recovery_env_steps=None,
            diverged=self.diverged,
            progress_undefined=undefined,
            onset_step=onset,
            perf_0=float(first) if perf_0 is None else perf_0,
            perf_pre=perf_pre,
            min_progress=min_q,
            n_missing_evals=self.n_missing,
            first_eval_after_onset=int(later.min()) if later.size else None,
        )

    def collapsed_at(
        self, base: CollapseResult, at: int, back: int | None, onset_env: int | None
    ) -> CollapseResult:
        """`base` marked as collapsed at evaluation `at`, recovering at `back` (None: never)."""
        assert base.onset_step is not None
        at_env, back_env = self.env_at(at), None if back is None else self.env_at(back)
        return replace(
            base,
            collapsed=True,
            irreversible=back is None,
            collapse_step=int(self.steps[at] - base.onset_step),
            collapse_env_steps=None
            if at_env is None or onset_env is None
            else int(at_env - onset_env),
            recovery_steps=None if back is None else int(self.steps[back] - self.steps[at]),
            recovery_env_steps=None
            if back_env is None or at_env is None
            else int(back_env - at_env),
            collapse_at=int(self.steps[at]),
            collapse_at_env=None if at_env is None else int(at_env),
        )
