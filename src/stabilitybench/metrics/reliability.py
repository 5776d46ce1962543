"""Reliability metrics of Chan et al. 2020, "Measuring the Reliability of RL Algorithms".

Within a run (one learning curve): dispersion across time (IQR of detrended values in sliding
windows), short-term risk (lower-tail CVaR of the detrended values), long-term risk (upper-tail
CVaR of the drawdown). Across runs (curves of one condition): dispersion across runs (IQR across
runs at each evaluation after a low-pass filter) and risk across runs (lower-tail CVaR of final
performance). Detrending is the first difference, divided by the step difference when steps are
given (as in the reference implementation). Every function expects finite values; callers cut a
curve at its first non-finite value (`finite_prefix`): a divergence is measured by collapse, not
here.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

DEFAULT_ALPHA = 0.05
DEFAULT_WINDOW = 5  # differences per sliding window
# A fraction of the Nyquist frequency. Chan et al. use 0.01 on curves of thousands of points; on
# audit curves of tens of evaluations the filter's transient is longer than the curve and 0.01
# leaves only the padding (a constant), so the default keeps trends over ~10 evaluations.
DEFAULT_LOWPASS_CUTOFF = 0.2
DEFAULT_LOWPASS_ORDER = 8


def finite_prefix(values: ArrayLike) -> np.ndarray:
    """The values up to (not including) the first infinite one, NaN dropped (values: (n,))."""
    arr = np.asarray(values, dtype=float)
    arr = arr[~np.isnan(arr)]
    bad = np.flatnonzero(~np.isfinite(arr))
    return arr[: bad[0]] if bad.size else arr


def iqr(values: ArrayLike, axis: int | None = None) -> np.ndarray | float:
    """Interquartile range, linear interpolation between order statistics (scipy's default)."""
    q75, q25 = np.percentile(np.asarray(values, dtype=float), [75, 25], axis=axis)
    out = q75 - q25
    return float(out) if np.ndim(out) == 0 else out


def differences(values: ArrayLike, steps: ArrayLike | None = None) -> np.ndarray:
    """First differences (values: (n,)) → (n−1,); divided by the step differences if given."""
    arr = np.asarray(values, dtype=float)
    diffs = np.diff(arr)
    if steps is not None:
        diffs = diffs / np.diff(np.asarray(steps, dtype=float))
    return diffs


def cvar(
    values: ArrayLike, alpha: float = DEFAULT_ALPHA, tail: Literal["lower", "upper"] = "lower"
) -> float:
    """Conditional value at risk: the mean of the values at or beyond the alpha-quantile.

    values: (n,) finite. `lower`: mean of values <= the alpha percentile (linear interpolation);
    `upper`: mean of values >= the (1 − alpha) percentile. NaN for an empty array.
    """
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return float("nan")
    if tail == "lower":
        var = np.percentile(arr, 100 * alpha)
        return float(arr[arr <= var].mean())
    var = np.percentile(arr, 100 * (1 - alpha))
    return float(arr[arr >= var].mean())


def drawdown(values: ArrayLike) -> np.ndarray:
    """Drop from the highest value so far (values: (n,)) → (n,), >= 0; larger is a deeper drop."""
    arr = np.asarray(values, dtype=float)
    return np.maximum.accumulate(arr) - arr


def curve_range(values: ArrayLike) -> float:
    """Chan et al.'s normaliser: the 95th percentile minus the first value (values: (n,))."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return float("nan")
    return float(np.percentile(arr, 95) - arr[0])


def dispersion_across_time(
    values: ArrayLike, steps: ArrayLike | None = None, window: int = DEFAULT_WINDOW
) -> float:
    """Mean over sliding windows of the IQR of the detrended curve (values: (n,)); lower is better.

    Windows hold `window` consecutive differences and slide by one; a curve with fewer
    differences than `window` is one window. NaN for fewer than 2 values.
    """
    diffs = differences(values, steps)
    if diffs.size == 0:
        return float("nan")
    width = min(window, diffs.size)
    windows = np.lib.stride_tricks.sliding_window_view(diffs, width)  # (n_windows, width)
    return float(np.mean(iqr(windows, axis=1)))


def short_term_risk(
    values: ArrayLike, steps: ArrayLike | None = None, alpha: float = DEFAULT_ALPHA
) -> float:
    """Lower-tail CVaR of the detrended curve (values: (n,)): the typical worst single drop.

    Negative values are drops; higher (closer to 0 or positive) is better.
    """
    return cvar(differences(values, steps), alpha, "lower")


def long_term_risk(values: ArrayLike, alpha: float = DEFAULT_ALPHA) -> float:
    """Upper-tail CVaR of the drawdown (values: (n,)): the worst sustained drops; lower is better."""
    return cvar(drawdown(values), alpha, "upper")


def lowpass_filter(
    curves: ArrayLike, cutoff: float = DEFAULT_LOWPASS_CUTOFF, order: int = DEFAULT_LOWPASS_ORDER
) -> np.ndarray:
    """Zero-phase Butterworth low-pass along time (curves: (n_runs, n_points)) → same shape.

    `cutoff` is a fraction of the Nyquist frequency (the −3 dB point). The ends are padded by
    reflection (`even`), which keeps a jittery curve's level at its ends. Curves with fewer than
    3 points are returned unchanged.
    """
    from scipy.signal import butter, sosfiltfilt

    arr = np.atleast_2d(np.asarray(curves, dtype=float))
    if arr.shape[1] < 3:
        return arr.copy()
    sos = butter(order, cutoff, output="sos")
    padlen = min(arr.shape[1] - 1, 3 * (2 * len(sos) + 1))
    return np.asarray(sosfiltfilt(sos, arr, axis=1, padtype="even", padlen=padlen))


def dispersion_across_runs(
    curves: ArrayLike,
    cutoff: float | None = DEFAULT_LOWPASS_CUTOFF,
    order: int = DEFAULT_LOWPASS_ORDER,
) -> np.ndarray:
    """IQR across runs at each evaluation after low-pass filtering each curve.

    curves: (n_runs, n_points) on a common evaluation grid → (n_points,); lower is better.
    `cutoff=None` skips the filter.
    """
    arr = np.atleast_2d(np.asarray(curves, dtype=float))
    if cutoff is not None:
        arr = lowpass_filter(arr, cutoff, order)
    return np.asarray(iqr(arr, axis=0))


def risk_across_runs(final_perf: ArrayLike, alpha: float = DEFAULT_ALPHA) -> float:
    """Lower-tail CVaR of final performance across runs (final_perf: (n_runs,)); higher is better."""
    return cvar(final_perf, alpha, "lower")
