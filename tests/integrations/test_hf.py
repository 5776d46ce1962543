"""The Hugging Face Trainer callback, on a real Trainer training a tiny GPT-2 for a few steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from guard_detector import alarm_at_step_fixture  # noqa: F401  (the `alarm_at_step` fixture)
from transformers import Trainer, TrainerCallback, TrainingArguments

from stabilitybench.errors import StabilityBenchError
from stabilitybench.integrations.hf import StabilityTrainerCallback
from stabilitybench.workloads import corpus as corpora
from stabilitybench.workloads.lm import build_model


class ByteWindows(torch.utils.data.Dataset):
    """Fixed byte windows of the Shakespeare corpus, as causal-LM examples (labels = inputs)."""

    def __init__(self, n: int = 40, block: int = 32) -> None:
        tokens = corpora.load_tokens("shakespeare").train
        self.windows = [tokens[i * 997 : i * 997 + block].long() for i in range(n)]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


class RecordGradNorms(TrainerCallback):
    """Test helper: the gradient norm right before each optimizer step, seen by the Trainer."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_pre_optimizer_step(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.norms.append(float(torch.stack([g.norm() for g in grads]).norm()))


class LossTimesTwo:
    """A stand-in online monitor: its score is twice the row's loss."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def step(self, row: dict[str, Any]) -> float:
        self.rows.append(dict(row))
        return 2.0 * row["loss"]


def train(tmp_path: Path, callbacks: list[Any], steps: int = 5, **extra: Any) -> Trainer:
    torch.manual_seed(0)
    model = build_model({"n_layer": 1, "n_embd": 32, "n_head": 2}, 256, 32, 0.0)
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        **{"max_grad_norm": 0.0, **extra},
    )
    trainer = Trainer(model=model, args=args, train_dataset=ByteWindows(), callbacks=callbacks)
    trainer.train()
    return trainer


def test_callback_records_one_row_per_step_with_the_trainer_loss(tmp_path: Path) -> None:
    callback = StabilityTrainerCallback()
    grads = RecordGradNorms()
    trainer = train(tmp_path, [callback, grads])
    rows = callback.telemetry.rows()
    assert list(rows["step"]) == [0, 1, 2, 3, 4]
    # The loss the Trainer logged for each step (logging_steps=1) is the one in the row.
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert rows["loss"].tolist() == pytest.approx(logged, rel=1e-3)
    assert 4.5 < rows["loss"].iloc[0] < 6.0  # near log(256) = 5.55: untrained
    # The hooks sit on the torch optimizer inside accelerate's wrapper: they saw every step's
    # gradients, and the LR the Trainer's scheduler set.
    assert rows["grad_norm"].tolist() == pytest.approx(grads.norms, rel=1e-5)
    # No clipping (max_grad_norm=0): the Trainer still measures the norm, and it is the same.
    assert rows["grad_norm_raw"].tolist() == pytest.approx(grads.norms, rel=1e-5)
    assert rows["lr"].iloc[0] == pytest.approx(1e-3)
    assert rows["lr"].is_monotonic_decreasing  # the Trainer's linear decay
    assert (rows["update_norm"] > 0).all()


def test_gradient_accumulation_logs_the_step_loss(tmp_path: Path) -> None:
    callback = StabilityTrainerCallback()
    trainer = train(tmp_path, [callback], steps=3, gradient_accumulation_steps=2)
    rows = callback.telemetry.rows()
    assert len(rows) == 3
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert rows["loss"].tolist() == pytest.approx(logged, rel=1e-3)


def test_monitor_scores_land_in_the_rows(tmp_path: Path) -> None:
    monitor = LossTimesTwo()
    callback = StabilityTrainerCallback(monitor=monitor)
    train(tmp_path, [callback], steps=3)
    rows = callback.telemetry.rows()
    assert rows["msd"].tolist() == pytest.approx((2 * rows["loss"]).tolist())
    assert [r["step"] for r in monitor.rows] == [0, 1, 2]


def test_telemetry_before_training_is_a_clear_error() -> None:
    with pytest.raises(StabilityBenchError, match="not attached yet"):
        StabilityTrainerCallback().telemetry.rows()


def test_perturbation_schedule_runs_through_the_callback(tmp_path: Path) -> None:
    from stabilitybench.perturbations import PerturbationSchedule

    schedule = PerturbationSchedule(
        [{"kind": "lr_spike", "at": 2, "factor": 5.0, "duration": 2}], total_steps=5
    )
    callback = StabilityTrainerCallback(schedule=schedule)
    train(tmp_path, [callback])
    rows = callback.telemetry.rows()
    assert rows.loc[rows["perturbed"], "step"].tolist() == [2, 3]
    base = StabilityTrainerCallback()
    train(tmp_path, [base])
    ratio = (rows["lr"] / base.telemetry.rows()["lr"]).tolist()
    assert ratio == pytest.approx([1.0, 1.0, 5.0, 5.0, 1.0])
    assert [(e["kind"], e["start_step"], e["end_step"]) for e in callback.events()] == [
        ("lr_spike", 2, 3)
    ]


def test_batch_perturbations_are_refused_by_the_callback(tmp_path: Path) -> None:
    from stabilitybench.perturbations import PerturbationSchedule

    schedule = PerturbationSchedule(
        [{"kind": "label_noise", "at": 1, "fraction": 0.5}], total_steps=5
    )
    with pytest.raises(StabilityBenchError, match="label_noise"):
        train(tmp_path, [StabilityTrainerCallback(schedule=schedule)])


def test_grad_norm_raw_is_the_trainers_pre_clip_norm(tmp_path: Path) -> None:
    original = torch.nn.utils.clip_grad_norm_
    accelerator_clip = Accelerator.clip_grad_norm_
    callback = StabilityTrainerCallback()
    seen = RecordGradNorms()
    trainer = train(tmp_path, [callback, seen], steps=4, max_grad_norm=0.05)
    # The wrapped clipping function is put back when training ends.
    assert torch.nn.utils.clip_grad_norm_ is original
    assert Accelerator.clip_grad_norm_ is accelerator_clip
    rows = callback.telemetry.rows()
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(logged) == 4
    assert rows["grad_norm_raw"].tolist() == pytest.approx(logged, rel=1e-5)
    # The optimizer's own view (and the telemetry's grad_norm) is after clipping to 0.05.
    assert rows["grad_norm"].tolist() == pytest.approx([0.05] * 4, rel=1e-3)
    assert seen.norms == pytest.approx([0.05] * 4, rel=1e-3)
    assert min(logged) > 0.05


class StatesAroundSteps(TrainerCallback):
    """Test helper (after the stability callback): the model's parameters at each step's start
    and end, i.e. before its forward pass and after the guard acted on it."""

    def __init__(self) -> None:
        self.begin: list[list[torch.Tensor]] = []
        self.end: list[list[torch.Tensor]] = []

    def on_step_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, **_: Any
    ) -> None:
        self.begin.append([p.detach().clone() for p in model.parameters()])

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **_: Any) -> None:
        self.end.append([p.detach().clone() for p in model.parameters()])


def test_a_guard_rolls_the_trainers_model_back_and_cuts_the_lr(
    tmp_path: Path, alarm_at_step: Any
) -> None:
    alarm_at_step.steps = {5}
    guard = {"detector": "alarm_at_step", "action": "rollback", "every": 2, "keep": 3}
    callback = StabilityTrainerCallback(guard={**guard, "min_age": 2, "cooldown": 2})
    states = StatesAroundSteps()
    train(tmp_path, [callback, states], steps=9)
    (event,) = callback.guard_events()
    # Snapshots before steps 0, 2, 4: the newest at least 2 steps older than 5 is step 2's.
    assert event["params"]["rolled_back_to"] == 2 and event["params"]["steps_lost"] == 4
    assert all(torch.equal(a, b) for a, b in zip(states.end[5], states.begin[2], strict=True))
    rows = callback.telemetry.rows()
    # Then the LR is cut by half for 2 steps, under the Trainer's own linear decay.
    lr = rows["lr"].tolist()
    decay = [1e-3 * (1 - s / 9) for s in range(9)]
    assert lr == pytest.approx([d * (0.5 if s in (6, 7) else 1.0) for s, d in enumerate(decay)])


def test_the_auto_guard_through_the_trainer_callback(tmp_path: Path) -> None:
    """`guard={"detector": "auto"}` needs nothing fitted: it acts right after an LR spike and
    leaves the same run without the spike alone."""
    from stabilitybench.perturbations import PerturbationSchedule

    def events(spike: bool) -> list[dict[str, Any]]:
        schedule = (
            PerturbationSchedule([{"kind": "lr_spike", "at": 90, "factor": 1000}])
            if spike
            else None
        )
        callback = StabilityTrainerCallback(
            guard={"detector": "auto", "action": "escalate"}, schedule=schedule
        )
        train(tmp_path, [callback], steps=150)
        return callback.guard_events()

    assert events(spike=False) == []
    found = events(spike=True)
    assert found and 90 <= found[0]["start_step"] <= 95 and found[0]["name"] == "skip"
