"""Import logs that the real writers wrote in the test: HF Trainer, Lightning, SB3, MLflow.

Each test trains a tiny model for a few steps with the tool's own logger, imports the folder,
and checks the imported run against what the training loop itself saw; summary and report
read the imported audit like any other.
"""

from __future__ import annotations

import math
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console

from stabilitybench.importers import import_logs
from stabilitybench.metrics.summary import summary_document
from stabilitybench.store import RunStore


def quiet() -> Console:
    return Console(file=StringIO(), width=200)


def only_run(out: Path) -> tuple[RunStore, str]:
    store = RunStore.open(out)
    (run_id,) = store.run_ids()
    return store, run_id


# -- Hugging Face Trainer, report_to="tensorboard" ------------------------------------------
class ByteWindows(torch.utils.data.Dataset):
    """Fixed byte windows of the bundled corpus, as causal-LM examples (labels = inputs)."""

    def __init__(self, n: int, offset: int = 0, block: int = 32) -> None:
        from stabilitybench.workloads import corpus as corpora

        tokens = corpora.load_tokens("shakespeare").train
        start = [offset + i * 997 for i in range(n)]
        self.windows = [tokens[s : s + block].long() for s in start]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


class LossesSeen:
    """Test helper: the Trainer's own log records (what report_to backends receive)."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        seen = self.logs = []  # type: ignore[var-annotated]

        class Callback(TrainerCallback):
            def on_log(
                self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any
            ) -> None:
                seen.append((state.global_step, dict(logs or {})))

        self.callback = Callback()


def hf_train(out: Path, *, lr: float, optim: str = "adamw_torch", steps: int = 12) -> LossesSeen:
    from transformers import Trainer, TrainingArguments

    from stabilitybench.workloads.lm import build_model

    torch.manual_seed(0)
    model = build_model({"n_layer": 1, "n_embd": 32, "n_head": 2}, 256, 32, 0.0)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=lr,
        optim=optim,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=4,
        report_to=["tensorboard"],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    seen = LossesSeen()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ByteWindows(40),
        eval_dataset=ByteWindows(8, offset=500),
        callbacks=[seen.callback],
    )
    trainer.train()
    return seen


def test_hf_trainer_tensorboard_log_imports_with_the_trainer_values(tmp_path: Path) -> None:
    seen = hf_train(tmp_path / "hf", lr=1e-3)
    import_logs(tmp_path / "hf", tmp_path / "audit", console=quiet())
    store, run_id = only_run(tmp_path / "audit")
    run = store.load(run_id)
    assert (run.info.source or {})["writer"] == "hf"
    train = {step: logs for step, logs in seen.logs if "loss" in logs}
    evals = {step: logs["eval_loss"] for step, logs in seen.logs if "eval_loss" in logs}
    table = run.telemetry.set_index("step")
    assert sorted(train) == list(range(1, 13)) and list(table.index) == list(range(1, 13))
    assert np.allclose(table["loss"], [train[s]["loss"] for s in table.index], rtol=1e-6)
    # HF logs the norm clip_grad_norm_ returns (before clipping): stored as grad_norm_raw
    assert np.allclose(table["grad_norm_raw"], [train[s]["grad_norm"] for s in table.index])
    assert np.allclose(table["lr"], 1e-3)
    assert list(run.evals["step"]) == sorted(evals) == [4, 8, 12]
    assert np.allclose(run.evals["perf"], [-evals[s] for s in (4, 8, 12)], rtol=1e-6)
    assert run.info.outcome.diverged is False
    record = summary_document(store)["runs"][0]
    assert record["status"] == "done" and record["n_evals"] == 3
    assert record["final_perf"] == pytest.approx(np.mean([-evals[s] for s in (4, 8, 12)]), rel=1e-6)


def test_diverging_hf_trainer_run_is_imported_as_a_collapse(tmp_path: Path) -> None:
    seen = hf_train(tmp_path / "hf", lr=1e3, optim="sgd")
    nan_steps = [s for s, logs in seen.logs if not math.isfinite(logs.get("grad_norm", 0.0))]
    assert nan_steps, "the huge learning rate should make the gradient non-finite"
    import_logs(tmp_path / "hf", tmp_path / "audit", console=quiet())
    store, run_id = only_run(tmp_path / "audit")
    run = store.load(run_id)
    outcome = run.info.document()["outcome"]
    assert outcome["diverged"] is True
    # HF hides the NaN loss by default (logging_nan_inf_filter); its NaN grad norm does not
    first_eval_nan = min(s for s, logs in seen.logs if not math.isfinite(logs.get("eval_loss", 0)))
    assert outcome["diverged_step"] == min(nan_steps[0], first_eval_nan)
    assert run.evals["perf"].iloc[-1] == -math.inf
    assert int(run.evals["step"].iloc[-1]) == outcome["diverged_step"]
    record = summary_document(store)["runs"][0]
    assert record["collapsed"] is True and record["irreversible"] is True
    from stabilitybench.report.html import write_report

    page = write_report(store).read_text(encoding="utf-8")
    assert run_id in page


# -- Lightning: CSVLogger and TensorBoardLogger ---------------------------------------------
def lightning_fit(logger: Any, steps: int = 8) -> list[float]:
    import lightning.pytorch as pl
    from torch import nn

    losses: list[float] = []

    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            losses.append(float(loss.detach()))
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=gen)
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))
    loader = torch.utils.data.DataLoader(data, batch_size=8)  # 4 steps per epoch
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Regression(), loader, loader)
    return losses


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
def test_lightning_logger_output_imports_with_the_training_losses(
    tmp_path: Path, kind: str
) -> None:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    make = CSVLogger if kind == "csv" else TensorBoardLogger
    losses = lightning_fit(make(save_dir=str(tmp_path / "logs"), name="lightning_logs"))
    import_logs(tmp_path / "logs", tmp_path / "audit", console=quiet())
    store, run_id = only_run(tmp_path / "audit")
    run = store.load(run_id)
    assert run.info.label.startswith("lightning_logs/version_0")
    assert (run.info.source or {})["format"] == kind
    table = run.telemetry.dropna(subset=["loss"])
    # Lightning logs each training step's loss at its global step (0-based before the step)
    assert list(table["step"]) == list(range(8))
    assert np.allclose(table["loss"], losses, rtol=1e-5)
    assert len(run.evals) == 2 and np.all(run.evals["perf"] < 0)  # two epochs: -val_loss
    record = summary_document(store)["runs"][0]
    assert record["n_evals"] == 2 and record["final_perf"] == pytest.approx(
        run.evals["perf"].mean()
    )


# -- Stable-Baselines3, tensorboard_log -----------------------------------------------------
def test_sb3_tensorboard_log_imports_on_the_env_step_axis(tmp_path: Path) -> None:
    import gymnasium as gym
    from stable_baselines3 import PPO

    env = gym.make("CartPole-v1")
    env.reset(seed=0)
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=64,
        batch_size=32,
        n_epochs=1,
        seed=0,
        device="cpu",
        tensorboard_log=str(tmp_path / "sb3"),
    )
    model.learn(total_timesteps=256)
    import_logs(tmp_path / "sb3", tmp_path / "audit", console=quiet())
    store, run_id = only_run(tmp_path / "audit")
    run = store.load(run_id)
    assert run.info.label == "PPO_1" and (run.info.source or {})["writer"] == "sb3"
    assert list(run.telemetry["step"]) == [64, 128, 192, 256]  # SB3 logs against env steps
    assert list(run.telemetry["env_step"]) == [64, 128, 192, 256]
    assert {"loss", "value_loss", "approx_kl", "entropy", "episode_return"} <= set(
        run.telemetry.columns
    )
    # entropy is stored as SB3's entropy loss negated, as the SB3 integration does
    assert (run.telemetry["entropy"].dropna() > 0).all()
    assert (run.info.source or {})["perf_source"] == "rollout/ep_rew_mean (training episodes)"
    assert np.allclose(run.evals["perf"], run.telemetry["episode_return"].dropna())
    assert summary_document(store)["runs"][0]["n_evals"] == len(run.evals) > 0


# -- MLflow local tracking folder -----------------------------------------------------------
def test_mlflow_local_run_imports_with_its_metric_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    mlflow.set_experiment("tiny")
    with mlflow.start_run(run_name="sgd"):
        for step in range(6):
            mlflow.log_metric("train_loss", 1.0 / (step + 1), step=step)
            if step % 2 == 1:
                mlflow.log_metric("val_loss", 2.0 / (step + 1), step=step)
        mlflow.log_metric("learning_rate", 0.1, step=0)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # the reader needs no help from the user
    import_logs(tmp_path / "mlruns", tmp_path / "audit", console=quiet())
    store, run_id = only_run(tmp_path / "audit")
    run = store.load(run_id)
    assert run.info.label == "tiny/sgd" and (run.info.source or {})["format"] == "mlflow"
    assert np.allclose(run.telemetry["loss"], [1.0 / (s + 1) for s in range(6)])
    assert run.telemetry["lr"].iloc[0] == 0.1
    assert list(run.evals["step"]) == [1, 3, 5]
    assert np.allclose(run.evals["perf"], [-1.0, -0.5, -1 / 3])
    assert summary_document(store)["runs"][0]["final_perf"] == pytest.approx(
        np.mean([-1.0, -0.5, -1 / 3])
    )
