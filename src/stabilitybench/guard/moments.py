"""Reset an optimizer's moment estimates for the tensors whose gradient spiked (SPAM, Huang et al.
2025, arXiv 2501.06842: a gradient spike stays in Adam's moments for about 1/(1 − β) steps, and
resetting them is what stops it steering the next updates).

`GradNormHistory` keeps, per optimizer, each tensor's gradient norm over the last `NORM_HISTORY`
steps in a ring on the device (the guard computes them after the step: one pass over the
gradients and one (n,) copy per step, no host sync). At an alarm it says which tensors spiked —
gradient norm above `spike_ratio` × its median over the ring — and `forget_moments` drops their
optimizer state.

A reset drops the tensor's whole per-parameter state where it holds a moment estimate
(`exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`, `momentum_buffer`): torch's Adam family and SGD
create it again at their next step as at the run's first — zero moments and a step count of 0.
The step count restarts on purpose: Adam's bias correction then makes the next update that of a
fresh start (lr × g/|g| per entry), where zeroed moments under the old step count would give an
update (1 − β1)/√(1 − β2) ≈ 3.2 times larger. An optimizer whose state holds no moment estimate
(Adagrad's sums), or that creates its state when it is constructed, is left as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
NORM_HISTORY = 64  # steps of per-tensor gradient norms kept for the median
MIN_HISTORY = 8  # earlier steps a median needs; with fewer, every tensor counts as spiked


def has_moments(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> bool:
    """Whether `param` has a moment estimate in `optimizer`'s state."""
    state = optimizer.state.get(param)
    return state is not None and any(key in state for key in MOMENT_KEYS)


def forget_moments(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], spiked: Sequence[bool]
) -> int:
    """Drop the optimizer state of each of `params` whose `spiked` flag is set and that has a
    moment estimate; returns how many tensors were reset."""
    reset = 0
    for param, hit in zip(params, spiked, strict=True):
        if hit and has_moments(optimizer, param):
            del optimizer.state[param]
            reset += 1
    return reset


class GradNormHistory:
    """One optimizer's per-tensor gradient norms over the last `size` steps, on the device."""

    def __init__(self, size: int = NORM_HISTORY) -> None:
        self.size = size
        self.ring: torch.Tensor | None = None  # (size, n_tensors)
        self.count = 0  # steps recorded
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: Sequence[torch.Tensor] = ()

    @torch.no_grad()
    def record(
        self, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], norms: torch.Tensor
    ) -> None:
        """Add one step's gradient norms (n,) of `params` (one small device copy)."""
        norms = norms.reshape(-1)
        ring = self.ring
        if ring is None or (ring.shape[1], ring.dtype, ring.device) != (
            norms.numel(),
            norms.dtype,
            norms.device,
        ):
            ring = self.ring = torch.zeros(self.size, norms.numel()).to(norms)
            self.count = 0
        ring[self.count % self.size].copy_(norms)
        self.count += 1
        self.optimizer, self.params = optimizer, params

    @torch.no_grad()
    def spiked(self, spike_ratio: float) -> list[bool] | None:
        """Per tensor, whether the latest norm is above `spike_ratio` × its median over the
        earlier steps (a non-finite norm is); None before `MIN_HISTORY` earlier steps.
        Reads the flags back: one host sync (at an alarm only)."""
        if self.ring is None or self.count - 1 < MIN_HISTORY:
            return None
        latest = (self.count - 1) % self.size
        filled = min(self.count, self.size)
        earlier = [i for i in range(filled) if i != latest]
        median = self.ring[earlier].median(dim=0).values  # (n,)
        flags = ~(self.ring[latest] <= spike_ratio * median)  # NaN compares False: spiked
        return [bool(f) for f in flags.tolist()]

    def reset(self, spike_ratio: float) -> tuple[int, str | None]:
        """Forget the moments of the tensors that spiked; with none (or no median yet), of every
        tensor. Returns how many tensors were reset and a note where it was not only those."""
        if self.optimizer is None:
            return 0, "no gradient norms recorded: nothing reset"
        flags = self.spiked(spike_ratio)
        note = None
        if flags is None:
            note = f"fewer than {MIN_HISTORY} steps of gradient norms: every tensor reset"
        elif not any(flags):
            note = (
                f"no tensor's gradient norm above {spike_ratio:g}× its median: every tensor reset"
            )
        chosen = flags if flags is not None and any(flags) else [True] * len(self.params)
        return forget_moments(self.optimizer, self.params, chosen), note
