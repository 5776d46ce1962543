"""The built-in detectors: the Meta-State Monitor, the reactive guards people use today
(faithful to their published defaults) and a linear PCA meta-state, registered in this order.

Each guard has a pure scoring function over arrays and a thin class following the registry's
`Detector` protocol: `score(df) -> (n,)` (higher = more alarming; offline), `native(scores)`
(the guard's own rule) and an online `update(row) -> float` that equals `score` step by step.

Every guard also treats a non-finite value as an alarm (score +inf), as every framework checks
for NaN/Inf separately. A value that was not logged is missing, not non-finite: SB3 logs PPO's
loss once per rollout, so most PPO rows have no loss. The store keeps no difference between a
NaN and a gap (Parquet writes both as null), so a NaN is a divergence only on a row that
recorded non-finite gradients (`nonfinite_grads` > 0, any optimizer role); ±inf always is.
A guard skips a missing value: its score there is NaN (no alarm) and its state is unchanged,
so its windows count logged values. The "loss" a guard watches is the `loss` column; an RL run
without one uses the best available stand-in: `value_loss`, then `critic_loss`, then
`critic/loss` (see `loss_series`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

from stabilitybench.monitor.features import FeatureExtractor
from stabilitybench.monitor.registry import (
    BaseDetector,
    Detector,
    DetectorSettings,
    Healthy,
    register_detector,
    telemetry_tables,
)
from stabilitybench.monitor.ssm import MetaStateMonitor
from stabilitybench.store import RunData

LOSS_COLUMNS = ("loss", "value_loss", "critic_loss", "critic/loss")
# The norm before clipping where a workload logs it (a guard like ZClip sees that one).
GRAD_NORM_COLUMNS = ("grad_norm_raw", "grad_norm", "actor/grad_norm", "critic/grad_norm")


NONFINITE_COLUMN = "nonfinite_grads"
# A signal logged on every row from the first, for at least this many rows, that then has no
# value, went non-finite there (a loop that logs NaN for a diverged loss; the store keeps it as
# a gap). A signal logged on a schedule (every k-th row, once per rollout) never qualifies.
DENSE_ROWS = 10


def _is_nonfinite_column(name: str) -> bool:
    return name == NONFINITE_COLUMN or name.endswith("/" + NONFINITE_COLUMN)


def _role_columns(names: Sequence[Any], base: str) -> list[str]:
    """`base` and its optimizer-role variants (`actor/base`, `critic/base`) among `names`."""
    return [str(c) for c in names if c == base or str(c).endswith("/" + base)]


def divergent_rows(df: pd.DataFrame) -> np.ndarray:
    """(n,) bool: rows that recorded non-finite gradients (`nonfinite_grads` > 0, any role)."""
    mask = np.zeros(len(df), dtype=bool)
    for name in df.columns:
        if _is_nonfinite_column(str(name)):
            counts = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float)
            mask |= np.nan_to_num(counts, nan=0.0) > 0
    return mask


def _row_diverged(row: Mapping[str, Any]) -> bool:
    """The online twin of `divergent_rows` for one telemetry row."""
    for name, value in row.items():
        if _is_nonfinite_column(str(name)) and value is not None and float(value) > 0:
            return True
    return False


def mark_nonfinite(values: np.ndarray, diverged: np.ndarray) -> np.ndarray:
    """A signal (n,) with NaN meaning "not logged", except where it is a divergence the store
    wrote as a gap: once the signal has been logged, a gap on a row with non-finite gradients
    (`diverged`, (n,) bool), or the first gap of a signal logged on every row from the first for
    at least `DENSE_ROWS` rows. Those become +inf."""
    out = np.asarray(values, dtype=float).copy()
    gaps = np.isnan(out)
    if gaps.all():
        return out
    started = np.arange(out.size) > int(np.argmax(~gaps))  # after the first logged value
    out[gaps & diverged & started] = np.inf
    first = int(np.argmax(gaps))
    if gaps[first] and first >= DENSE_ROWS:
        out[first] = np.inf
    return out


def _column(df: pd.DataFrame, candidates: Sequence[str]) -> np.ndarray:
    """The first candidate column with a value (see `mark_nonfinite` for NaN and +inf)."""
    for name in candidates:
        if name in df.columns:
            values = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float)
            if not np.all(np.isnan(values)):
                return mark_nonfinite(values, divergent_rows(df))
    return np.full(len(df), np.nan)


def _max_column(df: pd.DataFrame, base: str) -> np.ndarray:
    """Per row, the largest value of `base` over optimizer roles (`base`, `actor/base`, …);
    ±inf is +inf (a non-finite value is an alarm whatever its sign)."""
    out = np.full(len(df), np.nan)
    names = _role_columns(list(df.columns), base)
    for name in names:
        values = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float)
        out = np.fmax(out, np.where(np.isinf(values), np.inf, values))
    return mark_nonfinite(out, divergent_rows(df)) if names else out


def loss_series(df: pd.DataFrame) -> np.ndarray:
    """The loss a guard watches: `loss`, else `value_loss`, `critic_loss`, `critic/loss` (n,)."""
    return _column(df, LOSS_COLUMNS)


def grad_norm_series(df: pd.DataFrame) -> np.ndarray:
    """The total gradient norm: `grad_norm_raw` (before clipping), `grad_norm`, else the actor's,
    else the critic's (n,)."""
    return _column(df, GRAD_NORM_COLUMNS)


