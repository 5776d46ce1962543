"""Probes for signals that come before a collapse: Adam's second-moment lag, the edge-of-stability
ratio, attention/output logit growth (GPT-2), and per-layer maxima that keep the layer's name.

Every value is a 0-d tensor (no `.item()`: no host sync); `Telemetry` reads them back in its one
batched copy. Columns that name a tensor hold its *index* in the instrumented parameter list (the
optimizer's trainable parameters, in order); `param_index(model, optimizer)` gives index → name,
and each probe keeps it as `index_names` once it has measured (the LM and RL workloads write it to
run.json as `telemetry_index`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from stabilitybench.telemetry.base import Probe, Value
from stabilitybench.telemetry.reductions import accumulation_dtype, tensor_norms
from stabilitybench.types import Phase, Schedule, StepContext

_EPS = 1e-12
_NAN = float("nan")


def param_index(model: torch.nn.Module | None, optimizer: torch.optim.Optimizer) -> list[str]:
    """Index → name of the trainable parameters, in the order Telemetry instruments them."""
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    return [names.get(id(p), f"param{i}") for i, p in enumerate(params)]


def _group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def _bias_correction(beta2: float, step: Any) -> float | torch.Tensor:
    """1 − β2^t; a Python float when the step count lives on the CPU (no device sync)."""
    if isinstance(step, torch.Tensor):
        if step.device.type == "cpu":
            return 1.0 - beta2 ** float(step)
        return 1.0 - torch.pow(beta2, step)
    return 1.0 - beta2 ** float(step)


def adam_second_moments(
    ctx: StepContext,
) -> list[tuple[int, torch.Tensor, torch.Tensor, float | torch.Tensor, float]] | None:
    """(index, gradient, v̂ = bias-corrected exp_avg_sq, its bias correction, eps) per tensor
    that has Adam state, from the optimizer's state before this step's update; None if no
    tensor has Adam state (not an Adam-family optimizer, or its first step)."""
    groups = _group_of(ctx.optimizer)
    out = []
    for i, p in enumerate(ctx.params):
        state = ctx.optimizer.state.get(p)
        if not state or "exp_avg_sq" not in state or p.grad is None:
            continue
        group = groups[id(p)]
        beta2 = float(group["betas"][1])
        correction = _bias_correction(beta2, state["step"])
        out.append((i, p.grad, state["exp_avg_sq"], correction, float(group["eps"])))
    return out or None


class AdamRms(Probe):
    """Adam's second-moment lag: per tensor, RMS over entries of g / (sqrt(v̂) + eps), max over
    tensors (Wortsman et al. 2023, StableAdamW's RMS_t).

    Read at PRE_STEP: g is the new gradient, v̂ the bias-corrected second moment *before* it is
    folded in (the optimizer state of the previous step). About 1 while v̂ tracks the gradients;
    it rises when the gradients outgrow the optimizer's estimate, which is when Adam's update is
    too large (StableAdamW clips the update by it). Columns: `adam_rms_max`, `adam_rms_argmax`
    (the tensor's index), `adam_rms_mean` (over tensors). NaN before the first update.
    Cost: one temporary per gradient (a foreach division), every measured step.
    """

    columns: ClassVar[Mapping[str, str | None]] = {
        "adam_rms_max": "log",
        "adam_rms_mean": "log",
        "adam_rms_argmax": None,
    }

    name = "adam_rms"

    def __init__(self, every: int | Schedule = 1) -> None:
        super().__init__(every)
        self.index_names: list[str] = []

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        if not self.index_names:
            self.index_names = list(ctx.param_names)
        moments = adam_second_moments(ctx)
        if moments is None:
            return {"adam_rms_max": _NAN, "adam_rms_argmax": _NAN, "adam_rms_mean": _NAN}
        index = torch.tensor([m[0] for m in moments], dtype=torch.float32)
        grads = [m[1] for m in moments]
        # denominators sqrt(v / c) + eps = sqrt(v) / sqrt(c) + eps, c the bias correction
        roots = torch._foreach_sqrt([m[2] for m in moments])
        scales = [
            1.0 / math.sqrt(m[3]) if isinstance(m[3], float) else m[3].rsqrt() for m in moments
        ]
        denom = [d * s for d, s in zip(roots, scales, strict=True)]
        torch._foreach_add_(denom, [m[4] for m in moments])
        ratio = torch._foreach_div(grads, denom)
        norms = tensor_norms(ratio)  # (n,)
        counts = torch.tensor([float(g.numel()) for g in grads], device=norms.device)
        rms = norms / counts.sqrt()
        best = rms.argmax()
        return {
            "adam_rms_max": rms.max(),
            "adam_rms_argmax": index.to(rms.device)[best],
            "adam_rms_mean": rms.mean(),
        }


class EdgeOfStability(Probe):
    """Edge-of-stability ratio from consecutive gradients: curvature along the last update,
    times the learning rate, over its stability limit. 1 is the edge; above it, the step is
    unstable along that direction.

    With Δθ = θ_t − θ_{t−1} (the last update) and g_t, g_{t−1} the gradients on both sides,
    the secant curvature along Δθ is λ = (g_t − g_{t−1})·Δθ / ‖Δθ‖_P², where ‖Δθ‖_P² = Δθᵀ P Δθ:
    - SGD (heavy-ball momentum μ, dampening d): P = I, limit (2 + 2μ) / ((1 − d) η); plain SGD
      2/η. `eos_ratio` = η λ (1 − d) / (2 + 2μ).
    - Adam/AdamW: P = diag(sqrt(v̂) + eps), the preconditioner of the last update (its state
      at this pre-step); λ is then the curvature of the preconditioned Hessian P⁻¹H along Δθ,
      whose stability limit is (2 + 2β1) / ((1 − β1) η) — 38/η for β1 = 0.9 (Cohen et al. 2022,
      "Adaptive gradient methods at the edge of stability"). `eos_ratio` = η λ (1 − β1)/(2 + 2β1).
    η is the first param group's LR on the last update (after any perturbation). Consecutive
    minibatch gradients differ by noise too, so the estimate is noisy; it is exact on a full-batch
    quadratic. AdamW's decoupled weight decay is part of Δθ. Columns: `eos_ratio`,
    `eos_curvature` (λ). Cost: two copies of the parameters (previous gradient and parameters).
    """

    columns: ClassVar[Mapping[str, str | None]] = {
        "eos_ratio": "signed_log",
        "eos_curvature": "signed_log",
    }

    name = "eos"

    def __init__(self, every: int | Schedule = 1) -> None:
        super().__init__(every)
        self._prev_grads: list[torch.Tensor] | None = None
        self._prev_params: list[torch.Tensor] | None = None
        self._prev_lr: float | None = None

    def tracks(self, step: int) -> bool:
        return self.wants(step) or self.wants(step + 1)

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        params = list(ctx.params)
        grads = ctx.grads()
        group = ctx.optimizer.param_groups[0]
        out: dict[str, Value] = {"eos_ratio": _NAN, "eos_curvature": _NAN}
        prev_g, prev_p, lr = self._prev_grads, self._prev_params, self._prev_lr
        if (
            prev_g is not None
            and prev_p is not None
            and lr is not None
            and len(prev_g) == len(grads)
        ):
            delta = torch._foreach_sub(params, prev_p)  # Δθ per tensor
            dgrad = torch._foreach_sub(grads, prev_g)
            acc = accumulation_dtype(params[0].device)  # per-tensor sums added in it
            numerator = (
                torch.stack([torch.sum(a * b) for a, b in zip(dgrad, delta, strict=True)])
                .to(acc)
                .sum()
            )
            if "betas" in group:
                moments = {m[0]: m for m in adam_second_moments(ctx) or []}
                weights = []
                for i, d in enumerate(delta):
                    if i in moments:
                        _, _, v, c, eps = moments[i]
                        weights.append(torch.sum(d * d * ((v / c).sqrt() + eps)))
                    else:
                        weights.append(torch.sum(d * d) * 0.0)  # no state yet: no metric
                denominator = torch.stack(weights).to(acc).sum()
                beta1 = float(group["betas"][0])
                limit = (2.0 + 2.0 * beta1) / (1.0 - beta1)
            else:
                denominator = torch.stack([torch.sum(d * d) for d in delta]).to(acc).sum()
                momentum = float(group.get("momentum", 0.0) or 0.0)
                dampening = float(group.get("dampening", 0.0) or 0.0)
                limit = (2.0 + 2.0 * momentum) / max(1.0 - dampening, _EPS)
            curvature = numerator / (denominator + _EPS)
            out = {"eos_ratio": lr * curvature / limit, "eos_curvature": curvature}
        if self.tracks(ctx.step + 1):
            if self._prev_grads is None or len(self._prev_grads) != len(grads):
                self._prev_grads = [torch.empty_like(g) for g in grads]
                self._prev_params = [torch.empty_like(p) for p in params]
            assert self._prev_params is not None
            torch._foreach_copy_(self._prev_grads, grads)  # a copy of every gradient
            torch._foreach_copy_(self._prev_params, params)  # and of every parameter
            self._prev_lr = float(group["lr"])
        else:
            self._prev_grads = self._prev_params = None
            self._prev_lr = None
        return out


class LayerMaxima(Probe):
    """The largest per-tensor update ratio ‖Δθ_i‖/‖θ_i‖ and gradient norm ‖g_i‖, with the index of
    the tensor that holds each (so the report can say *where* a deviation starts).

    Columns: `update_ratio_layer_max`, `update_ratio_layer_argmax`, `grad_norm_layer_max`,
    `grad_norm_layer_argmax`. Cost: one copy of the parameters per measured step (fused).
    """

    columns: ClassVar[Mapping[str, str | None]] = {
        "update_ratio_layer_max": "log",
        "update_ratio_layer_argmax": None,
        "grad_norm_layer_max": "log",
        "grad_norm_layer_argmax": None,
    }

    name = "layer_max"
    phase = Phase.POST_STEP

    def __init__(self, every: int | Schedule = 1) -> None:
        super().__init__(every)
        self.index_names: list[str] = []
        self._before: list[torch.Tensor] | None = None
        self._grad_norms: torch.Tensor | None = None

    def before_step(self, ctx: StepContext) -> None:
        params = list(ctx.params)
        if self._before is None or len(self._before) != len(params):
            self._before = [torch.empty_like(p) for p in params]
        torch._foreach_copy_(self._before, params)  # a copy of every parameter
        self._grad_norms = ctx.grad_norms()  # shared with the grad_norm probe (cached)

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        if self._before is None or self._grad_norms is None:
            return {}
        if not self.index_names:
            self.index_names = list(ctx.param_names)
        params = list(ctx.params)
        before_norms = tensor_norms(self._before)  # (n,)
        torch._foreach_sub_(self._before, params)  # now −Δθ per tensor
        update_norms = tensor_norms(self._before)
        # A tensor whose norm was 0 (a zero-initialised bias) has no ratio: it counts as 0.
        ratios = torch.where(
            before_norms > 0, update_norms / before_norms.clamp_min(_EPS), 0.0
        )  # (n,)
        grad_norms, self._grad_norms = self._grad_norms, None
        return {
            "update_ratio_layer_max": ratios.max(),
            "update_ratio_layer_argmax": ratios.argmax().float(),
            "grad_norm_layer_max": grad_norms.max(),
            "grad_norm_layer_argmax": grad_norms.argmax().float(),
        }


class AttentionLogits(Probe):
    """GPT-2: the largest attention logit q·k/√d per layer (causal positions only) and the largest
    |output logit|, from the training forward pass of each measured step (Wortsman et al. 2023:
    attention-logit growth precedes divergence without qk-layernorm).

    Forward hooks on each block's `attn.c_attn` (after a qk-layernorm, if the model has one) and on
    `lm_head` are installed on the first tracked step; they compute only on the forward passes of
    the steps this probe measures and only with gradients enabled (not in evaluation). The first
    measured step therefore has no values. Columns: `attn_logit_max` (max over layers),
    `attn_logit_max/<i>` per layer i, `out_logit_max`. Cost on a measured step: one more
    (B, H, T, T) score product per layer, no extra backward. Call `close()` to remove the hooks.
    A model without GPT-2 attention modules gives no columns.
    """

    columns: ClassVar[Mapping[str, str | None]] = {
        "attn_logit_max": "signed_log",
        "out_logit_max": "log",
    }

    name = "attn_logits"

    def __init__(self, every: int | Schedule = 10) -> None:
        super().__init__(every)
        self._handles: list[Any] = []
        self._installed = False
        self._armed = False
        self._attn: dict[int, torch.Tensor] = {}
        self._out: torch.Tensor | None = None

    def tracks(self, step: int) -> bool:
        return self.wants(step) or self.wants(step + 1)

    def close(self) -> None:
        """Remove the forward hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _install(self, model: torch.nn.Module) -> None:
        from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

        self._installed = True
        layers = [m for m in model.modules() if isinstance(m, GPT2Attention)]
        for i, attn in enumerate(layers):
            self._handles.append(
                attn.c_attn.register_forward_hook(
                    lambda _m, _x, output, i=i, attn=attn: self._on_qkv(i, attn, output)
                )
            )
        head = getattr(model, "lm_head", None)
        if layers and isinstance(head, torch.nn.Module):
            self._handles.append(head.register_forward_hook(self._on_logits))

    def _record(self) -> bool:
        return self._armed and torch.is_grad_enabled()

    def _on_qkv(self, layer: int, attn: Any, output: torch.Tensor) -> None:
        if self._record():  # checked outside no_grad: evaluation passes run without gradients
            with torch.no_grad():
                self._attention_max(layer, attn, output)

    def _attention_max(self, layer: int, attn: Any, output: torch.Tensor) -> None:
        q, k, _ = output.detach().split(attn.split_size, dim=2)  # each (B, T, C)
        batch, length = q.shape[0], q.shape[1]
        q = q.reshape(batch, length, -1, attn.head_dim).transpose(1, 2)  # (B, H, T, d)
        k = k.reshape(batch, length, -1, attn.head_dim).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) * attn.scaling  # (B, H, T, T): the extra product
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        top = scores.float().masked_fill(~causal, -math.inf).amax()
        prev = self._attn.get(layer)
        self._attn[layer] = top if prev is None else torch.maximum(prev, top)

    def _on_logits(self, _module: Any, _inputs: Any, output: torch.Tensor) -> None:
        if not self._record():
            return
        top = output.detach().float().abs().amax()  # (B, T, V) → 0-d
        self._out = top if self._out is None else torch.maximum(self._out, top)

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        if not self._installed and ctx.model is not None:
            self._install(ctx.model)
        out: dict[str, Value] = {}
        if self._attn:
            values = [self._attn[i] for i in sorted(self._attn)]
            out["attn_logit_max"] = torch.stack(values).max()
            for i in sorted(self._attn):
                out[f"attn_logit_max/{i}"] = self._attn[i]
        if self._out is not None:
            out["out_logit_max"] = self._out
        self._attn, self._out = {}, None
        self._armed = self.wants(ctx.step + 1)  # record the next step's forward pass if measured
        return out


STABILITY: tuple[str, ...] = ("adam_rms", "eos", "layer_max", "attn_logits")
"""The build-up probes, by name (opt-in: the `stability` preset is `cheap` plus these)."""


def build_stability_probe(
    name: str, every: int | Schedule, scheduled_every: int | Schedule
) -> Probe:
    """A build-up probe by name; `attn_logits` runs on the scheduled cadence (default 10 steps
    in the preset), the others every step."""
    if name == "adam_rms":
        return AdamRms(every)
    if name == "eos":
        return EdgeOfStability(every)
    if name == "layer_max":
        return LayerMaxima(every)
    if name == "attn_logits":
        return AttentionLogits(scheduled_every)
    raise KeyError(name)


def index_names(probes: list[Probe]) -> dict[str, list[str]]:
    """What the index columns of these probes mean: probe name → tensor names (for run.json)."""
    out: dict[str, list[str]] = {}
    for probe in probes:
        names = getattr(probe, "index_names", None)
        if names:
            out[probe.name] = list(names)
    return out


def close_probes(probes: list[Probe]) -> None:
    """Remove what probes installed on the model (the attention-logit forward hooks)."""
    for probe in probes:
        close = getattr(probe, "close", None)
        if callable(close):
            close()
