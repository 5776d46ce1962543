"""The guards' scoring maths: pure functions over arrays, and the online state that
reproduces each of them step by step.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def zclip_scores(
    grad_norm: np.ndarray,
    alpha: float = 0.97,
    z_thresh: float = 2.5,
    warmup_steps: int = 25,
    eps: float = 1e-6,
) -> np.ndarray:
    """ZClip z-score of the gradient norm against its EMA mean/variance (grad_norm: (n,) → (n,)).

    Follows the reference implementation (bluorion-com/ZClip, `zscore` mode with
    `adaptive_scaling`): the first `warmup_steps` norms initialise mean and (population)
    variance; afterwards z = (g − mean) / (std + eps); a spike (z > z_thresh) updates the EMA with
    the clipped value mean + z_thresh·std / (z / z_thresh) instead of g. Score 0 during warm-up;
    NaN (not logged) is skipped: NaN score, state unchanged; ±inf scores +inf.
    """
    out = np.zeros(len(grad_norm))
    state = ZClipState(alpha, z_thresh, warmup_steps, eps)
    for i, g in enumerate(grad_norm):
        out[i] = state.update(float(g))
    return out


class ZClipState:
    """Running state of ZClip's EMA statistics."""

    def __init__(self, alpha: float, z_thresh: float, warmup_steps: int, eps: float) -> None:
        self.alpha, self.z_thresh, self.warmup_steps, self.eps = alpha, z_thresh, warmup_steps, eps
        self.buffer: list[float] = []
        self.mean: float | None = None
        self.var = 0.0

    def update(self, g: float) -> float:
        if math.isnan(g):
            return math.nan
        if not math.isfinite(g):
            return math.inf
        if self.mean is None:
            self.buffer.append(g)
            if len(self.buffer) >= self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
            return 0.0
        std = self.var**0.5
        z = (g - self.mean) / (std + self.eps)
        effective = g
        if z > self.z_thresh:
            effective = self.mean + (self.z_thresh * std) / (z / self.z_thresh)
        self.mean = self.alpha * self.mean + (1 - self.alpha) * effective
        self.var = self.alpha * self.var + (1 - self.alpha) * (effective - self.mean) ** 2
        return z


def rolling_zscores(values: np.ndarray, window: int = 128) -> np.ndarray:
    """z of each value against the previous `window` logged values (population std) (n,) → (n,).

    0 until the window is full or when std < 1e-10 (OLMo-core's `_is_spike` returns False there).
    ±inf values score +inf and, as in OLMo-core, still enter the history. NaN (not logged) is
    skipped: NaN score, and it is not part of any window.
    """
    values = np.asarray(values, dtype=float)
    logged = ~np.isnan(values)
    if not logged.all():
        out = np.full(len(values), np.nan)
        out[logged] = rolling_zscores(values[logged], window)
        return out
    n = len(values)
    out = np.zeros(n)
    if n <= window:
        out[~np.isfinite(values)] = np.inf
        return out
    history = sliding_window_view(values[:-1], window)  # (n - window, window): values before i
    with np.errstate(invalid="ignore", over="ignore"):
        mean = history.mean(axis=1)
        std = history.std(axis=1)
        z = (values[window:] - mean) / std
    z[~(std >= 1e-10)] = 0.0
    out[window:] = z
    out[~np.isfinite(out)] = 0.0
    out[~np.isfinite(values)] = np.inf
    return out


def lightning_scores(loss: np.ndarray, window: int = 10, warmup: int = 1) -> np.ndarray:
    """Relative excess of the loss over Lightning's running mean, (loss − mean) / |mean| (n,).

    Lightning's `SpikeDetection` (lightning.fabric.utilities.spike, mode "min"): a running mean
    over the last `window` accepted losses; a loss that improves on the last accepted one is
    never a spike (score 0 here); a spike is not added to the statistics; non-finite is a spike.
    The native rule is score ≥ rtol (default 2.0) from batch `warmup` on. A loss that was not
    logged (NaN) is no batch: NaN score, state unchanged.
    """
    out = np.zeros(len(loss))
    state = LightningState(window, warmup)
    for i, value in enumerate(loss):
        out[i] = state.update(float(value))
    return out


class LightningState:
    """Running mean of accepted losses and the last accepted loss."""

    def __init__(self, window: int, warmup: int, rtol: float = 2.0) -> None:
        self.values: deque[float] = deque(maxlen=window)
        self.last = 0.0
        self.warmup, self.rtol, self.batch = warmup, rtol, 0

    def update(self, loss: float) -> float:
        if math.isnan(loss):
            return math.nan
        batch, self.batch = self.batch, self.batch + 1
        if not math.isfinite(loss):
            return math.inf if batch >= self.warmup else 0.0
        score = 0.0
        if self.values and loss - self.last > 0:
            mean = sum(self.values) / len(self.values)
            score = abs(loss - mean) / max(abs(mean), 1e-12)
        if batch < self.warmup or score < self.rtol:
            self.values.append(loss)
            self.last = loss
        return score if batch >= self.warmup else 0.0