class _Signal:
    """Online twin of `_column` / `_max_column`: one signal's value per row, with its state
    (rows seen, whether the signal has been logged on every one of them)."""

    def __init__(self, candidates: Sequence[str] = (), base: str | None = None) -> None:
        self.candidates, self.base = tuple(candidates), base
        self.rows, self.dense, self.logged = 0, True, False

    def value(self, row: Mapping[str, Any]) -> float:
        raw = self._raw(row)
        seen, self.rows = self.rows, self.rows + 1
        if not math.isnan(raw):
            self.logged = True
            return raw
        first_gap, self.dense = self.dense, False
        if self.logged and (_row_diverged(row) or (first_gap and seen >= DENSE_ROWS)):
            return math.inf
        return math.nan

    def _raw(self, row: Mapping[str, Any]) -> float:
        """The row's value of the signal, NaN if it has none."""
        if self.base is not None:
            best = math.nan
            for name in _role_columns(list(row), self.base):
                value = row.get(name)
                if value is not None:
                    number = float(value)
                    best = float(np.fmax(best, math.inf if math.isinf(number) else number))
            return best
        for name in self.candidates:
            value = row.get(name)
            if value is not None:
                return float(value)
        return math.nan


# -- pure scoring functions -------------------------------------------------------------------


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
    state = _ZClipState(alpha, z_thresh, warmup_steps, eps)
    for i, g in enumerate(grad_norm):
        out[i] = state.update(float(g))
    return out


class _ZClipState:
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
    state = _LightningState(window, warmup)
    for i, value in enumerate(loss):
        out[i] = state.update(float(value))
    return out


class _LightningState:
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
    state = _MegatronState(num_samples)
    for i, value in enumerate(loss):
        out[i] = state.update(float(value))
    return out


