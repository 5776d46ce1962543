"""Optimization perturbations: learning-rate spikes, momentum shocks, optimizer resets."""

from __future__ import annotations

from typing import Any, ClassVar

from stabilitybench.perturbations.base import Param, Perturbation, register
from stabilitybench.types import StepContext


@register
class LrSpike(Perturbation):
    """Multiply every param group's LR by `factor` for `duration` optimizer steps.

    The LR is multiplied before each step of the window and the exact pre-spike value is put back
    right after it, so an LR scheduler (which reads `group["lr"]` after `optimizer.step()`) goes on
    as if nothing had happened.
    """

    name = "lr_spike"
    magnitude_field = "factor"  # the parameter that is its size
    dimension = "optimization"
    params: ClassVar[dict[str, Param]] = {"factor": Param(float, low=0.0, low_open=True)}
    models = "a mis-set LR schedule, warm-up restart or LR finder gone wrong"
    ramp_field = "factor"
    sets_columns = ("lr",)  # the LR probe records the multiplied LR

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._saved: dict[int, list[Any]] = {}

    def pre_step(self, ctx: StepContext) -> None:
        groups = ctx.optimizer.param_groups
        self._saved[id(ctx.optimizer)] = [g["lr"] for g in groups]
        factor = self.magnitude(ctx.step)
        for group in groups:
            group["lr"] = group["lr"] * factor

    def post_step(self, ctx: StepContext) -> None:
        saved = self._saved.pop(id(ctx.optimizer), None)
        if saved is not None:
            for group, lr in zip(ctx.optimizer.param_groups, saved, strict=True):
                group["lr"] = lr


@register
class MomentumShock(Perturbation):
    """Set Adam's beta1 (or SGD's momentum) to `value` for `duration` optimizer steps."""

    name = "momentum_shock"
    magnitude_field = "value"  # the parameter that is its size
    dimension = "optimization"
    params: ClassVar[dict[str, Param]] = {"value": Param(float, low=0.0, high=1.0, high_open=True)}
    models = "a wrong beta1 / momentum setting, or a momentum restart"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._saved: dict[int, list[tuple[str, Any]]] = {}

    def pre_step(self, ctx: StepContext) -> None:
        saved: list[tuple[str, Any]] = []
        value = self.values["value"]
        for group in ctx.optimizer.param_groups:
            if "betas" in group:
                saved.append(("betas", group["betas"]))
                group["betas"] = (value, group["betas"][1])
            elif "momentum" in group:
                saved.append(("momentum", group["momentum"]))
                group["momentum"] = value
            else:
                saved.append(("", None))
        self._saved[id(ctx.optimizer)] = saved

    def post_step(self, ctx: StepContext) -> None:
        saved = self._saved.pop(id(ctx.optimizer), None)
        if saved is None:
            return
        for group, (key, value) in zip(ctx.optimizer.param_groups, saved, strict=True):
            if key:
                group[key] = value


@register
class OptimizerReset(Perturbation):
    """Clear the optimizer's state (moments, step counts) once, just before its step."""

    name = "optimizer_reset"
    dimension = "optimization"
    one_shot = True
    models = "resuming from a checkpoint without optimizer state"

    def apply(self, ctx: StepContext) -> None:
        ctx.optimizer.state.clear()
