"""Counting host reads: every call that hands a tensor's value to Python (on a GPU, each one
waits for the stream). Shared by the telemetry's and the device guard's sync tests."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# Everything that hands a tensor's value to Python (on a GPU: waits for the stream).
_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.__float__,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.__complex__,
    torch.Tensor.__repr__,
    torch.Tensor.__format__,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.Tensor.is_nonzero,
    torch.is_nonzero,
    torch.Tensor.equal,
    torch.equal,
    torch.allclose,
    torch.Tensor.allclose,
    torch.Tensor.__array__,
}


class CountReads(TorchFunctionMode):
    """Counts every call that reads a tensor's value back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _READS:
            self.counts[getattr(func, "__name__", str(func))] += 1
        elif func in (torch.Tensor.to, torch.Tensor.copy_) and _to_host(func, args, kwargs):
            self.counts["to(cpu)"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _to_host(func: Any, args: Any, kwargs: Any) -> bool:
    if func is torch.Tensor.copy_:
        dst, src = args[0], args[1]
        return bool(dst.device.type == "cpu" and src.device.type != "cpu")
    src = args[0]
    target = kwargs.get("device")
    for a in args[1:]:
        if isinstance(a, str | torch.device):
            target = a
    return target is not None and torch.device(target).type == "cpu" and src.device.type != "cpu"