class _MegatronState:
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
    """
    out = np.full(len(values), np.nan)
    if len(values) < window:
        return out
    win = sliding_window_view(values, window)  # (m, w)
    diffs = np.sign(win[:, None, :] - win[:, :, None])  # (m, w, w): sign(x_j − x_i)
    upper = np.triu(np.ones((window, window), dtype=bool), k=1)
    tau = diffs[:, upper].sum(axis=1) / upper.sum()
    tau[np.isnan(win).any(axis=1)] = np.nan
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


@register_detector
class MSMDetector(BaseDetector):
    """The Meta-State Monitor as a detector: score `msd`, latents `z_1..z_k` in scores.parquet.

    Its native rule is the threshold the monitor calibrated at fit time on held-out healthy runs.
    """

    name = "msm"
    title = "Meta-State Monitor"
    citation = "StabilityBench (GRU state-space meta-state, arXiv 2601.13160)"
    fitted = True
    column = "msd"
    rewind_on_undo = True  # a guard's undone step leaves the GRU state and smoothing as before

    def __init__(self, monitor: MetaStateMonitor) -> None:
        self.monitor = monitor

    @classmethod
    def create(cls, settings: DetectorSettings) -> Detector:
        options = {"include_controls": settings.include_controls, **settings.monitor_options}
        return cls(MetaStateMonitor(latent_dim=settings.latent_dim, seed=settings.seed, **options))

    def fit(self, healthy: Healthy) -> Detector:
        self.monitor.fit(list(healthy))  # RunData keep their seeds: the monitor's hold-out
        return self

    @classmethod
    def load(cls, folder: Path) -> Detector | None:
        from stabilitybench.monitor.ssm import CONFIG_FILE, MODEL_FILE

        if not ((folder / CONFIG_FILE).is_file() and (folder / MODEL_FILE).is_file()):
            return None
        return cls(MetaStateMonitor.load(folder))

    @property
    def feature_map(self) -> FeatureExtractor | None:
        return self.monitor.features

    @property
    def fit_info(self) -> dict[str, Any]:
        return self.monitor.fit_info

    def save(self, folder: Path) -> bool:
        self.monitor.save(folder)
        return True

    def describe(self) -> str:
        epochs = self.monitor.fit_info.get("epochs")
        return f"full monitor (threshold {self.monitor.threshold:.3g}, {epochs} epochs)"

    def score(self, table: pd.DataFrame) -> np.ndarray:
        return self.monitor.score(table)["msd"].to_numpy(dtype=float)

    def native(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) >= self.monitor.threshold

    def attribution(
        self,
        table: pd.DataFrame,
        index: int,
        index_names: Mapping[str, Sequence[str]] | None = None,
    ) -> str | None:
        """The features (and layers) that moved the deviation most at row `index`, as
        `feature @ layer (+8.1σ, 62%), …` (see `MetaStateMonitor.explain`)."""
        explained = self.monitor.explain(table, index, index_names)
        return explained.text() or None

    def reset(self) -> None:
        self.monitor.reset()

    def update(self, row: Mapping[str, Any]) -> float:
        return self.monitor.step(row)

    def online_state(self) -> Any:
        return self.monitor.online_state()

    def set_online_state(self, state: Any) -> None:
        self.monitor.set_online_state(state)

    def recalibrate(self, scores: Sequence[np.ndarray], source: str) -> None:
        """The native threshold from out-of-sample scores of healthy runs."""
        self.monitor.recalibrate(scores, source)

    def score_columns(self, table: pd.DataFrame) -> dict[str, np.ndarray]:
        scored = self.monitor.score(table)
        msd = scored["msd"].to_numpy(dtype=float)
        latents = {c: scored[c].to_numpy() for c in scored.columns if c.startswith("z_")}
        return {"msd": msd, **latents, "msd_native": self.native(msd)}

    def empty_columns(self, n: int) -> dict[str, np.ndarray]:
        latents = {f"z_{i + 1}": np.full(n, np.nan) for i in range(self.monitor.config.latent_dim)}
        return {"msd": np.full(n, np.nan), **latents, "msd_native": np.zeros(n, bool)}


@register_detector
@dataclass
class ZClipDetector(BaseDetector):
    """ZClip (Kumar et al. 2025, arXiv 2504.02507): EMA z-score of the gradient norm.

    Defaults as published: alpha 0.97, z_thresh 2.5, 25 warm-up steps; native rule z > 2.5.
    """

    name = "zclip"
    title = "ZClip (gradient-norm EMA z-score)"
    citation = "ZClip, arXiv 2504.02507"
    reads = (GRAD_NORM_COLUMNS,)

    alpha: float = 0.97  # EMA decay of the mean and variance
    z_thresh: float = 2.5  # a spike above this z is clipped (and is the native alarm)
    warmup_steps: int = 25  # norms that only initialise the statistics
    native_threshold = "z_thresh"  # native rule: score > z_thresh

    def score(self, table: pd.DataFrame) -> np.ndarray:
        return zclip_scores(grad_norm_series(table), self.alpha, self.z_thresh, self.warmup_steps)

    def reset(self) -> None:
        self._state = _ZClipState(self.alpha, self.z_thresh, self.warmup_steps, 1e-6)
        self._grad = _Signal(GRAD_NORM_COLUMNS)

    def update(self, row: Mapping[str, Any]) -> float:
        return self._state.update(self._grad.value(row))


@register_detector
@dataclass
class OLMoDetector(BaseDetector):
    """OLMo 2 / OLMo-core `StabilityMonitorCallback`: rolling z-score of loss and grad norm.

    A spike is a value above mean + 6·std of the previous 128 values (population std), for the
    loss or the gradient norm; the score is the larger of the two z-scores.
    """

    name = "olmo"
    title = "OLMo stability monitor (rolling z-score)"
    citation = "OLMo 2 (arXiv 2501.00656), olmo_core StabilityMonitorCallback"
    reads = (GRAD_NORM_COLUMNS, LOSS_COLUMNS)

    window: int = 128
    threshold_std: float = 6.0
    native_threshold = "threshold_std"  # native rule: score > threshold_std

    def score(self, table: pd.DataFrame) -> np.ndarray:
        grad = rolling_zscores(grad_norm_series(table), self.window)
        return np.fmax(grad, rolling_zscores(loss_series(table), self.window))

    def reset(self) -> None:
        self._history: dict[str, deque[float]] = {}
        self._signals = {"grad_norm": _Signal(GRAD_NORM_COLUMNS), "loss": _Signal(LOSS_COLUMNS)}

    def update(self, row: Mapping[str, Any]) -> float:
        best = math.nan
        for key, signal in self._signals.items():
            value = signal.value(row)
            if math.isnan(value):  # not logged: no score, not part of the window
                continue
            history = self._history.setdefault(key, deque(maxlen=self.window))
            best = float(np.fmax(best, _rolling_z(history, value, self.window)))
            history.append(value)
        return best


def _rolling_z(history: deque[float], value: float, window: int) -> float:
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


@register_detector
@dataclass
class LightningDetector(BaseDetector):
    """Lightning's `SpikeDetection` on the loss: window 10, rtol 2.0 (mode "min", warmup 1)."""

    name = "lightning"
    title = "Lightning spike detection (loss)"
    citation = "lightning.fabric.utilities.spike.SpikeDetection"
    reads = (LOSS_COLUMNS,)

    window: int = 10
    rtol: float = 2.0
    native_threshold = "rtol"  # native rule: score >= rtol
    native_inclusive = True
    warmup: int = 1

    def score(self, table: pd.DataFrame) -> np.ndarray:
        state = _LightningState(self.window, self.warmup, self.rtol)
        return np.asarray([state.update(float(v)) for v in loss_series(table)])

    def reset(self) -> None:
        self._state = _LightningState(self.window, self.warmup, self.rtol)
        self._loss = _Signal(LOSS_COLUMNS)

    def update(self, row: Mapping[str, Any]) -> float:
        return self._state.update(self._loss.value(row))


