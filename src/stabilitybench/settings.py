"""The analysis settings a spec can set: how collapse is judged and how warnings are scored.

One type each, with the one set of defaults: the audit spec (`collapse:`, `warning:`), the
importers, the analysis and the CLI all take them from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stabilitybench.errors import StabilityBenchError

COLLAPSE_THRESHOLD = 0.5
"""Progress below which a run has collapsed (a fraction of its pre-onset progress)."""
COLLAPSE_RECOVERY = 0.9
"""Progress at which a collapsed run has recovered."""
PRE_EVALS = 3
"""Evaluations before onset averaged into the pre-onset level."""
LOSS_EMA_SPAN = 5.0
"""Optimizer steps: the span of the training-loss EMA that times a collapse (LM, toy, imported)."""
RETURN_EMA_SPAN = 5.0
"""Training episodes: the span of the episode-return EMA that times a collapse (RL)."""
LEARNED_SIGMAS = 3.0
"""A run is judged only if it gained more than this many σ (evaluation noise) before onset."""
DROP_SIGMAS = 3.0
"""A collapse is a drop below the pre-onset level of more than this many σ (among others)."""
BASELINE_QUANTILE = 0.95
"""The quantile of matched baselines' drops that a collapse must exceed."""
CONFIRM_EVALS = 2
"""Consecutive evaluations that confirm a collapse (and a recovery): the first drops by more than
the collapse threshold, the others stay beyond what runs with nothing done show (a collapse is
confirmed by not having recovered)."""
EVALS_AFTER = 2
"""Evaluations left after a confirmed collapse that make it irreversible (fewer: censored)."""
HORIZON = 100
"""Optimizer steps: the seizure occurrence period (SOP), how far ahead an alarm predicts. Room
for a 50-step lead with as much again on either side, short enough that a warning is about this
run's next moves (the guards' rollback ring reaches 80 steps back), and far above the 1–8 steps
by which Adam's RMS leads a loss spike. An episode that stays on renews its alarm every SOP."""
SPH = 10
"""Optimizer steps: the seizure prediction horizon (SPH), the least lead that is still useful —
time for a guard to act (cut the LR, take a snapshot, page someone). An alarm at t predicts a
collapse in [t + SPH, t + SPH + SOP]."""
EPISODE_GAP = 5
"""Optimizer steps: below-threshold gaps this short inside an episode are merged into it (a
score that dips for a step or two is one warning, not several)."""
TARGET_FALSE_ALARMS = 1.0
"""False alarms per 1,000 steps on held-out healthy runs that thresholds are calibrated for."""
MAX_TARGET_FALSE_ALARMS = 500.0
"""An alarm is an up-crossing, which needs a step below the threshold before it."""
MAX_SHARE_IN_WARNING = 0.5
"""The most of a healthy run that the warning settings let a calibrated detector spend in
warning: an episode renews its alarm every `horizon` steps, so a target of r false alarms per
1,000 steps allows up to r × horizon / 1,000 of the steps in warning (an alarm that never goes
off costs 1,000 / horizon per 1k). Above half, a recall comes nearly free and the target no
longer tells a detector that warns from one that is always on."""


