"""Collapse, irreversibility and recovery of one run, judged against runs that were not
perturbed, and timed to the step.

The rule (DESIGN "Collapse", calibrated on the runs that were not perturbed): the reference level
`P_pre` is the median of the last `pre_evals` evaluations before onset, never the first; the
floor `f` is the first evaluation (the untrained level); σ, the evaluation noise, and the drop
that matched baselines of other seeds show with nothing done come from `calibrate`. A run is
judged only if `P_pre − f > learned_sigmas · σ` ("not learned at onset" otherwise). It collapses
when its drop below `P_pre` exceeds `threshold · (P_pre − f)`, `drop_sigmas · σ` and the
baselines' drop at `confirm_evals` consecutive evaluations; a non-finite loss (an infinite
`perf`) is a collapse, irreversible, at once. It recovers when the drop is back within
`(1 − recovery) · (P_pre − f)` or the baselines' drop for as many evaluations; it is irreversible
only with `evals_after` evaluations left after the confirmation, else censored. A NaN `perf` is
a missing evaluation and is skipped. `CollapseResult.reason` says why a verdict is missing.

Evaluations judge *whether*; a dense performance signal (`metrics.dense`: −EMA of the training
loss, or an EMA of training-episode returns) says *when*: the collapse step is the first step
after the evaluation before the first low one (and at or after onset) at which dense progress,
on its own reference levels (`dense_reference_levels`), falls below `threshold`
(`dense_crossing`); without one, the evaluation times it and `collapse_timing_note` says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from stabilitybench.metrics.dense import DenseSignal
from stabilitybench.settings import COLLAPSE_THRESHOLD as DEFAULT_THRESHOLD
from stabilitybench.settings import PRE_EVALS as DEFAULT_PRE_EVALS
from stabilitybench.settings import CollapseSettings

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


# How a collapse step was timed (`CollapseResult.collapse_timing`).
COLLAPSE_TIMINGS = ("dense", "evaluation", "nonfinite")
NO_DENSE_SIGNAL = "no dense performance signal (no per-step loss or training-episode returns)"


def dense_reference_levels(
    dense: DenseSignal,
    steps: ArrayLike,
    perf: ArrayLike,
    onset_step: int,
    k: int = DEFAULT_PRE_EVALS,
) -> tuple[float, float]:
    """`(dense perf_0, dense perf_pre)`: the dense signal as it stands at the first finite
    evaluation, and its mean at the last `k` finite evaluations before onset (see
    `DenseSignal.at_evaluations`; for `perf_pre` only points before onset count).

    steps, perf: (n_evals,) the evaluations (sorted, NaN rows already dropped). Without a dense
    value at the first evaluation, `perf_0` is the signal's first finite value; `perf_pre` is NaN
    when no dense value stands at any of those `k` evaluations.
    """
    steps_arr = np.asarray(steps, dtype=float)
    finite = np.isfinite(np.asarray(perf, dtype=float))
    eval_steps = steps_arr[finite]
    values = dense.perf[np.isfinite(dense.perf)]
    if eval_steps.size == 0 or values.size == 0:
        return float("nan"), float("nan")
    at_first = dense.at_evaluations(eval_steps[:1], before=np.inf)[0]
    perf_0 = float(at_first) if np.isfinite(at_first) else float(values[0])
    pre = eval_steps[eval_steps < onset_step][-k:]
    if pre.size == 0:
        return perf_0, float("nan")
    # Sample with the full grid so that each point stays before the next evaluation.
    sampled = dense.at_evaluations(eval_steps, before=onset_step)[np.isin(eval_steps, pre)]
    sampled = sampled[np.isfinite(sampled)]
    return perf_0, float(sampled.mean()) if sampled.size else float("nan")


def dense_crossing(
    steps: ArrayLike,
    q: ArrayLike,
    lo: float,
    hi: float,
    threshold: float = DEFAULT_THRESHOLD,
    bound: float = -np.inf,
) -> int | None:
    """Index of the first point in `(lo, hi]` (and `>= bound`) at which dense progress falls
    below `threshold`: q < threshold there and not at the point before it (steps, q: (m,)).

    A stretch below the threshold that began at or before `lo` (where an evaluation still
    judged the run fine) is not a crossing inside the window. NaN q is never below; -inf is.
    """
    s = np.asarray(steps, dtype=float)
    q_arr = np.asarray(q, dtype=float)
    below = ~np.isnan(q_arr) & (q_arr < threshold)
    before = np.concatenate([[False], below[:-1]])
    window = (s > lo) & (s <= hi) & (s >= bound)
    hits = np.flatnonzero(window & below & ~before)
    return int(hits[0]) if hits.size else None


@dataclass(frozen=True)
class CollapseTime:
    """When a collapse happened: the optimizer step (and env step), how it was timed, and why
    it fell back to the evaluation (None when it did not)."""

    step: int
    env_step: int | None
    timing: str  # one of COLLAPSE_TIMINGS
    note: str | None = None


def time_collapse(
    dense: DenseSignal | None,
    q_dense: np.ndarray | None,
    lo: float,
    hi: int,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    bound: float = -np.inf,
    eval_env: int | None = None,
    eval_nonfinite: bool = False,
    no_dense_reason: str | None = None,
) -> CollapseTime:
    """Time a collapse that the evaluation at step `hi` confirmed (the evaluation before it at
    `lo`, -inf for none; `bound`: the onset).

    The first dense crossing in `(lo, hi]` (`dense_crossing`, q_dense: (m,) the dense progress,
    None when its reference levels are undefined); else the first non-finite dense point there;
    else the evaluation itself — `nonfinite` when it is the divergence evaluation (`-inf` perf,
    recorded at the step the loss went non-finite), `evaluation` otherwise, with a note saying why.
    """
    if dense is not None:
        if q_dense is not None:
            c = dense_crossing(dense.steps, q_dense, lo, hi, threshold, bound)
            if c is not None:
                timing = "nonfinite" if dense.nonfinite[c] else "dense"
                return CollapseTime(int(dense.steps[c]), dense.env_at(c), timing)
        window = (dense.steps > lo) & (dense.steps <= hi) & (dense.steps >= bound)
        bad = np.flatnonzero(window & dense.nonfinite)
        if bad.size:
            return CollapseTime(int(dense.steps[bad[0]]), dense.env_at(int(bad[0])), "nonfinite")
    if eval_nonfinite:
        return CollapseTime(hi, eval_env, "nonfinite")
    note = _fallback_note(dense, q_dense, lo, hi, bound, no_dense_reason)
    return CollapseTime(hi, eval_env, "evaluation", note)


def _fallback_note(
    dense: DenseSignal | None,
    q_dense: np.ndarray | None,
    lo: float,
    hi: int,
    bound: float,
    no_dense_reason: str | None,
) -> str:
    if dense is None:
        return no_dense_reason or NO_DENSE_SIGNAL
    if q_dense is None:
        return f"{dense.source}: dense reference levels undefined (no dense value before onset)"
    start = max(lo, bound - 1)  # the window is (start, hi]
    if np.isfinite(lo) and lo >= bound:
        where = f"between the evaluations at steps {int(lo)} and {hi}"
    elif np.isfinite(bound):
        where = f"between onset (step {int(bound)}) and the evaluation at step {hi}"
    else:
        where = f"up to the evaluation at step {hi}"
    note = f"{dense.source}: no dense crossing {where}"
    if dense.excluded_reason and dense.overlaps_excluded(start, hi):
        note += f" ({dense.excluded_reason})"
    return note


@dataclass(frozen=True)
class CollapseResult:
    """Collapse analysis of one run (steps are optimizer steps; env steps for RL).

    The evaluations judge whether a run collapsed and recovered; the collapse is *timed* by the
    dense signal (`collapse_timing`): `collapse_step` / `collapse_at` are the dense-timed step,
    `collapse_eval_step` / `collapse_eval_at` the evaluation that confirmed it.
    """

    collapsed: bool | None  # None: could not be judged (no onset, no evaluation after onset)
    irreversible: bool | None
    collapse_step: int | None  # optimizer steps from onset to the collapse (dense-timed)
    collapse_env_steps: int | None
    recovery_steps: int | None  # optimizer steps from the collapse to re-crossing `recovery`
    recovery_env_steps: int | None
    diverged: bool  # an infinite perf was recorded
    progress_undefined: bool  # no learning before onset: judged on the relative scale
    onset_step: int | None
    perf_0: float
    perf_pre: float
    min_progress: float  # lowest q at/after onset (-inf for a divergence, NaN if none)
    n_missing_evals: int  # NaN perf rows that were skipped
    # Absolute positions, for the early-warning evaluation: `collapse_at` is the optimizer step
    # the collapse is timed at (the dense crossing, else the confirming evaluation),
    # `collapse_at_env` its env step (RL).
    collapse_at: int | None = None
    collapse_at_env: int | None = None
    first_eval_after_onset: int | None = None  # the first evaluation step >= onset
    collapse_eval_step: int | None = None  # optimizer steps from onset to the confirming eval
    collapse_eval_at: int | None = None  # optimizer step of the confirming evaluation
    collapse_timing: str | None = None  # dense | evaluation | nonfinite (None: no collapse)
    collapse_timing_note: str | None = None  # why the timing fell back to the evaluation
    dense_signal: str | None = None  # loss_ema | episode_return_ema | None (none recorded)
    dense_perf_0: float = float("nan")  # the dense signal's reference levels
    dense_perf_pre: float = float("nan")
    # Why `collapsed` is None (not testable, not learned at onset, unconfirmed), or why
    # `irreversible` is None (censored); None when the verdict stands.
    reason: str | None = None
    noise: float = float("nan")  # σ: the evaluation noise the run was judged with
    drop_threshold: float = float("nan")  # the drop below P_pre that counts as a collapse

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


NOT_TESTABLE = "not testable: no unperturbed run of another seed to calibrate on"
NOT_LEARNED = "not learned at onset"
UNCONFIRMED = "unconfirmed: the drop came too close to the end of the run to be confirmed"
CENSORED = "censored: too little of the run was left after the collapse to call it irreversible"


@dataclass(frozen=True)
class Calibration:
    """What the runs that were not perturbed show, for judging one run (its own seed left out):
    the evaluation noise and the drops that happen with nothing done."""

    noise: float  # σ: robust scale of one evaluation's noise
    baseline_drop: float  # the baselines' `quantile` of confirmed drops below their own P_pre
    n_baselines: int


def robust_level(steps: ArrayLike, perf: ArrayLike, onset_step: int, k: int) -> float:
    """`P_pre`: the median of the last `k` finite evaluations before onset, never the first
    evaluation (the untrained level); NaN when there is none (steps, perf: (n,), sorted)."""
    s, p = np.asarray(steps, dtype=float), np.asarray(perf, dtype=float)
    finite = np.flatnonzero(np.isfinite(p))
    before = [i for i in finite[1:] if s[i] < onset_step]
    return float(np.median(p[before[-k:]])) if before else float("nan")


def evaluation_noise(
    curves: Sequence[tuple[np.ndarray, np.ndarray]], onset_step: float = -np.inf
) -> float:
    """σ of one evaluation, from the evaluation-to-evaluation changes of the given runs (each
    `(steps, perf)`): IQR(Δperf) / 1.349 / √2 over the finite changes between evaluations at
    or after `onset_step` (where a run that was not perturbed has mostly stopped learning; the
    IQR ignores a few large jumps and a steady trend), or over every change after the first
    evaluation when the window holds fewer than 2 (the first, from the untrained level, never)."""
    changes, fallback = [], []
    for steps, perf in curves:
        s, p = np.asarray(steps, dtype=float), np.asarray(perf, dtype=float)
        keep = np.isfinite(p)
        s, p = s[keep][1:], p[keep][1:]
        fallback.append(np.diff(p))
        changes.append(np.diff(p[s >= onset_step]))
    d = np.concatenate(changes) if changes else np.zeros(0)
    if d.size < 2:
        d = np.concatenate(fallback) if fallback else np.zeros(0)
    if d.size == 0:
        return float("nan")
    q25, q75 = np.percentile(d, [25.0, 75.0])
    return float((q75 - q25) / 1.349 / np.sqrt(2.0))  # the IQR of a normal is 1.349 σ


def confirmed_drops(drop: np.ndarray, confirm: int) -> np.ndarray:
    """(n - confirm + 1,): the drop held at `confirm` consecutive evaluations from each one
    (the smallest of them); drop: (n,) with -inf perf as +inf drop."""
    if drop.size < confirm:
        return np.zeros(0)
    windows = np.lib.stride_tricks.sliding_window_view(drop, confirm)
    return windows.min(axis=1)


def collapse_starts(drop: np.ndarray, limit: float, envelope: float, confirm: int) -> np.ndarray:
    """(n - confirm + 1,) bool: the evaluations where a confirmed collapse starts — the drop
    exceeds `limit` there and stays beyond `envelope` (what runs with nothing done show) at the
    next `confirm - 1` evaluations: a collapse is confirmed by not having recovered, not by
    staying a whole collapse deep. drop: (n,), a -inf perf as a +inf drop."""
    if drop.size < confirm:
        return np.zeros(0, dtype=bool)
    windows = np.lib.stride_tricks.sliding_window_view(drop, confirm)
    return (windows[:, 0] > limit) & (windows[:, 1:] > envelope).all(axis=1)


def calibrate(
    baselines: Sequence[tuple[np.ndarray, np.ndarray]],
    onset_step: int,
    *,
    k: int = DEFAULT_PRE_EVALS,
    confirm: int = 2,
    quantile: float = 0.95,
) -> Calibration | None:
    """The calibration from matched baselines of other seeds (each `(steps, perf)`, sorted):
    their evaluation noise, and the `quantile` of the largest drop each held below its own
    `P_pre` for `confirm` evaluations from `onset_step` on. None without baselines."""
    if not baselines:
        return None
    worst = []
    for steps, perf in baselines:
        level = robust_level(steps, perf, onset_step, k)
        p = np.asarray(perf, dtype=float)
        post = p[(np.asarray(steps) >= onset_step) & ~np.isnan(p)]
        held = confirmed_drops(np.where(np.isneginf(post), np.inf, level - post), confirm)
        if np.isfinite(level) and held.size:
            worst.append(float(held.max()))
    drop = float(np.quantile(worst, quantile)) if worst else 0.0
    return Calibration(evaluation_noise(baselines, onset_step), max(drop, 0.0), len(baselines))


def analyze_collapse(
    steps: ArrayLike,
    perf: ArrayLike,
    onset_step: int | None,
    *,
    calibration: Calibration | None = None,
    env_steps: ArrayLike | None = None,
    onset_env_step: int | None = None,
    settings: CollapseSettings | None = None,
    dense: DenseSignal | None = None,
    no_dense_reason: str | None = None,
) -> CollapseResult:
    """Collapse, irreversibility and recovery of one run, judged against `calibration` (what
    matched runs of other seeds that were not perturbed show; None: not testable) by the rule in
    the module docstring, and timed to the step by `dense`.

    steps: (n_evals,) int optimizer step of each evaluation; perf: (n_evals,) float, may hold
    -inf (divergence) and NaN (missing, skipped); env_steps: (n_evals,) or None (RL, with the
    event's `onset_env_step`). `onset_step`: the perturbation's first step (a baseline: its
    matched perturbed runs'); None: nothing to judge against, so `collapsed` is None unless the
    run diverged. `dense`: the run's dense performance signal, or None (`no_dense_reason`).
    """
    rule = settings or CollapseSettings()
    curve = _Curve.of(steps, perf, env_steps)
    timer = _Timer(dense, None, rule.threshold, no_dense_reason)
    if onset_step is None:
        return _without_onset(curve, timer, dense, calibration, rule)
    floor = (
        float(curve.perf[np.isfinite(curve.perf)][0])
        if np.isfinite(curve.perf).any()
        else float("nan")
    )
    level = robust_level(curve.steps, curve.perf, onset_step, rule.pre_evals)
    gain = level - floor
    after = curve.steps >= onset_step
    q = (curve.perf - floor) / gain if gain > 0 else np.full(curve.perf.shape, np.nan)
    q[np.isinf(curve.perf)] = -np.inf
    post_q = q[after]
    min_q = (
        float(np.nanmin(post_q)) if post_q.size and not np.all(np.isnan(post_q)) else float("nan")
    )
    base = curve.result(onset_step, True, floor, level, min_q)
    if dense is not None:
        base, timer = _dense_timer(dense, curve, onset_step, base, rule, no_dense_reason)
    if curve.diverged and not after.any():
        # Diverged before onset: training stopped, the collapse precedes the perturbation.
        first_inf = int(np.flatnonzero(np.isinf(curve.perf))[0])
        when = timer.time(curve, first_inf, None)
        return curve.collapsed_at(
            replace(base, min_progress=float("-inf")), first_inf, None, None, when
        )
    return _judge(curve, base, after, gain, calibration, rule, timer, onset_env_step)


def _dense_timer(
    dense: DenseSignal,
    curve: _Curve,
    onset_step: int,
    base: CollapseResult,
    rule: CollapseSettings,
    no_dense_reason: str | None,
) -> tuple[CollapseResult, _Timer]:
    """The dense signal's reference levels on `base`, and the timer that reads its progress."""
    d0, dpre = dense_reference_levels(dense, curve.steps, curve.perf, onset_step, rule.pre_evals)
    _, scale, _ = progress_scale(d0, dpre)
    q_dense = progress(dense.perf, d0, dpre) if np.isfinite(scale) else None
    timer = _Timer(dense, q_dense, rule.threshold, no_dense_reason)
    return replace(base, dense_signal=dense.source, dense_perf_0=d0, dense_perf_pre=dpre), timer


def _judge(
    curve: _Curve,
    base: CollapseResult,
    after: np.ndarray,
    gain: float,
    calibration: Calibration | None,
    rule: CollapseSettings,
    timer: _Timer,
    onset_env: int | None,
) -> CollapseResult:
    """The verdict on a run with an onset (see `analyze_collapse`)."""
    onset = base.onset_step
    first_inf = next((int(i) for i in np.flatnonzero(after) if np.isinf(curve.perf[i])), None)
    if calibration is None and first_inf is None:
        return replace(base, reason=NOT_TESTABLE)
    noise = calibration.noise if calibration is not None else float("nan")
    sigma = noise if np.isfinite(noise) else 0.0
    learned = bool(gain > 0 and gain > rule.learned_sigmas * sigma)
    drop_limit = max(
        rule.threshold * gain if learned else np.inf,
        rule.drop_sigmas * sigma,
        calibration.baseline_drop if calibration is not None else 0.0,
    )
    base = replace(base, progress_undefined=not learned, noise=noise, drop_threshold=drop_limit)
    drop = np.where(np.isinf(curve.perf), np.inf, base.perf_pre - curve.perf)
    post = [int(i) for i in np.flatnonzero(after)]
    envelope = max(
        rule.drop_sigmas * sigma, calibration.baseline_drop if calibration is not None else 0.0
    )
    hits = np.flatnonzero(collapse_starts(drop[post], drop_limit, envelope, rule.confirm_evals))
    at = post[int(hits[0])] if hits.size else first_inf
    if at is not None and first_inf is not None and first_inf < at:
        at = first_inf  # a non-finite loss is a collapse at once
    if at is None:
        if not learned:
            return replace(base, reason=NOT_LEARNED)
        tail = drop[post[-(rule.confirm_evals - 1) :]] if rule.confirm_evals > 1 else drop[:0]
        if tail.size and tail[0] > drop_limit and bool((tail[1:] > envelope).all()):
            return replace(base, reason=UNCONFIRMED)
        return replace(base, collapsed=False, irreversible=False)
    if not learned and not np.isinf(curve.perf[at]):
        return replace(base, reason=NOT_LEARNED)
    confirmed = at if np.isinf(curve.perf[at]) else at + rule.confirm_evals - 1
    back = _recovery(drop, confirmed, (1 - rule.recovery) * gain, calibration, rule)
    when = timer.time(curve, at, onset)
    result = curve.collapsed_at(base, at, back, onset_env, when)
    left = int((~np.isnan(drop[confirmed + 1 :])).sum())
    if back is None and not curve.diverged and left < rule.evals_after:
        return replace(result, irreversible=None, reason=CENSORED)
    return result


def _recovery(
    drop: np.ndarray,
    confirmed: int,
    within: float,
    calibration: Calibration | None,
    rule: CollapseSettings,
) -> int | None:
    """The first evaluation after `confirmed` from which the drop stays within `within` (or
    the baselines' drop) for `confirm_evals` evaluations; None if none does (or the run
    diverged, which ends it)."""
    limit = max(within, calibration.baseline_drop if calibration is not None else 0.0)
    rest = drop[confirmed + 1 :]
    if np.isinf(rest).any():
        rest = rest[: int(np.flatnonzero(np.isinf(rest))[0])]
    held = (
        np.lib.stride_tricks.sliding_window_view(rest, rule.confirm_evals).max(axis=1)
        if rest.size >= rule.confirm_evals
        else np.zeros(0)
    )
    hits = np.flatnonzero(held <= limit)
    return confirmed + 1 + int(hits[0]) if hits.size else None


def _without_onset(
    curve: _Curve,
    timer: _Timer,
    dense: DenseSignal | None,
    calibration: Calibration | None,
    rule: CollapseSettings,
) -> CollapseResult:
    """A run without an onset (no perturbation to compare with): a divergence is a collapse;
    with a calibration from the workload's healthy runs of other seeds, a fall back from its own
    best level is judged like a drop below `P_pre` (see `fall_back`); else no verdict."""
    base = curve.result(
        None, True, None, float("nan"), float("-inf") if curve.diverged else float("nan")
    )
    base = replace(base, dense_signal=None if dense is None else dense.source)
    if curve.diverged:
        first_inf = int(np.flatnonzero(np.isinf(curve.perf))[0])
        return curve.collapsed_at(base, first_inf, None, None, timer.time(curve, first_inf, None))
    if calibration is None:
        return base
    return fall_back(curve, base, calibration, rule, timer)


def fall_back(
    curve: _Curve,
    base: CollapseResult,
    calibration: Calibration,
    rule: CollapseSettings,
    timer: _Timer,
) -> CollapseResult:
    """A run without an onset judged by the rule of `analyze_collapse` with its own best level so
    far (the running maximum after the first evaluation) in place of `P_pre`: it collapses when
    it falls back from that level — not when it merely learns slower than the healthy runs."""
    perf = curve.perf
    if perf.size < 2:
        return base
    floor = float(perf[0])
    peak = np.maximum.accumulate(np.concatenate([[perf[1]], perf[1:]]))  # best so far, by eval
    gain = float(peak[-1] - floor)
    sigma = calibration.noise if np.isfinite(calibration.noise) else 0.0
    if not gain > rule.learned_sigmas * sigma or gain <= 0:
        return replace(base, perf_0=floor, reason=NOT_LEARNED, noise=calibration.noise)
    for at in range(2, perf.size - rule.confirm_evals + 1):
        level = float(peak[at - 1])
        limit = max(rule.threshold * (level - floor), rule.drop_sigmas * sigma)
        limit = max(limit, calibration.baseline_drop)
        drops = level - perf[at : at + rule.confirm_evals]
        if level - floor > rule.learned_sigmas * sigma and bool((drops > limit).all()):
            judged = replace(
                base, perf_0=floor, perf_pre=level, noise=calibration.noise, drop_threshold=limit
            )
            confirmed = at + rule.confirm_evals - 1
            drop = level - perf
            back = _recovery(
                drop, confirmed, (1 - rule.recovery) * (level - floor), calibration, rule
            )
            result = curve.collapsed_at(judged, at, back, None, timer.time(curve, at, None))
            left = int(perf.size - confirmed - 1)
            if back is None and left < rule.evals_after:
                return replace(result, irreversible=None, reason=CENSORED)
            return result
    return replace(
        base,
        collapsed=False,
        irreversible=False,
        perf_0=floor,
        perf_pre=float(peak[-1]),
        noise=calibration.noise,
    )


def calibrate_fall_back(
    healthy: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    confirm: int = 2,
    quantile: float = 0.95,
) -> Calibration | None:
    """The calibration for runs without an onset, from the workload's healthy runs of other
    seeds (each `(steps, perf)`): their evaluation noise, and the `quantile` of the largest fall
    back from their own best level so far that each held for `confirm` evaluations."""
    if not healthy:
        return None
    worst = []
    for _, perf in healthy:
        p = np.asarray(perf, dtype=float)
        p = p[np.isfinite(p)]
        if p.size < 3:
            continue
        peak = np.maximum.accumulate(p[1:])
        held = confirmed_drops(peak[:-1] - p[2:], confirm) if p.size > 2 else np.zeros(0)
        if held.size:
            worst.append(float(held.max()))
    drop = float(np.quantile(worst, quantile)) if worst else 0.0
    return Calibration(evaluation_noise(healthy), max(drop, 0.0), len(healthy))


@dataclass(frozen=True)
class _Timer:
    """Times the collapse confirmed by one evaluation (see `time_collapse`)."""

    dense: DenseSignal | None
    q_dense: np.ndarray | None
    threshold: float
    no_dense_reason: str | None

    def time(self, curve: _Curve, at: int, onset: int | None) -> CollapseTime:
        lo = float(curve.steps[at - 1]) if at > 0 else -np.inf
        env = curve.env_at(at)
        return time_collapse(
            self.dense,
            self.q_dense,
            lo,
            int(curve.steps[at]),
            threshold=self.threshold,
            bound=-np.inf if onset is None else float(onset),
            eval_env=None if env is None else int(env),
            eval_nonfinite=bool(np.isinf(curve.perf[at])),
            no_dense_reason=self.no_dense_reason,
        )


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
        self,
        base: CollapseResult,
        at: int,
        back: int | None,
        onset_env: int | None,
        when: CollapseTime,
    ) -> CollapseResult:
        """`base` marked as collapsed at `when`, confirmed by evaluation `at`, recovering at
        evaluation `back` (None: never). Without an onset only the absolute steps are set."""
        onset = base.onset_step
        back_env = None if back is None else self.env_at(back)
        return replace(
            base,
            collapsed=True,
            irreversible=back is None,
            collapse_step=None if onset is None else when.step - onset,
            collapse_env_steps=None
            if when.env_step is None or onset_env is None
            else when.env_step - onset_env,
            recovery_steps=None if back is None else int(self.steps[back]) - when.step,
            recovery_env_steps=None
            if back_env is None or when.env_step is None
            else int(back_env) - when.env_step,
            collapse_at=when.step,
            collapse_at_env=when.env_step,
            collapse_eval_step=None if onset is None else int(self.steps[at]) - onset,
            collapse_eval_at=int(self.steps[at]),
            collapse_timing=when.timing,
            collapse_timing_note=when.note,
        )