@register_detector
@dataclass
class MegatronDetector(BaseDetector):
    """Megatron-LM's spiky-loss check: |loss| ≥ 10 × the max |loss| of the first 100 values."""

    name = "megatron"
    title = "Megatron-LM spiky-loss check"
    citation = "Megatron-LM RerunStateMachine.is_unexpectedly_large (check_for_spiky_loss)"
    reads = (LOSS_COLUMNS,)

    threshold: float = 10.0
    native_threshold = "threshold"  # native rule: score >= threshold
    native_inclusive = True
    num_samples: int = 100

    def score(self, table: pd.DataFrame) -> np.ndarray:
        return megatron_scores(loss_series(table), self.num_samples)

    def reset(self) -> None:
        self._state = _MegatronState(self.num_samples)
        self._loss = _Signal(LOSS_COLUMNS)

    def update(self, row: Mapping[str, Any]) -> float:
        return self._state.update(self._loss.value(row))


@register_detector
@dataclass
class EWSDetector(BaseDetector):
    """Classic early-warning statistics: rising variance / lag-1 autocorrelation (Kendall tau).

    Scheffer et al. 2009 (Nature 461:53); Dakos et al. 2012 (PLoS ONE 7:e41010). There is no
    single published alarm rule; the native rule here is the common convention tau > 0.8.
    Online, `update` keeps the trailing EMA level and the last windows of each indicator.
    """

    name = "ews"
    title = "early-warning signals (variance, lag-1 AC)"
    citation = "Scheffer et al. 2009; Dakos et al. 2012"
    reads = (LOSS_COLUMNS, GRAD_NORM_COLUMNS)

    window: int = 50  # steps of each rolling variance / autocorrelation
    tau_window: int = 50  # steps over which Kendall's tau measures the indicators' trend
    span: int = 20  # of the trailing EMA the signals are detrended against
    tau_alarm: float = 0.8  # the conventional alarm level of tau
    native_threshold = "tau_alarm"  # native rule: score > tau_alarm

    def score(self, table: pd.DataFrame) -> np.ndarray:
        return ews_scores(
            loss_series(table), grad_norm_series(table), self.window, self.tau_window, self.span
        )

    def reset(self) -> None:
        self._signals = {key: _EWSState(self.window, self.tau_window, self.span) for key in "lg"}
        self._seen_loss = False
        self._loss, self._grad = _Signal(LOSS_COLUMNS), _Signal(GRAD_NORM_COLUMNS)

    def update(self, row: Mapping[str, Any]) -> float:
        loss = self._loss.value(row)
        grad = self._grad.value(row)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_grad = float(np.log(np.abs(grad)))
        self._seen_loss = self._seen_loss or not math.isnan(loss)
        best = self._signals["g"].update(log_grad)
        loss_tau = self._signals["l"].update(loss)
        if self._seen_loss:
            best = float(np.fmax(best, loss_tau))
        if math.isinf(grad) or math.isinf(loss):
            return math.inf
        return best if math.isfinite(best) else 0.0


