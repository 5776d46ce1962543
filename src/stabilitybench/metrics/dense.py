"""Dense performance signals: what times a collapse to the optimizer step (DESIGN.md).

Evaluations are sparse (every 25–2,000 steps), so they say *whether* a run collapsed; a signal
that exists on (almost) every optimizer step says *when*. Two signals, both higher-is-better:

- `loss_ema`: minus an exponential moving average of the per-step training loss (LM, toy, and
  imported runs with a `loss` column), span `LOSS_EMA_SPAN` optimizer steps.
- `episode_return_ema`: an EMA over training episodes of their returns as they end (SB3's
  Monitor info, logged as `episode_return` = mean return of the episodes that ended in a rollout
  and `episodes` = their count, on the next optimizer step's row), span `RETURN_EMA_SPAN`
  episodes: a row of n episodes moves the average by `1 − (1 − α)^n` of the way to its mean,
  exactly as n single-episode updates with equal returns would.

A non-finite loss is a point of the signal at `-inf` (a divergence, at that step); the average
itself steps over it, so a run a guard rolled back goes on from the last finite value. A NaN
loss is a missing value and is skipped. The functions here are pure (arrays in, arrays out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike

from stabilitybench.settings import LOSS_EMA_SPAN, RETURN_EMA_SPAN

# Spans (α = 2 / (span + 1); an EMA keeps a fraction α / (2 − α) of white noise's variance and
# lags a step change by ~(1 − α) / α points). The loss span, 5 steps (α = 1/3): a tiny GPT-2's
# per-step loss jitters by ~0.1 nats, a few % of progress; 5 steps cut that to 0.45× and lag by
# ~2 steps. On the build-up audit's healthy runs no span from 1 to 20 takes dense progress
# below 1.0 after onset, while on its LR ramps a span of 10 crossed 1–3 steps later than 5 and,
# more often, only after the evaluation had seen the collapse. The return span, 5 episodes: an
# episode return varies by ~30 % between episodes; 5 episodes cut that to 0.45×.
DENSE_SOURCES = ("loss_ema", "episode_return_ema")


@dataclass(frozen=True, eq=False)
class DenseSignal:
    """A run's dense performance signal, sorted by step.

    steps: (m,) optimizer steps; perf: (m,) smoothed performance, higher is better, `-inf` at a
    non-finite raw value; env_steps: (m,) env steps (RL) or None; source: one of
    `DENSE_SOURCES`; excluded: optimizer-step windows `[start, end]` whose raw values were left
    out because they do not measure performance there (e.g. a loss on label-noised batches),
    with `excluded_reason` saying why.
    """

    steps: np.ndarray
    perf: np.ndarray
    source: str
    env_steps: np.ndarray | None = None
    excluded: tuple[tuple[int, int], ...] = field(default=())
    excluded_reason: str | None = None

    @property
    def nonfinite(self) -> np.ndarray:
        """(m,) bool: points where the raw value was non-finite (a divergence)."""
        return np.isneginf(self.perf)

    def env_at(self, i: int) -> int | None:
        if self.env_steps is None or not np.isfinite(self.env_steps[i]):
            return None
        return int(self.env_steps[i])

    def at_evaluations(self, eval_steps: ArrayLike, before: float = np.inf) -> np.ndarray:
        """The signal as it stands at each evaluation (eval_steps: (n,) sorted) → (n,) float.

        For evaluation i: the first finite point at or after its step, before the next
        evaluation and before `before` (the onset, for `perf_pre`); NaN if there is none. "At or
        after": an RL row's episodes were played by the policy of the step before it (the one an
        evaluation at that step judged); an LM row's loss is the model of that very step.
        """
        evals = np.asarray(eval_steps, dtype=float)
        finite = np.isfinite(self.perf)
        steps, perf = self.steps[finite], self.perf[finite]
        out = np.full(evals.size, np.nan)
        for i, step in enumerate(evals):
            limit = min(evals[i + 1] if i + 1 < evals.size else np.inf, before)
            j = int(np.searchsorted(steps, step, side="left"))
            if j < steps.size and steps[j] < limit:
                out[i] = perf[j]
        return out

    def overlaps_excluded(self, lo: float, hi: float) -> bool:
        """Whether an excluded window intersects the step interval (lo, hi]."""
        return any(start <= hi and end > lo for start, end in self.excluded)


def ema(values: ArrayLike, span: float, weights: ArrayLike | None = None) -> np.ndarray:
    """Exponential moving average (values: (m,) finite; weights: (m,) counts ≥ 1 or None).

    `α = 2 / (span + 1)`; the average starts at the first value; a value of weight n moves it by
    `1 − (1 − α)^n` of the way (n equal updates in one).
    """
    x = np.asarray(values, dtype=float)
    if span < 1:
        raise ValueError(f"ema: span must be >= 1, got {span}")
    alpha = 2.0 / (span + 1.0)
    n = np.ones_like(x) if weights is None else np.maximum(np.asarray(weights, dtype=float), 1.0)
    rates = 1.0 - (1.0 - alpha) ** n
    out = np.empty_like(x)
    level = float("nan")
    for i, value in enumerate(x):
        level = value if i == 0 else level + rates[i] * (value - level)
        out[i] = level
    return out


def _smoothed(
    steps: np.ndarray,
    raw: np.ndarray,
    perf_sign: float,
    span: float,
    weights: np.ndarray | None,
    env_steps: np.ndarray | None,
    source: str,
    excluded: Sequence[tuple[int, int]],
    excluded_reason: str | None,
) -> DenseSignal | None:
    """Drop NaN (missing) and excluded rows, average the finite ones, mark ±inf as -inf perf."""
    keep = ~np.isnan(raw)
    for start, end in excluded:
        keep &= ~((steps >= start) & (steps <= end))
    if not np.isfinite(raw[keep]).any():
        return None
    order = np.argsort(steps[keep], kind="stable")
    s, x = steps[keep][order], raw[keep][order]
    w = None if weights is None else weights[keep][order]
    env = None if env_steps is None else env_steps[keep][order]
    finite = np.isfinite(x)
    perf = np.full(x.size, -np.inf)
    perf[finite] = perf_sign * ema(x[finite], span, None if w is None else w[finite])
    return DenseSignal(s, perf, source, env, tuple(excluded), excluded_reason)


def loss_signal(
    steps: ArrayLike,
    loss: ArrayLike,
    *,
    env_steps: ArrayLike | None = None,
    span: float = LOSS_EMA_SPAN,
    excluded: Sequence[tuple[int, int]] = (),
    excluded_reason: str | None = None,
) -> DenseSignal | None:
    """`-EMA(loss)` (steps, loss: (m,); NaN loss = missing, ±inf = divergence); None without a
    finite loss."""
    return _smoothed(
        np.asarray(steps, dtype=float),
        np.asarray(loss, dtype=float),
        -1.0,
        span,
        None,
        None if env_steps is None else np.asarray(env_steps, dtype=float),
        "loss_ema",
        excluded,
        excluded_reason,
    )


def episode_return_signal(
    steps: ArrayLike,
    returns: ArrayLike,
    episodes: ArrayLike | None = None,
    *,
    env_steps: ArrayLike | None = None,
    nonfinite_steps: ArrayLike = (),
    nonfinite_env_steps: ArrayLike | None = None,
    span: float = RETURN_EMA_SPAN,
) -> DenseSignal | None:
    """EMA over episodes of training-episode returns (steps, returns, episodes: (m,); a row
    without a return is skipped; a missing count is 1). `nonfinite_steps` (k,): steps of a
    non-finite loss, added as `-inf` points (their env steps: `nonfinite_env_steps`). None
    without a finite return."""
    s = np.asarray(steps, dtype=float)
    r = np.asarray(returns, dtype=float)
    n = np.ones_like(r) if episodes is None else np.asarray(episodes, dtype=float)
    n = np.where(np.isfinite(n), n, 1.0)
    env = None if env_steps is None else np.asarray(env_steps, dtype=float)
    bad = np.asarray(nonfinite_steps, dtype=float).reshape(-1)
    if bad.size:
        s, r = np.concatenate([s, bad]), np.concatenate([r, np.full(bad.size, np.inf)])
        n = np.concatenate([n, np.ones(bad.size)])
        if env is not None:
            bad_env = (
                np.full(bad.size, np.nan)
                if nonfinite_env_steps is None
                else np.asarray(nonfinite_env_steps, dtype=float).reshape(-1)
            )
            env = np.concatenate([env, bad_env])
    return _smoothed(s, r, 1.0, span, n, env, "episode_return_ema", (), None)
