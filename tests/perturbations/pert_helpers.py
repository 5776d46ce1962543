"""A tiny model and a plain PyTorch loop for perturbation tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from stabilitybench.perturbations import PerturbationSchedule
from stabilitybench.telemetry import Telemetry


def tiny_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def run_loop(
    perturbations: list[dict[str, Any]] | None,
    *,
    steps: int = 12,
    seed: int = 0,
    optimizer: str = "adam",
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    probes: Any = ("lr", "grad_norm"),
    clip: float | None = None,
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
) -> tuple[torch.nn.Module, Telemetry, PerturbationSchedule | None]:
    """Train the tiny MLP for `steps` optimizer steps on random regression data."""
    model = tiny_mlp(seed)
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(model.parameters(), lr=1e-2)
        if optimizer == "adam"
        else torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    )
    sched = scheduler(opt) if scheduler is not None else None
    tel = Telemetry(
        model, opt, probes=probes if isinstance(probes, str) else list(probes), total_steps=steps
    )
    schedule = None
    if perturbations is not None:
        schedule = PerturbationSchedule(perturbations, total_steps=steps, seed=seed).attach(tel)
    data_gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randn(16, 4, generator=data_gen)
        y = torch.randn(16, 2, generator=data_gen)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
        tel.log(loss=loss)
        if on_step is not None:
            on_step(step, model)
    tel.close()
    return model, tel, schedule


class Recorder:
    """A StepHook that calls `pre(ctx)` / `post(ctx)`; added after the schedule, it sees its effect."""

    def __init__(
        self, pre: Callable[[Any], None] | None = None, post: Callable[[Any], None] | None = None
    ) -> None:
        self.pre = pre
        self.post = post

    def on_pre_step(self, ctx: Any) -> None:
        if self.pre is not None:
            self.pre(ctx)

    def on_post_step(self, ctx: Any) -> None:
        if self.post is not None:
            self.post(ctx)

    def row_fields(self, step: int) -> dict[str, Any]:
        return {}
