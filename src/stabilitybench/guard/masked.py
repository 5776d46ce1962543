"""Optimizer updates with a decision folded in: torch's SGD, Adam and AdamW as multi-tensor
(`torch._foreach_*`) steps that take the decision as two device tensors and never read them.

`masked_step(optimizer, keep, scale)`: `keep` (0-d bool) False leaves every moment, step count
and parameter as it was — the gradient is replaced by zeros first, so a non-finite one cannot
leak in; `scale` (0-d float) multiplies the update (an LR cut; 0 with `keep` False). With keep
True and scale 1 it is torch's own update, to float rounding. It returns, per parameter group,
the norm of the update's direction (the update divided by lr × scale: Adam's m̂/(√v̂+ε), SGD's
momentum step), from which the next step's update at its own LR is estimated before it is made
(`update_estimate`), with no second pass over the parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

MASKED = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def unsupported_reason(optimizer: torch.optim.Optimizer) -> str | None:
    """Why `optimizer` has no masked step (None when it has one)."""
    kind = type(optimizer)
    if kind not in MASKED:
        return (
            f"{kind.__name__} has no masked step (the device guard has them for torch's SGD, "
            "Adam and AdamW)"
        )
    for group in optimizer.param_groups:
        for flag in ("amsgrad", "maximize", "differentiable"):
            if group.get(flag):
                return f"{kind.__name__} with {flag}=True has no masked step"
    return None


@torch.no_grad()
def masked_step(
    optimizer: torch.optim.Optimizer, keep: torch.Tensor, scale: torch.Tensor
) -> list[torch.Tensor]:
    """One update of `optimizer` with the decision folded in, no host sync; per parameter group,
    the norm of this update's direction (0-d, float64; 0 for a group with no gradient)."""
    sgd = isinstance(optimizer, torch.optim.SGD)
    out = []
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            out.append(torch.zeros((), dtype=torch.float64))
            continue
        step = _sgd_group if sgd else _adam_group
        out.append(step(optimizer, group, params, keep, scale))
    return out


@torch.no_grad()
def update_estimate(
    optimizer: torch.optim.Optimizer, directions: Sequence[torch.Tensor], params_norm: torch.Tensor
) -> torch.Tensor:
    """‖Δθ‖/‖θ‖ of the update about to be made, estimated as each group's LR now times the norm
    of its last kept update's direction (`masked_step`'s return): an LR spike shows in full
    before it is applied; a spike in the gradient shows in the gradient norm instead."""
    squares = [
        (float(group["lr"]) * direction.double()).square()
        for group, direction in zip(optimizer.param_groups, directions, strict=True)
    ]
    return torch.stack(squares).sum().sqrt() / (params_norm.double() + 1e-12)


@torch.no_grad()
def params_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖θ‖ over `params` (0-d, float64; one multi-tensor pass)."""
    norms = torch._foreach_norm(list(params))
    return torch.linalg.vector_norm(torch.stack(norms).double())


def _masked_grads(
    params: list[torch.Tensor], keep: torch.Tensor, weight_decay: float
) -> list[torch.Tensor]:
    grads: Sequence[torch.Tensor] = [p.grad for p in params if p.grad is not None]
    if weight_decay:
        grads = torch._foreach_add(list(grads), params, alpha=weight_decay)
    return [torch.where(keep, g, g.new_zeros(())) for g in grads]


def _direction_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors))).double())


def _sgd_group(
    optimizer: torch.optim.Optimizer,
    group: dict[str, Any],
    params: list[torch.Tensor],
    keep: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    lr, momentum = group["lr"], group["momentum"]
    dampening, nesterov = group["dampening"], group["nesterov"]
    grads = _masked_grads(params, keep, group["weight_decay"])
    steps: Sequence[torch.Tensor] = grads
    if momentum:
        bufs: list[torch.Tensor | None] = []
        for p, g in zip(params, grads, strict=True):
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:  # torch starts it at the first gradient
                state["momentum_buffer"] = g.detach().clone()
                bufs.append(None)
            else:
                bufs.append(state["momentum_buffer"])
        old = [b for b in bufs if b is not None]
        if old:
            one = torch.ones((), dtype=old[0].dtype, device=old[0].device)
            torch._foreach_mul_(old, torch.where(keep, momentum * one, one))
            torch._foreach_add_(
                old,
                [g for g, b in zip(grads, bufs, strict=True) if b is not None],
                alpha=1 - dampening,
            )
        current = [optimizer.state[p]["momentum_buffer"] for p in params]
        steps = torch._foreach_add(grads, current, alpha=momentum) if nesterov else current
    direction = _direction_norm(steps)
    torch._foreach_add_(params, torch._foreach_mul(list(steps), (-lr * scale).to(params[0].dtype)))
    return direction


def _adam_group(
    optimizer: torch.optim.Optimizer,
    group: dict[str, Any],
    params: list[torch.Tensor],
    keep: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    lr, (beta1, beta2) = group["lr"], group["betas"]
    eps, weight_decay = group["eps"], group["weight_decay"]
    decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
    dtype = params[0].dtype
    for p in params:
        state = optimizer.state[p]
        if not state:  # as torch's lazy initialisation (the step on the parameter's device)
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif state["step"].device != p.device:
            state["step"] = state["step"].to(p.device)
    states = [optimizer.state[p] for p in params]
    steps = [s["step"] for s in states]
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    grads = _masked_grads(params, keep, 0.0 if decoupled else weight_decay)
    kept = keep.to(dtype)
    if decoupled and weight_decay:
        torch._foreach_mul_(params, 1 - (lr * weight_decay) * scale.to(dtype))
    torch._foreach_add_(steps, kept.to(steps[0].dtype))
    torch._foreach_lerp_(exp_avgs, grads, [kept * (1 - beta1)] * len(params))
    torch._foreach_mul_(exp_avg_sqs, 1 - kept * (1 - beta2))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    t = torch.stack(steps).double().clamp_min(1)  # a skip at the very first step has no bias
    bias1 = list((1 - torch.pow(beta1, t)).to(dtype).unbind())
    bias2_sqrt = list((1 - torch.pow(beta2, t)).sqrt().to(dtype).unbind())
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias2_sqrt)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(exp_avgs, denom)
    torch._foreach_div_(update, bias1)  # m̂ / (√v̂ + ε): the direction
    direction = _direction_norm(update)
    torch._foreach_mul_(update, (-lr * scale).to(dtype))
    torch._foreach_add_(params, update)
    return direction
