"""The reactive guards people use today, faithful to their published defaults, registered after
the Meta-State Monitor.

Each guard has a pure scoring function over arrays (`scores`) and a thin class following the
registry's `Detector` protocol: `score(df) -> (n,)` (higher = more alarming; offline),
`native(scores)` (the guard's own rule) and an online `update(row) -> float` that equals `score`
step by step. Every guard treats a non-finite value as an alarm (score +inf), as every framework
checks for NaN/Inf separately, and skips a missing value (`columns`): its score there is NaN (no
alarm) and its state is unchanged, so its windows count logged values.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from stabilitybench.detectors.base import (
    BaseDetector,
    register_detector,
)
from stabilitybench.detectors.columns import (
    GRAD_NORM_COLUMNS,
    LOSS_COLUMNS,
    Signal,
    grad_norm_series,
    loss_series,
    max_column,
)
from stabilitybench.detectors.scores import (
    EWSState,
    LightningState,
    MegatronState,
    ZClipState,
    ews_scores,
    megatron_scores,
    rolling_z,
    rolling_zscores,
    zclip_scores,
)


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
        self._state = ZClipState(self.alpha, self.z_thresh, self.warmup_steps, 1e-6)
        self._grad = Signal(GRAD_NORM_COLUMNS)

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
        self._signals = {"grad_norm": Signal(GRAD_NORM_COLUMNS), "loss": Signal(LOSS_COLUMNS)}

    def update(self, row: Mapping[str, Any]) -> float:
        best = math.nan
        for key, signal in self._signals.items():
            value = signal.value(row)
            if math.isnan(value):  # not logged: no score, not part of the window
                continue
            history = self._history.setdefault(key, deque(maxlen=self.window))
            best = float(np.fmax(best, rolling_z(history, value, self.window)))
            history.append(value)
        return best


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
        state = LightningState(self.window, self.warmup, self.rtol)
        return np.asarray([state.update(float(v)) for v in loss_series(table)])

    def reset(self) -> None:
        self._state = LightningState(self.window, self.warmup, self.rtol)
        self._loss = Signal(LOSS_COLUMNS)

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
        self._state = MegatronState(self.num_samples)
        self._loss = Signal(LOSS_COLUMNS)

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
        self._signals = {key: EWSState(self.window, self.tau_window, self.span) for key in "lg"}
        self._seen_loss = False
        self._loss, self._grad = Signal(LOSS_COLUMNS), Signal(GRAD_NORM_COLUMNS)

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
        return max_column(table, "adam_rms_max")

    def reset(self) -> None:
        self._rms = Signal(base="adam_rms_max")

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
        return max_column(table, "eos_ratio")

    def reset(self) -> None:
        self._ratio = Signal(base="eos_ratio")

    def update(self, row: Mapping[str, Any]) -> float:
        return self._ratio.value(row)