def share_in_warning(target_false_alarms: float, horizon: int) -> float:
    """The share of the calibration runs' steps a detector calibrated to `target_false_alarms`
    per 1,000 steps can spend in warning when its episodes renew every `horizon` steps (each
    alarm holds for at most `horizon` steps); 1 or more: an alarm that never goes off meets it."""
    return target_false_alarms * horizon / 1000.0


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CollapseSettings(_Settings):
    """How a run's collapse is judged (`collapse:` in the spec)."""

    threshold: float = Field(default=COLLAPSE_THRESHOLD, gt=0.0, le=1.0)
    recovery: float = Field(default=COLLAPSE_RECOVERY, gt=0.0, le=1.5)
    pre_evals: int = Field(default=PRE_EVALS, ge=1)
    loss_ema_span: float = Field(default=LOSS_EMA_SPAN, gt=0.0)  # optimizer steps
    return_ema_span: float = Field(default=RETURN_EMA_SPAN, gt=0.0)  # training episodes
    # Calibrated on the runs that were not perturbed (matched baselines of other seeds):
    learned_sigmas: float = Field(default=LEARNED_SIGMAS, gt=0.0)  # gain needed to be judged
    drop_sigmas: float = Field(default=DROP_SIGMAS, gt=0.0)  # least drop that is a collapse
    baseline_quantile: float = Field(default=BASELINE_QUANTILE, gt=0.0, le=1.0)
    confirm_evals: int = Field(default=CONFIRM_EVALS, ge=1)  # consecutive evaluations
    evals_after: int = Field(default=EVALS_AFTER, ge=0)  # left after a collapse: else censored
    # Where a run has no onset of its own and borrows none from perturbed runs (an audit of
    # recipes, no perturbation): the fraction of its planned optimizer steps from which a
    # collapse counts, fixed before the runs (never read off their curves).
    onset: float | None = Field(default=None, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _recovery_above_threshold(self) -> CollapseSettings:
        if self.recovery < self.threshold:
            raise ValueError(f"recovery ({self.recovery}) must be >= threshold ({self.threshold})")
        return self

    def recorded(self) -> dict[str, Any]:
        """What audit.json and run.json record: the two thresholds always, the other settings
        where the spec gave them (so a spec that sets none hashes as it always did)."""
        keep = {"threshold", "recovery"} | set(self.model_fields_set)
        return self.model_dump(include=keep)


class WarningSettings(_Settings):
    """How early warnings are scored (`warning:` in the spec, for the audit or one workload):
    an alarm at step t is true when the collapse starts in [t + sph, t + sph + horizon]."""

    horizon: int = Field(default=HORIZON, gt=0)  # optimizer steps: SOP
    sph: int = Field(default=SPH, ge=0)  # optimizer steps: the least useful lead
    gap: int = Field(default=EPISODE_GAP, ge=0)  # optimizer steps merged inside an episode
    target_false_alarms: float = Field(
        default=TARGET_FALSE_ALARMS, gt=0.0, le=MAX_TARGET_FALSE_ALARMS, allow_inf_nan=False
    )  # per 1,000 steps on held-out healthy runs

    @property
    def share_in_warning(self) -> float:
        """The most of a healthy run a detector calibrated to these settings can be in warning."""
        return share_in_warning(self.target_false_alarms, self.horizon)

    def check(self, where: str) -> None:
        """A user error if the target lets a calibrated detector stay in warning (see
        `MAX_SHARE_IN_WARNING`); `where` names the settings (`warning`, a workload)."""
        if self.share_in_warning <= MAX_SHARE_IN_WARNING:
            return
        always_on = 1000.0 / self.horizon
        raise StabilityBenchError(
            f"{where}: target_false_alarms {self.target_false_alarms:g} per 1,000 steps with "
            f"horizon {self.horizon} lets a calibrated detector be in warning on up to "
            f"{min(self.share_in_warning, 1.0):.0%} of healthy steps (an episode renews its alarm "
            f"every horizon steps: one that never goes off costs {always_on:g} per 1k), so a "
            f"recall would come nearly free; keep target_false_alarms x horizon at most "
            f"{MAX_SHARE_IN_WARNING * 1000:g}, e.g. target_false_alarms "
            f"{100 / self.horizon:.2g} with horizon {self.horizon}"
        )

    def over(self, override: WarningSettings | None) -> WarningSettings:
        """These settings with the fields `override` set explicitly put over them."""
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(include=override.model_fields_set))


def warning_by_workload(spec: Mapping[str, Any]) -> dict[str, WarningSettings]:
    """Each workload's warning settings from a resolved spec (audit.json's `spec`): its own
    `warning` over the audit's, over the defaults."""
    top = WarningSettings.model_validate(spec.get("warning") or {})
    found = {}
    for workload in spec.get("workloads") or []:
        own = workload.get("warning")
        found[str(workload["name"])] = top.over(WarningSettings.model_validate(own or {}))
    return found