def megatron_scores(loss: np.ndarray, num_samples: int = 100) -> np.ndarray:
    """|loss| as a multiple of the largest |loss| among the first `num_samples` finite ones (n,).

    Megatron-LM's `RerunStateMachine.is_unexpectedly_large` (used by `check_for_spiky_loss` with
    threshold 10): the max is taken over the first `num_samples` finite values; those steps are
    never flagged (score 0). Non-finite values are Megatron's separate NaN/Inf check (+inf here);
    a loss that was not logged (NaN) is skipped (NaN score).
    """
    out = np.zeros(len(loss))
    state = MegatronState(num_samples)
    for i, value in enumerate(loss):
        out[i] = state.update(float(value))
    return out


class MegatronState:
    def __init__(self, num_samples: int) -> None:
        self.num_samples, self.count, self.max_value = num_samples, 0, 0.0

    def update(self, loss: float) -> float:
        value = abs(loss)
        if math.isnan(value):
            return math.nan
        if not math.isfinite(value):
            return math.inf
        if self.count < self.num_samples:
            self.count += 1
            self.max_value = max(self.max_value, value)
            return 0.0
        return value / max(self.max_value, 1e-12)


def causal_detrend(values: np.ndarray, span: int = 20) -> np.ndarray:
    """Residuals from a trailing EMA with the given span (n,) → (n,), using only the past."""
    alpha = 2.0 / (span + 1.0)
    out = np.zeros(len(values))
    level = math.nan
    for i, v in enumerate(values):
        if not math.isfinite(v):
            out[i] = math.nan
            continue
        if math.isnan(level):
            level = v
        out[i] = v - level
        level = (1 - alpha) * level + alpha * v
    return out


def rolling_variance(values: np.ndarray, window: int) -> np.ndarray:
    """Variance (ddof=1) over the trailing `window` values; NaN until full (n,) → (n,).

    Same convention as pandas `.rolling(window).var()`, which ewstools uses.
    """
    out = np.full(len(values), np.nan)
    if len(values) >= window:
        out[window - 1 :] = sliding_window_view(values, window).var(axis=1, ddof=1)
    return out


def rolling_lag1_autocorrelation(values: np.ndarray, window: int) -> np.ndarray:
    """Pearson correlation of x[t] with x[t+1] inside each trailing window; NaN until full.

    Same as ewstools' `compute_auto(lag=1)` (pandas `Series.autocorr` on each window).
    """
    out = np.full(len(values), np.nan)
    if len(values) < window:
        return out
    win = sliding_window_view(values, window)  # (m, w)
    a, b = win[:, :-1], win[:, 1:]
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    out[window - 1 :] = corr
    return out


def rolling_kendall_tau(values: np.ndarray, window: int) -> np.ndarray:
    """Kendall's tau (tau-a) between time and value over each trailing window; NaN until full.

    The classic early-warning trend statistic (Dakos et al. 2012). Windows with NaN give NaN.
    Per lag L, the signs of x[t + L] − x[t] are summed over the window with a cumulative sum:
    O(n·window), where comparing every pair of every window is O(n·window²); the sums are of
    −1, 0 and 1, so exact either way.
    """
    values = np.asarray(values, dtype=float)
    n = len(values)
    out = np.full(n, np.nan)
    if n < window:
        return out
    ends = np.arange(window - 1, n)  # the last index of each full window
    total = np.zeros(len(ends))
    for lag in range(1, window):
        signs = np.nan_to_num(np.sign(values[lag:] - values[:-lag]))  # pairs (t, t + lag)
        cumulative = np.concatenate([[0.0], np.cumsum(signs)])
        # a window ending at e holds the pairs starting at e − window + 1 … e − lag
        total += cumulative[ends - lag + 1] - cumulative[ends - window + 1]
    tau = total / (window * (window - 1) / 2)
    gaps = np.concatenate([[0], np.cumsum(np.isnan(values))])
    tau[(gaps[ends + 1] - gaps[ends - window + 1]) > 0] = np.nan
    out[window - 1 :] = tau
    return out