class _EWSState:
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


@register_detector
@dataclass
class AdamRMSDetector(BaseDetector):
    """StableAdamW's rule (Wortsman et al. 2023, "Stable and low-precision training for
    large-scale vision-language models", arXiv 2304.13013): the RMS over a tensor's entries of
    g / (sqrt(v̂) + eps), max over tensors (and optimizers) — the `adam_rms` probe's
    `adam_rms_max`. It rises when the gradients outgrow Adam's second-moment estimate; loss
    spikes follow 1–8 steps later. StableAdamW divides the update by max(1, RMS), so its native
    rule is RMS > 1. A step the probe did not measure scores NaN.
    """

    name = "adam_rms"
    title = "StableAdamW RMS rule (Adam second-moment lag)"
    citation = "Wortsman et al. 2023, arXiv 2304.13013 (StableAdamW)"
    reads = (("adam_rms_max", "actor/adam_rms_max", "critic/adam_rms_max"),)

    limit: float = 1.0  # StableAdamW clips the update once RMS exceeds 1
    native_threshold = "limit"  # native rule: score > limit

    def score(self, table: pd.DataFrame) -> np.ndarray:
        return _max_column(table, "adam_rms_max")

    def reset(self) -> None:
        self._rms = _Signal(base="adam_rms_max")

    def update(self, row: Mapping[str, Any]) -> float:
        return self._rms.value(row)


