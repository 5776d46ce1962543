"""Parametric perturbations: one-shot edits of the model's parameters."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, ClassVar

from stabilitybench.errors import StabilityBenchError
from stabilitybench.perturbations.base import Param, Perturbation, no_grad, register
from stabilitybench.types import StepContext

if TYPE_CHECKING:
    import torch


def _module_names(model: torch.nn.Module, limit: int = 20) -> str:
    names = [n for n, _ in model.named_modules() if n][:limit]
    return ", ".join(names) + (", …" if len(names) == limit else "")


def _param_names(model: torch.nn.Module, limit: int = 20) -> str:
    names = [n for n, _ in model.named_parameters()][:limit]
    return ", ".join(names) + (", …" if len(names) == limit else "")


def _need_model(label: str, model: torch.nn.Module | None) -> torch.nn.Module:
    if model is None:
        raise StabilityBenchError(
            f"perturbation {label!r}: needs the model; give Telemetry the model it trains"
        )
    return model


class _ModelEdit(Perturbation):
    """A one-shot edit of the parameters, done once per clock step, just before the update.

    Edits write through `tensor.data`, which autograd does not version: SB3's SAC runs the
    actor's forward pass before the critic's update (the clock) and its backward after it, so an
    in-place edit of the actor visible to autograd would fail that backward ("modified by an
    inplace operation"). The pending backward then sees the edited weights, as hardware would.
    """

    dimension = "parametric"
    scope = "model"
    one_shot = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.trained: list[torch.Tensor] = []  # every parameter an optimizer updates

    def on_attach(self, telemetry: Any) -> None:
        seen: set[int] = set()
        for opt in telemetry.optimizers.values():
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        self.trained.append(p)


@register
class WeightNoise(_ModelEdit):
    """Add Gaussian noise to each trained tensor with norm `scale` × that tensor's norm."""

    name = "weight_noise"
    magnitude_field = "scale"  # the parameter that is its size
    params: ClassVar[dict[str, Param]] = {
        "scale": Param(float, low=0.0, low_open=True),
        "module": Param(str, default=None, help="a submodule name"),
    }
    models = "a corrupted checkpoint, bit flips, a bad weight average"

    def check_model(self, model: torch.nn.Module | None) -> None:
        if self.values["module"] is not None:
            _get_module(self.label, _need_model(self.label, model), self.values["module"])

    @no_grad
    def apply(self, ctx: StepContext) -> None:
        import torch

        if self.values["module"] is not None:
            module = _get_module(
                self.label, _need_model(self.label, ctx.model), self.values["module"]
            )
            tensors: list[torch.Tensor] = list(module.parameters())
        else:
            tensors = self.trained or list(ctx.params)
        for p in tensors:
            noise = torch.randn(p.shape, generator=self.generator, dtype=torch.float32)
            target = self.values["scale"] * p.detach().float().norm().cpu()
            noise *= target / noise.norm().clamp_min(1e-30)
            p.data.add_(noise.to(device=p.device, dtype=p.dtype))  # .data: see _ModelEdit


def _get_module(label: str, model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise StabilityBenchError(
            f"perturbation {label!r}: module={name!r} is not a submodule of the model; "
            f"module must be one of: {_module_names(model)}"
        ) from None


@register
class LayerReset(_ModelEdit):
    """Re-initialise a named module with its own `reset_parameters()`."""

    name = "layer_reset"
    params: ClassVar[dict[str, Param]] = {"module": Param(str, help="a submodule name")}
    models = "a layer re-initialised by a bug, or a partial checkpoint load"

    def check_model(self, model: torch.nn.Module | None) -> None:
        module = _get_module(self.label, _need_model(self.label, model), self.values["module"])
        if not any(hasattr(m, "reset_parameters") for m in module.modules()):
            raise StabilityBenchError(
                f"perturbation {self.label!r}: module={self.values['module']!r} has no "
                "reset_parameters(); module must name a layer such as a Linear or Embedding"
            )

    @no_grad
    def apply(self, ctx: StepContext) -> None:
        import torch

        module = _get_module(self.label, _need_model(self.label, ctx.model), self.values["module"])
        devices = sorted({p.device.index for p in module.parameters() if p.device.type == "cuda"})
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        # The init functions use the global RNG: fork it so training's stream is untouched.
        # Reset a copy, then write its values through .data (see _ModelEdit).
        fresh = copy.deepcopy(module)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for m in fresh.modules():
                reset = getattr(m, "reset_parameters", None)
                if callable(reset):
                    reset()
        for old, new in zip(module.parameters(), fresh.parameters(), strict=True):
            old.data.copy_(new.data)


@register
class ParamScale(_ModelEdit):
    """Multiply a named parameter (or a slice of it) by `factor`; 0 ablates it.

    `index` selects part of the parameter: one item per leading dimension, each null (all),
    an int, or [start, stop]. E.g. GPT-2's value projection of head h in `attn.c_attn.weight`
    (shape C × 3C) is `index: [null, [2C + h·d, 2C + (h+1)·d]]`.
    """

    name = "param_scale"
    magnitude_field = "factor"  # the parameter that is its size
    params: ClassVar[dict[str, Param]] = {
        "param": Param(str, help="a parameter name"),
        "factor": Param(float, low=0.0),
        "index": Param(
            object, default=None, help="a list: null, int or [start, stop] per dimension"
        ),
    }
    models = "a damaged attention head or layer (ablation / targeted corruption)"

    def _target(self, model: torch.nn.Module | None) -> tuple[torch.Tensor, tuple[Any, ...]]:
        model = _need_model(self.label, model)
        name = self.values["param"]
        try:
            param = model.get_parameter(name)
        except AttributeError:
            raise StabilityBenchError(
                f"perturbation {self.label!r}: param={name!r} is not a parameter of the model; "
                f"param must be one of: {_param_names(model)}"
            ) from None
        return param, _index(self.label, self.values["index"], tuple(param.shape))

    def check_model(self, model: torch.nn.Module | None) -> None:
        self._target(model)

    @no_grad
    def apply(self, ctx: StepContext) -> None:
        param, index = self._target(ctx.model)
        param.data[index] *= self.values["factor"]  # .data: see _ModelEdit


def _index(label: str, index: Any, shape: tuple[int, ...]) -> tuple[Any, ...]:
    if index is None:
        return (...,)
    bad = StabilityBenchError(
        f"perturbation {label!r}: index={index!r} is not allowed; index must be a list with at most "
        f"{len(shape)} items (the parameter's shape is {list(shape)}), each null, an int, or "
        "[start, stop] within that dimension"
    )
    if not isinstance(index, (list, tuple)) or len(index) > len(shape):
        raise bad
    out: list[Any] = []
    for item, size in zip(index, shape, strict=False):
        if item is None:
            out.append(slice(None))
        elif isinstance(item, int) and not isinstance(item, bool) and -size <= item < size:
            out.append(item)
        elif (
            isinstance(item, (list, tuple))
            and len(item) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in item)
            and 0 <= item[0] < item[1] <= size
        ):
            out.append(slice(item[0], item[1]))
        else:
            raise bad
    return tuple(out)
