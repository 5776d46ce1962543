"""The Lightning callback, on a real `Trainer.fit` of a small model for a few steps."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from guard_detector import alarm_at_step_fixture  # noqa: F401  (the `alarm_at_step` fixture)
from torch import nn

from stabilitybench.errors import StabilityBenchError
from stabilitybench.integrations.lightning import StabilityLightningCallback


class Regression(pl.LightningModule):
    """A small MLP regression that records its loss and its gradient norm before each step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.losses: list[float] = []
        self.grad_norms: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.stack([g.norm() for g in grads]).norm()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen)
    y = x.sum(dim=1, keepdim=True)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def fit(callback: StabilityLightningCallback, steps: int = 6, **extra: Any) -> Regression:
    torch.manual_seed(0)
    module = Regression()
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        **extra,
    )
    trainer.fit(module, loader())
    return module


def test_callback_sees_each_steps_own_gradients_and_loss() -> None:
    callback = StabilityLightningCallback()
    module = fit(callback)
    rows = callback.telemetry.rows()
    assert list(rows["step"]) == list(range(6))
    assert rows["loss"].tolist() == pytest.approx(module.losses, rel=1e-6)
    # Lightning computes the gradients inside optimizer.step(closure); the rows still hold the
    # gradient of the same step (not the previous one's).
    assert rows["grad_norm"].tolist() == pytest.approx(module.grad_norms, rel=1e-6)
    assert rows["lr"].tolist() == pytest.approx([0.1] * 6)
    assert module.losses[-1] < module.losses[0]  # the closure ran once per step: it trains
    assert len(module.losses) == 6


def test_gradient_accumulation_logs_the_mean_loss_of_the_window() -> None:
    callback = StabilityLightningCallback()
    module = fit(callback, steps=3, accumulate_grad_batches=2)
    rows = callback.telemetry.rows()
    assert len(rows) == 3 and len(module.losses) == 6
    means = [(module.losses[2 * i] + module.losses[2 * i + 1]) / 2 for i in range(3)]
    assert rows["loss"].tolist() == pytest.approx(means, rel=1e-6)


def test_monitor_scores_land_in_the_rows() -> None:
    class Monitor:
        def step(self, row: dict[str, Any]) -> float:
            return row["grad_norm"] + row["loss"]

    callback = StabilityLightningCallback(monitor=Monitor())
    fit(callback, steps=4)
    rows = callback.telemetry.rows()
    assert rows["msd"].tolist() == pytest.approx((rows["grad_norm"] + rows["loss"]).tolist())


def test_hooks_are_removed_after_fit() -> None:
    callback = StabilityLightningCallback()
    fit(callback, steps=2)
    optimizer = next(iter(callback.telemetry.optimizers.values()))
    assert len(optimizer._optimizer_step_pre_hooks) == 0
    assert len(optimizer._optimizer_step_post_hooks) == 0


def test_telemetry_before_fit_is_a_clear_error() -> None:
    with pytest.raises(StabilityBenchError, match="not attached yet"):
        StabilityLightningCallback().telemetry.rows()


def test_perturbation_schedule_runs_through_the_callback() -> None:
    from stabilitybench.perturbations import PerturbationSchedule

    schedule = PerturbationSchedule(
        [{"kind": "grad_scale", "at": 3, "factor": 100.0, "duration": 1}], total_steps=6
    )
    callback = StabilityLightningCallback(schedule=schedule)
    module = fit(callback)
    rows = callback.telemetry.rows()
    assert rows.loc[rows["perturbed"], "step"].tolist() == [3]
    # The telemetry measured the scaled gradient of step 3 (after Lightning's closure ran).
    assert rows["grad_norm"].iloc[3] == pytest.approx(100.0 * module.grad_norms[3], rel=1e-5)
    assert [(e["kind"], e["start_step"]) for e in callback.events()] == [("grad_scale", 3)]


def test_grad_norm_raw_is_the_norm_before_lightning_clips() -> None:
    callback = StabilityLightningCallback()
    module = fit(callback, steps=5, gradient_clip_val=0.01)
    rows = callback.telemetry.rows()
    assert rows["grad_norm_raw"].tolist() == pytest.approx(module.grad_norms, rel=1e-5)
    assert min(module.grad_norms) > 0.01
    assert rows["grad_norm"].tolist() == pytest.approx([0.01] * 5, rel=1e-3)


def test_a_guard_skips_a_step_of_the_lightning_module(alarm_at_step: Any) -> None:
    class Params(pl.Callback):
        """After the stability callback: the module's parameters at each batch's start/end."""

        def __init__(self) -> None:
            self.begin: list[list[torch.Tensor]] = []
            self.end: list[list[torch.Tensor]] = []

        def on_train_batch_start(self, trainer: Any, module: Any, *_: Any) -> None:
            self.begin.append([p.detach().clone() for p in module.parameters()])

        def on_train_batch_end(self, trainer: Any, module: Any, *_: Any) -> None:
            self.end.append([p.detach().clone() for p in module.parameters()])

    alarm_at_step.steps = {3}
    callback = StabilityLightningCallback(guard={"detector": "alarm_at_step", "action": "skip"})
    params = Params()
    torch.manual_seed(0)
    module = Regression()
    pl.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, params],
    ).fit(module, loader())
    (event,) = callback.guard_events()
    assert event["name"] == "skip" and event["start_step"] == 3
    same = [
        all(torch.equal(a, b) for a, b in zip(params.begin[i], params.end[i], strict=True))
        for i in range(6)
    ]
    assert same == [False, False, False, True, False, False]  # step 3's update undone


class AdamRegression(Regression):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _fit_auto(spike: bool) -> StabilityLightningCallback:
    from stabilitybench.perturbations import PerturbationSchedule

    schedule = (
        PerturbationSchedule([{"kind": "lr_spike", "at": 90, "factor": 1000}]) if spike else None
    )
    callback = StabilityLightningCallback(
        guard={"detector": "auto", "action": "escalate"}, schedule=schedule
    )
    torch.manual_seed(0)
    pl.Trainer(
        max_steps=150,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    ).fit(AdamRegression(), loader())
    return callback


def test_the_auto_guard_through_the_lightning_callback() -> None:
    """`guard={"detector": "auto"}` needs nothing fitted: it acts right after an LR spike and
    leaves the same run without the spike alone."""
    assert _fit_auto(spike=False).guard_events() == []
    events = _fit_auto(spike=True).guard_events()
    assert events and 90 <= events[0]["start_step"] <= 95
    assert events[0]["name"] == "skip"