def ews_scores(
    loss: np.ndarray, grad_norm: np.ndarray, window: int = 50, tau_window: int = 50, span: int = 20
) -> np.ndarray:
    """Classic early-warning score: the largest Kendall tau of rolling variance / lag-1 AC (n,).

    For the detrended loss and log gradient norm, rolling variance and lag-1 autocorrelation over
    `window` steps; the score is the largest Kendall tau of any of the four indicators over the
    last `tau_window` steps (Scheffer et al. 2009; Dakos et al. 2012). 0 until defined.
    """
    n = len(grad_norm)
    best = np.full(n, -np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        signals = [loss, np.log(np.abs(grad_norm))]
    for signal in signals:
        if np.all(np.isnan(signal)):
            continue
        residual = causal_detrend(signal, span)
        for indicator in (
            rolling_variance(residual, window),
            rolling_lag1_autocorrelation(residual, window),
        ):
            tau = rolling_kendall_tau(indicator, tau_window)
            best = np.fmax(best, tau)
    best[~np.isfinite(best)] = 0.0
    best[np.isinf(grad_norm) | np.isinf(loss)] = np.inf  # NaN (not logged) is no alarm
    return best


# -- detector classes -------------------------------------------------------------------------


def rolling_z(history: deque[float], value: float, window: int) -> float:
    """One step of `rolling_zscores` given the previous values."""
    if not math.isfinite(value):
        return math.inf
    if len(history) < window:
        return 0.0
    arr = np.fromiter(history, dtype=float)
    with np.errstate(invalid="ignore"):  # an inf in the window (as offline) gives NaN: no spike
        std = float(arr.std())
    if not std >= 1e-10:
        return 0.0
    z = (value - float(arr.mean())) / std
    return z if math.isfinite(z) else 0.0


class EWSState:
    """Online twin of `ews_scores` for one signal: EMA residuals → indicators → Kendall tau."""

    def __init__(self, window: int, tau_window: int, span: int) -> None:
        self.window, self.tau_window, self.alpha = window, tau_window, 2.0 / (span + 1.0)
        self.level = math.nan
        self.residuals: deque[float] = deque(maxlen=window)
        self.indicators = [deque[float](maxlen=tau_window), deque[float](maxlen=tau_window)]

    def update(self, value: float) -> float:
        residual = math.nan
        if math.isfinite(value):
            self.level = value if math.isnan(self.level) else self.level
            residual = value - self.level
            self.level = (1 - self.alpha) * self.level + self.alpha * value
        self.residuals.append(residual)
        best = -math.inf
        full = len(self.residuals) == self.window
        win = np.fromiter(self.residuals, dtype=float)
        values = (
            (
                float(win.var(ddof=1)),
                float(rolling_lag1_autocorrelation(win, self.window)[-1]),
            )
            if full
            else (math.nan, math.nan)
        )
        for history, indicator in zip(self.indicators, values, strict=True):
            history.append(indicator)
            if len(history) == self.tau_window:
                tau = rolling_kendall_tau(np.fromiter(history, dtype=float), self.tau_window)[-1]
                best = float(np.fmax(best, tau))
        return best


# -- a value against the run's own recent range (median and MAD), for coherence and auto --------
MAD_TO_STD = 1.4826  # MAD × this estimates the standard deviation of a normal sample
_WINDOWS_AT_ONCE = 4096  # history windows whose medians are taken at once (bounds the memory)
# score(median, mad, value) → how alarming `value` is against that range (vectorised)
RangeScore = Callable[[Any, Any, Any], Any]


def recent_range_scores(
    values: np.ndarray, window: int, warmup: int, score: RangeScore
) -> np.ndarray:
    """`score(median, MAD, value)` of each value against the previous `window` logged values (at
    most), values: (n,) → (n,). 0 until `warmup` values are logged (and everywhere when `warmup`
    exceeds `window`). NaN (not logged) scores NaN and is not part of any window; ±inf scores
    +inf and is not part of any window either."""
    values = np.asarray(values, dtype=float)
    out = np.where(np.isnan(values), np.nan, np.inf)
    finite = np.isfinite(values)
    logged = values[finite]  # (m,)
    scores = np.zeros(logged.size)
    for i in range(warmup, min(window, logged.size)):  # a history shorter than the window
        history = logged[:i]
        median = np.median(history)
        scores[i] = score(median, np.median(np.abs(history - median)), logged[i])
    if window >= warmup and logged.size > window:
        windows = sliding_window_view(logged[:-1], window)  # (m − window, window): before i
        for start in range(0, len(windows), _WINDOWS_AT_ONCE):
            chunk = windows[start : start + _WINDOWS_AT_ONCE]
            median = np.median(chunk, axis=1)
            mad = np.median(np.abs(chunk - median[:, None]), axis=1)
            at = slice(window + start, window + start + len(chunk))
            scores[at] = score(median, mad, logged[at])
    out[finite] = scores
    return out


class RecentRangeState:
    """Online twin of `recent_range_scores`: the last `window` logged values of one signal.

    Cost per value: a median and a MAD over at most `window` values (two partitions, O(window)).
    """

    def __init__(self, window: int, warmup: int, score: RangeScore) -> None:
        self.history: deque[float] = deque(maxlen=window)
        self.warmup, self.score = warmup, score

    def update(self, value: float) -> float:
        if math.isnan(value):
            return math.nan
        if not math.isfinite(value):
            return math.inf
        result = 0.0
        if len(self.history) >= self.warmup:
            history = np.fromiter(self.history, dtype=float)
            median = np.median(history)
            mad = np.median(np.abs(history - median))
            result = float(self.score(median, mad, np.float64(value)))
        self.history.append(value)
        return result
