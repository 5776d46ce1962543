"""Built-in probes: the cheap every-step set and the scheduled "full" extras."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import ClassVar

import torch

from stabilitybench.errors import StabilityBenchError
from stabilitybench.telemetry.base import Probe, Value
from stabilitybench.telemetry.reductions import norm, row_dots, tensor_norms
from stabilitybench.telemetry.stability_probes import STABILITY, build_stability_probe
from stabilitybench.types import PARAM_NORM, Phase, Schedule, StepContext

_EPS = 1e-12

LossClosure = Callable[[], torch.Tensor]
MicroBatches = Callable[[], Iterable[torch.Tensor]]


class GradNorm(Probe):
    """Global and largest per-tensor gradient norm, and the count of non-finite gradient entries."""

    name = "grad_norm"
    columns: ClassVar[Mapping[str, str | None]] = {
        "grad_norm": "log",
        "grad_norm_max_layer": "log",
        "nonfinite_grads": None,
    }

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        per_tensor = ctx.grad_norms()  # (n_params,)
        return {
            "grad_norm": ctx.grad_norm(),
            "grad_norm_max_layer": per_tensor.max(),
            "nonfinite_grads": ctx.nonfinite_grad_count(),  # read back as an int at flush
        }


class GradCoherence(Probe):
    """Cosine of this step's gradient with the previous step's and with an EMA of past gradients.

    State: one (2, P) buffer holding the previous flat gradient and the EMA (two copies of the
    gradient), so both dot products are one pass; ‖previous‖ is the previous step's gradient norm.
    Dot products and norms are accumulated in float64 (telemetry/reductions.py). A non-finite
    gradient is not folded into either and gives NaN cosines; all of it is decided on the device
    (no host sync).
    """

    name = "grad_coherence"
    columns: ClassVar[Mapping[str, str | None]] = {
        "grad_cos_prev": "identity",
        "grad_cos_ema": "identity",
    }

    def __init__(self, every: int | Schedule = 1, ema_decay: float = 0.9) -> None:
        super().__init__(every)
        self.ema_decay = ema_decay
        self._state: torch.Tensor | None = None  # (2, P): [previous gradient, EMA]
        self._valid: torch.Tensor | None = None  # 0-d bool: the state holds a finite gradient
        self._prev_norm: torch.Tensor | None = None  # 0-d: ‖previous gradient‖
        self._nan: torch.Tensor | None = None

    def tracks(self, step: int) -> bool:
        return self.wants(step) or self.wants(step + 1)

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        g = ctx.grad_flat()  # (P,)
        finite = ctx.grad_finite()  # 0-d bool, on the device
        g_norm = ctx.grad_norm()  # 0-d, float64
        state, valid, prev_norm = self._state, self._valid, self._prev_norm
        if state is None or valid is None or prev_norm is None or state.shape[1] != g.shape[0]:
            start = torch.where(finite, g, 0.0)
            self._state = torch.stack([start, start])
            self._valid = finite.clone()
            self._prev_norm = torch.where(finite, g_norm, 0.0)
            self._nan = torch.full((2,), float("nan"), dtype=g_norm.dtype, device=g.device)
            nan = float("nan")
            return {"grad_cos_prev": nan, "grad_cos_ema": nan}
        assert self._nan is not None
        dots = row_dots(state, g)  # (2,): g·prev, g·ema
        norms = torch.stack([prev_norm, norm(state[1])])  # (2,): ‖prev‖, ‖ema‖
        cos = dots / (norms * g_norm + _EPS)
        cos = torch.where(finite & valid, cos, self._nan)
        # Fold g in only when finite: then prev ← g, ema ← lerp(ema, g); otherwise unchanged.
        torch.where(finite, g, state[0], out=state[0])
        state[1].lerp_(state[0], finite * (1.0 - self.ema_decay))
        torch.where(finite, g_norm, prev_norm, out=prev_norm)
        valid.logical_or_(finite)
        return {"grad_cos_prev": cos[0], "grad_cos_ema": cos[1]}


class UpdateNorm(Probe):
    """‖Δθ‖ of the optimizer step, ‖θ‖ after it, and their ratio ‖Δθ‖/‖θ_before‖.

    Keeps one flat copy of the parameters before and after the step (a (2, P) buffer refreshed on
    each measured step), so the three norms cost a handful of ops whatever the number of
    parameter tensors; they are accumulated in float64 (telemetry/reductions.py). Parameters
    spread over several devices or dtypes use per-tensor buffers.
    """

    name = "update_norm"
    columns: ClassVar[Mapping[str, str | None]] = {
        "update_norm": "log",
        "update_ratio": "log",
        "param_norm": "log",
    }
    phase = Phase.POST_STEP

    def __init__(self, every: int | Schedule = 1) -> None:
        super().__init__(every)
        self._flat: torch.Tensor | None = None  # (2, P): [θ before, θ after]
        self._buffers: list[torch.Tensor] | None = None  # per tensor, when not flat
        self._before_norm: torch.Tensor | None = None
        self._params: Sequence[torch.Tensor] | None = None
        self._count = 0
        self._uniform = True
        self._views: list[torch.Tensor] = []
        self._pointers: tuple[int, ...] = ()

    def before_step(self, ctx: StepContext) -> None:
        params = ctx.params  # hooks run under no_grad: no detach needed
        if params is not self._params or len(params) != self._count:  # (re)allocate once
            self._params, self._count = params, len(params)
            self._pointers = ()
            first = params[0]
            self._uniform = all(
                p.device == first.device and p.dtype == first.dtype and p.is_contiguous()
                for p in params
            )
            total = sum(p.numel() for p in params)
            self._flat = (
                torch.empty(2, total, dtype=first.dtype, device=first.device)
                if self._uniform
                else None
            )
            self._buffers = None if self._uniform else [torch.empty_like(p) for p in params]
        if self._flat is not None:
            # Flat views of the live parameters (contiguous: the step updates them in place),
            # kept while no parameter's storage is replaced.
            pointers = tuple(p.data_ptr() for p in params)
            if pointers != self._pointers:
                self._views = [p.view(-1) for p in params]
                self._pointers = pointers
            torch.cat(self._views, out=self._flat[0])  # a copy of every parameter
            self._before_norm = norm(self._flat[0])
        else:
            assert self._buffers is not None
            torch._foreach_copy_(self._buffers, list(params))  # a copy of every parameter
            self._before_norm = torch.linalg.vector_norm(tensor_norms(self._buffers))
        before = self._before_norm
        ctx.cached(PARAM_NORM, lambda: before)  # shared with the device guard

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        before_norm, self._before_norm = self._before_norm, None
        if before_norm is None:
            return {}
        if self._flat is not None:
            flat = self._flat
            torch.cat(self._views, out=flat[1])  # θ after
            flat[0].sub_(flat[1])  # now −Δθ
            norms = norm(flat)  # (2,): ‖Δθ‖, ‖θ after‖
            update, param_norm = norms[0], norms[1]
        else:
            assert self._buffers is not None
            params = list(ctx.params)
            torch._foreach_sub_(self._buffers, params)  # buffers now hold −Δθ
            norms = tensor_norms(self._buffers + params)
            update, param_norm = torch.linalg.vector_norm(norms.view(2, -1), dim=1)
        return {
            "update_norm": update,
            "update_ratio": update / (before_norm + _EPS),
            "param_norm": param_norm,
        }


class LearningRate(Probe):
    """The learning rate the optimizer uses on this step (after any perturbation)."""

    name = "lr"
    columns: ClassVar[Mapping[str, str | None]] = {"lr": "log"}
    controls: ClassVar[frozenset[str]] = frozenset({"lr"})  # set by the schedule and lr knobs

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        groups = ctx.optimizer.param_groups
        out: dict[str, Value] = {"lr": _lr(groups[0]["lr"])}
        if len(groups) > 1:
            for i, group in enumerate(groups[1:], start=1):
                out[f"lr/group{i}"] = _lr(group["lr"])
        return out


def _lr(value: float | torch.Tensor) -> Value:
    """A tensor learning rate (capturable optimizers) stays on its device: no host sync."""
    return value.detach() if isinstance(value, torch.Tensor) else float(value)


class LayerNorms(Probe):
    """Per-parameter gradient norms (`grad_norm/<name>`) and update norms (`update_norm/<name>`)."""

    name = "layer_norms"
    phase = Phase.POST_STEP

    def __init__(self, every: int | Schedule = 1) -> None:
        super().__init__(every)
        self._grad_norms: torch.Tensor | None = None  # (n_params,)
        self._before: list[torch.Tensor] | None = None

    def before_step(self, ctx: StepContext) -> None:
        self._grad_norms = ctx.grad_norms()  # shared with the grad_norm probe (cached)
        self._before = [p.detach().clone() for p in ctx.params]  # a copy of every parameter

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        if self._before is None or self._grad_norms is None:
            return {}
        deltas = torch._foreach_sub([p.detach() for p in ctx.params], self._before)
        update_norms = tensor_norms(deltas)
        out: dict[str, Value] = {}
        for name, g, u in zip(ctx.param_names, self._grad_norms, update_norms, strict=True):
            out[f"grad_norm/{name}"] = g
            out[f"update_norm/{name}"] = u
        self._before, self._grad_norms = None, None
        return out


def _rng_devices(params: Iterable[torch.Tensor]) -> list[int]:
    return sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})


class Sharpness(Probe):
    """Top Hessian eigenvalue of the loss on a probe batch, by Hessian-vector-product power iteration.

    `closure()` returns the probe-batch loss as a differentiable tensor. Costs about
    `iters` double-backward passes; runs under a forked RNG so training is not disturbed.
    """

    name = "sharpness"
    columns: ClassVar[Mapping[str, str | None]] = {"sharpness": None}
    phase = Phase.POST_STEP

    def __init__(
        self,
        closure: LossClosure | None,
        every: int | Schedule = 50,
        iters: int = 20,
        tol: float = 1e-4,
        seed: int = 0,
    ) -> None:
        if closure is None:
            raise StabilityBenchError(
                "probe 'sharpness' needs a probe batch: pass closure=<function returning the loss> "
                "to Telemetry (or Sharpness(closure=...))"
            )
        super().__init__(every)
        self.closure, self.iters, self.tol, self.seed = closure, iters, tol, seed

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        params = list(ctx.params)
        with torch.random.fork_rng(devices=_rng_devices(params)), torch.enable_grad():
            loss = self.closure()
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            # A gradient that does not depend on the parameters has zero Hessian rows (and, by
            # symmetry, columns): dropping those parameters leaves the eigenvalues unchanged.
            pairs = [
                (p, g)
                for p, g in zip(params, grads, strict=True)
                if g is not None and g.requires_grad
            ]
            if not pairs:
                return {"sharpness": torch.tensor(0.0)}
            ps, gs = [p for p, _ in pairs], [g for _, g in pairs]
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            v = [torch.randn(p.shape, generator=gen).to(p) for p in ps]
            v_norm = torch.sqrt(sum((x * x).sum() for x in v))  # type: ignore[arg-type]
            v = [x / v_norm for x in v]
            eig = torch.tensor(0.0)
            for i in range(self.iters):
                hv_raw = torch.autograd.grad(
                    gs, ps, grad_outputs=v, retain_graph=True, allow_unused=True
                )
                hv = [
                    h if h is not None else torch.zeros_like(p)
                    for h, p in zip(hv_raw, ps, strict=True)
                ]
                new_eig = sum((h * x).sum() for h, x in zip(hv, v, strict=True))
                hv_norm = torch.sqrt(sum((h * h).sum() for h in hv))  # type: ignore[arg-type]
                v = [h / (hv_norm + _EPS) for h in hv]
                converged = i > 0 and abs(float(new_eig) - float(eig)) <= self.tol * abs(
                    float(new_eig)
                )
                eig = torch.as_tensor(new_eig).detach()
                if converged:
                    break
        return {"sharpness": eig}


def micro_batch_grads(ctx: StepContext, micro_batches: MicroBatches) -> list[torch.Tensor]:
    """Flat gradient of each micro-batch loss, computed once per step and shared by probes."""

    def compute() -> list[torch.Tensor]:
        params = list(ctx.params)
        out = []
        with torch.random.fork_rng(devices=_rng_devices(params)), torch.enable_grad():
            for loss in micro_batches():
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                out.append(
                    torch.cat(
                        [
                            (g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                            for g, p in zip(grads, params, strict=True)
                        ]
                    )
                )
        if len(out) < 2:
            raise StabilityBenchError(
                f"micro_batches must yield at least 2 micro-batch losses, got {len(out)}"
            )
        return out

    grads: list[torch.Tensor] = ctx.cached("micro_batch_grads", compute)
    return grads


class MCoherence(Probe):
    """m-coherence (Chatterjee & Zielinski 2020) of k micro-batch gradients: k·‖mean g‖²/mean ‖g_i‖².

    About 1 when micro-batch gradients are orthogonal, k when they are identical.
    """

    name = "m_coherence"
    columns: ClassVar[Mapping[str, str | None]] = {"m_coherence": None}
    phase = Phase.POST_STEP

    def __init__(self, micro_batches: MicroBatches | None, every: int | Schedule = 50) -> None:
        if micro_batches is None:
            raise StabilityBenchError(
                "probe 'm_coherence' needs micro_batches=<function yielding k micro-batch losses>"
            )
        super().__init__(every)
        self.micro_batches = micro_batches

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        g = torch.stack(micro_batch_grads(ctx, self.micro_batches))  # (k, P)
        k = g.shape[0]
        mean_sq = g.mean(dim=0).pow(2).sum()
        sq_mean = g.pow(2).sum(dim=1).mean()
        return {"m_coherence": k * mean_sq / (sq_mean + _EPS)}


class GradNoiseScale(Probe):
    """Simple gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018, appendix A).

    Unbiased estimates from k micro-batches of `micro_batch_size` examples: the small batch is one
    micro-batch (its squared norm averaged over the k), the big batch is their mean.
    """

    name = "grad_noise_scale"
    columns: ClassVar[Mapping[str, str | None]] = {"grad_noise_scale": None}
    phase = Phase.POST_STEP

    def __init__(
        self,
        micro_batches: MicroBatches | None,
        micro_batch_size: int | None,
        every: int | Schedule = 50,
    ) -> None:
        if micro_batches is None or not micro_batch_size or micro_batch_size < 1:
            raise StabilityBenchError(
                "probe 'grad_noise_scale' needs micro_batches=<function yielding k micro-batch "
                "losses> and micro_batch_size=<examples per micro-batch, >= 1>"
            )
        super().__init__(every)
        self.micro_batches, self.micro_batch_size = micro_batches, micro_batch_size

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        g = torch.stack(micro_batch_grads(ctx, self.micro_batches))  # (k, P)
        k, b_small = g.shape[0], float(self.micro_batch_size)
        b_big = k * b_small
        small_sq = g.pow(2).sum(dim=1).mean()
        big_sq = g.mean(dim=0).pow(2).sum()
        g_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
        trace_sigma = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
        return {"grad_noise_scale": trace_sigma / g_sq}


CHEAP: tuple[str, ...] = ("grad_norm", "grad_coherence", "update_norm", "lr")
FULL_EXTRAS: tuple[str, ...] = ("layer_norms", "sharpness", "m_coherence", "grad_noise_scale")
PRESETS: dict[str, tuple[str, ...]] = {
    "cheap": CHEAP,
    "full": CHEAP + FULL_EXTRAS,
    "stability": CHEAP + STABILITY,  # opt-in build-up signals (telemetry/stability_probes.py)
}
PROBE_NAMES: tuple[str, ...] = CHEAP + FULL_EXTRAS + STABILITY


class ProbeOptions:
    """What named probes may need from the Telemetry call (closures and their schedules)."""

    def __init__(
        self,
        every: int | Schedule = 1,
        closure: LossClosure | None = None,
        micro_batches: MicroBatches | None = None,
        micro_batch_size: int | None = None,
        scheduled_every: int | Schedule = 50,
    ) -> None:
        self.every, self.closure = every, closure
        self.micro_batches, self.micro_batch_size = micro_batches, micro_batch_size
        self.scheduled_every = scheduled_every


def build_probe(name: str, options: ProbeOptions) -> Probe:
    """Make a built-in probe by name; an unknown name is a user error listing the choices."""
    factories: dict[str, Callable[[], Probe]] = {
        "grad_norm": lambda: GradNorm(options.every),
        "grad_coherence": lambda: GradCoherence(options.every),
        "update_norm": lambda: UpdateNorm(options.every),
        "lr": lambda: LearningRate(options.every),
        "layer_norms": lambda: LayerNorms(options.scheduled_every),
        "sharpness": lambda: Sharpness(options.closure, options.scheduled_every),
        "m_coherence": lambda: MCoherence(options.micro_batches, options.scheduled_every),
        "grad_noise_scale": lambda: GradNoiseScale(
            options.micro_batches, options.micro_batch_size, options.scheduled_every
        ),
    }
    for stability_name in STABILITY:
        factories[stability_name] = partial(
            build_stability_probe, stability_name, options.every, options.scheduled_every
        )
    if name not in factories:
        raise StabilityBenchError(
            f"unknown probe {name!r}; allowed probes: {', '.join(PROBE_NAMES)}; "
            f"presets: {', '.join(PRESETS)}"
        )
    return factories[name]()


ProbeSpec = str | Probe | Iterable[str | Probe]


def resolve_probes(spec: ProbeSpec, options: ProbeOptions) -> list[Probe]:
    """Turn a preset name, a probe name, a Probe, or a list of these into probe instances."""
    items: list[str | Probe] = [spec] if isinstance(spec, str | Probe) else list(spec)
    probes: list[Probe] = []
    for item in items:
        if isinstance(item, Probe):
            probes.append(item)
        elif item in PRESETS:
            probes.extend(build_probe(n, options) for n in PRESETS[item])
        else:
            probes.append(build_probe(item, options))
    return probes