@register_detector
@dataclass
class EdgeOfStabilityDetector(BaseDetector):
    """Edge of stability (Cohen et al. 2021, arXiv 2103.00065; for Adam, Cohen et al. 2022,
    arXiv 2207.14484): curvature along the last update times the learning rate, over its
    stability limit (2 for SGD, (2 + 2β1)/(1 − β1) for Adam's preconditioned curvature) — the
    `eos` probe's `eos_ratio`, max over optimizers. 1 is the edge; the native rule is a crossing
    of it, ratio > 1. A step the probe did not measure scores NaN.
    """

    name = "eos"
    title = "edge of stability (curvature × lr over its limit)"
    citation = "Cohen et al. 2021 (arXiv 2103.00065); Cohen et al. 2022 (arXiv 2207.14484)"
    reads = (("eos_ratio", "actor/eos_ratio", "critic/eos_ratio"),)

    limit: float = 1.0  # the stability limit, in units of itself
    native_threshold = "limit"  # native rule: score > limit

    def score(self, table: pd.DataFrame) -> np.ndarray:
        return _max_column(table, "eos_ratio")

    def reset(self) -> None:
        self._ratio = _Signal(base="eos_ratio")

    def update(self, row: Mapping[str, Any]) -> float:
        return self._ratio.value(row)


@register_detector
class PCADetector(BaseDetector):
    """A linear meta-state: PCA of the monitor's features to k dims + Mahalanobis distance.

    Fitted on healthy runs (`fit`); it isolates what the recurrent model adds over a linear
    projection. Its native rule is the chi-square 99.9% quantile of the squared distance.
    """

    name = "pca"
    title = "linear meta-state (PCA + Mahalanobis)"
    citation = "linear meta-state (PCA + Mahalanobis)"
    fitted = True

    def __init__(self, latent_dim: int = 4, include_controls: bool = False) -> None:
        self.latent_dim = latent_dim
        self.include_controls = include_controls
        self.features: FeatureExtractor | None = None
        self.mean = np.zeros(0)
        self.components = np.zeros((0, 0))
        self.variances = np.zeros(0)

    @classmethod
    def create(cls, settings: DetectorSettings) -> Detector:
        return cls(settings.latent_dim, settings.include_controls)

    def fit(self, healthy: Healthy) -> PCADetector:
        tables = telemetry_tables(healthy)
        knobs = {k for r in healthy if isinstance(r, RunData) for k in r.info.get("knobs") or {}}
        self.features = FeatureExtractor.fit(
            tables, include_controls=self.include_controls, knobs=knobs
        )
        x = np.concatenate([self.features.transform(t) for t in tables])
        self.mean = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        k = min(self.latent_dim, vt.shape[0])
        self.components = vt[:k]  # (k, d)
        self.variances = np.maximum((s[:k] ** 2) / max(len(x) - 1, 1), 1e-6)
        return self

    @property
    def feature_map(self) -> FeatureExtractor | None:
        return self.features

    @property
    def fit_info(self) -> dict[str, Any]:
        if self.features is None:
            return {}
        return {
            "features": self.features.names,
            "excluded_features": dict(self.features.excluded),
            "include_controls": self.features.include_controls,
        }

    def project(self, features: np.ndarray) -> np.ndarray:
        """(n, d) normalised features → (n, k) principal scores."""
        return (features - self.mean) @ self.components.T

    def _distance(self, features: np.ndarray) -> np.ndarray:
        z = self.project(features)
        return np.sqrt(((z**2) / self.variances).sum(axis=-1))

    def score(self, table: pd.DataFrame) -> np.ndarray:
        if self.features is None:
            raise RuntimeError("PCADetector.fit must be called before scoring")
        return self._distance(self.features.transform(table))

    def native(self, scores: np.ndarray) -> np.ndarray:
        from scipy.stats import chi2

        return np.asarray(scores) ** 2 > chi2.ppf(0.999, df=len(self.variances))

    def reset(self) -> None:
        if self.features is not None:
            self.features.reset()

    def update(self, row: Mapping[str, Any]) -> float:
        if self.features is None:
            raise RuntimeError("PCADetector.fit must be called before scoring")
        return float(self._distance(self.features.transform_row(row)))
