"""Learning-signal perturbations: noise, scaling and dropout of gradients; loss scaling; reward sign."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from stabilitybench.perturbations.base import Param, Perturbation, register
from stabilitybench.types import StepContext

if TYPE_CHECKING:
    import torch


def _grads(ctx: StepContext) -> list[torch.Tensor]:
    return [p.grad for p in ctx.params if p.grad is not None]


@register
class GradNoise(Perturbation):
    """Add Gaussian noise whose norm is `scale` × the gradient norm, after backward, before step."""

    name = "grad_noise"
    magnitude_field = "scale"  # the parameter that is its size
    dimension = "signal"
    params: ClassVar[dict[str, Param]] = {"scale": Param(float, low=0.0, low_open=True)}
    models = "noisy or corrupted gradients (tiny batches, faulty all-reduce)"
    ramp_field = "scale"
    ramp_mode = "additive"

    def pre_step(self, ctx: StepContext) -> None:
        import torch

        grads = _grads(ctx)
        if not grads:
            return
        grad_norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))
        # Drawn on the CPU from the perturbation's own generator (a copy per gradient on GPU).
        noise = [torch.randn(g.shape, generator=self.generator, dtype=torch.float32) for g in grads]
        noise_norm = torch.linalg.vector_norm(torch.stack([n.norm() for n in noise]))
        factor = self.magnitude(ctx.step) * grad_norm.cpu() / noise_norm.clamp_min(1e-30)
        for g, n in zip(grads, noise, strict=True):
            g.add_((n * factor).to(device=g.device, dtype=g.dtype))


@register
class GradScale(Perturbation):
    """Multiply the gradients by `factor` just before the step (after any gradient clipping)."""

    name = "grad_scale"
    magnitude_field = "factor"  # the parameter that is its size
    dimension = "signal"
    params: ClassVar[dict[str, Param]] = {"factor": Param(float, low=0.0, low_open=True)}
    models = "a wrong gradient-accumulation divisor or a loss-scaler bug, after clipping"
    ramp_field = "factor"

    def pre_step(self, ctx: StepContext) -> None:
        factor = self.magnitude(ctx.step)
        for g in _grads(ctx):
            g.mul_(factor)


@register
class GradDrop(Perturbation):
    """Zero a random `fraction` of the gradient entries."""

    name = "grad_drop"
    magnitude_field = "fraction"  # the parameter that is its size
    dimension = "signal"
    params: ClassVar[dict[str, Param]] = {
        "fraction": Param(float, low=0.0, high=1.0, low_open=True)
    }
    models = "lost or stale gradient shards (dropped workers, sparse communication)"
    ramp_field = "fraction"
    ramp_mode = "additive"

    def pre_step(self, ctx: StepContext) -> None:
        import torch

        fraction = self.magnitude(ctx.step)
        for g in _grads(ctx):
            drop = torch.rand(g.shape, generator=self.generator) < fraction
            g.masked_fill_(drop.to(g.device), 0.0)


@register
class LossScale(Perturbation):
    """Scale the loss by `factor`: every gradient is multiplied as it is computed in backward.

    Implemented with tensor hooks on the parameters (`param.register_hook`), installed at the
    post-step of the step before the window (at attach time for a window that starts at the next
    step), so that gradient clipping between backward and `optimizer.step()` sees the scaled
    gradients, exactly as if the loss had been multiplied. If the onset could not be known one step
    ahead (an RL onset given as a fraction of env steps), the first step of the window scales the
    finished gradients instead.
    """

    name = "loss_scale"
    magnitude_field = "factor"  # the parameter that is its size
    dimension = "signal"
    params: ClassVar[dict[str, Param]] = {"factor": Param(float, low=0.0, low_open=True)}
    models = "a loss-weight or reduction bug (sum instead of mean), a mixed-precision scaler error"
    ramp_field = "factor"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._handles: dict[int, list[Any]] = {}

    def _install(self, key: int, params: list[torch.Tensor]) -> None:
        if key in self._handles:
            return
        # The factor is read when backward runs: the step being computed is the one after the
        # last step begun (a ramp grows it step by step; without a ramp it is the constant).
        self._handles[key] = [
            p.register_hook(lambda g: g * self._backward_factor()) for p in params
        ]

    def _backward_factor(self) -> float:
        step = self._onset_step if self._last_step is None else self._last_step + 1
        return self.magnitude(step)

    def _remove(self, key: int) -> None:
        for handle in self._handles.pop(key, []):
            handle.remove()

    def on_attach(self, telemetry: Any) -> None:
        if self.would_cover(telemetry.step + 1):
            for opt in telemetry.optimizers.values():
                params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
                self._install(id(opt), params)

    def watch_post(self, ctx: StepContext) -> None:
        if self.start_step is None and self.would_cover(ctx.step + 1):
            self._install(id(ctx.optimizer), list(ctx.params))

    def pre_step(self, ctx: StepContext) -> None:
        key = id(ctx.optimizer)
        if key not in self._handles:
            factor = self.magnitude(ctx.step)
            for g in _grads(ctx):
                g.mul_(factor)
            self._install(key, list(ctx.params))

    def post_step(self, ctx: StepContext) -> None:
        if ctx.step == self.end_step:
            self._remove(id(ctx.optimizer))


@register
class RewardSignFlip(Perturbation):
    """Flip the sign of the environment reward (RL) inside the window."""

    name = "reward_sign_flip"
    dimension = "signal"
    adapter = "env"
    scope = "env"
    models = "a reward-specification bug (a sign error in a reward term)"

    def perturb_reward(self, reward: float, reward_rms: float) -> float:
        return -reward
