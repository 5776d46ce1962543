"""Telemetry mechanics: hooks, robustness, no effect on training, optimizers, sinks, bad input."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from stabilitybench import StabilityBenchError, Telemetry
from stabilitybench.telemetry import ParquetSink, Sharpness, TensorBoardSink


def _model(seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(dropout), torch.nn.Linear(16, 1)
    )


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, sched=None, tel=None):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen)
        y = x[:, :1] * 2
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if tel is not None:
            tel.log(loss=loss)


def test_close_removes_every_hook() -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    tel = Telemetry(
        model,
        opt,
        probes="full",
        closure=lambda: model(torch.ones(2, 6)).sum(),
        micro_batches=lambda: [model(torch.ones(2, 6)).sum() for _ in range(2)],
        micro_batch_size=2,
    )
    assert len(opt._optimizer_step_pre_hooks) == 1 and len(opt._optimizer_step_post_hooks) == 1
    _train(model, opt, 3, tel=tel)
    tel.close()
    assert len(opt._optimizer_step_pre_hooks) == 0 and len(opt._optimizer_step_post_hooks) == 0
    _train(model, opt, 2)
    assert len(tel.rows()) == 3


def test_nonfinite_gradient_is_counted_not_raised() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tel = Telemetry(model, opt)
    _train(model, opt, 2, tel=tel)
    opt.zero_grad()
    ((model(torch.ones(4, 6)) - 1) ** 2).mean().backward()
    weight = model[0].weight
    weight.grad[0, :3] = float("nan")
    weight.grad[1, 0] = float("inf")
    opt.step()
    _train(model, opt, 1, tel=tel)
    table = tel.close()
    assert table["nonfinite_grads"].tolist()[:3] == [0, 0, 4]
    assert not pd.notna(table["grad_norm"].iloc[2]) or table["grad_norm"].iloc[2] == float("inf")


def test_telemetry_does_not_change_the_trajectory() -> None:
    """Same seed with and without telemetry (full preset, dropout on) → bitwise-identical params."""
    results = []
    for with_telemetry in (False, True):
        model = _model(seed=3, dropout=0.2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        torch.manual_seed(11)
        tel = None
        if with_telemetry:
            probe_x = torch.ones(4, 6)
            tel = Telemetry(
                model,
                opt,
                probes="full",
                scheduled_every=7,
                closure=lambda: model(probe_x).pow(2).mean(),  # noqa: B023
                micro_batches=lambda: [model(probe_x[i : i + 2]).pow(2).mean() for i in (0, 2)],  # noqa: B023
                micro_batch_size=2,
            )
        _train(model, opt, 50, tel=tel)
        if tel is not None:
            tel.close()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    ],
)
def test_works_with_common_optimizers(make_opt) -> None:  # type: ignore[no-untyped-def]
    model = _model()
    opt = make_opt(model.parameters())
    tel = Telemetry(model, opt)
    _train(model, opt, 5, tel=tel)
    table = tel.close()
    cheap = [
        "step",
        "loss",
        "grad_norm",
        "grad_norm_max_layer",
        "grad_cos_prev",
        "grad_cos_ema",
        "update_norm",
        "update_ratio",
        "param_norm",
        "lr",
        "nonfinite_grads",
    ]
    assert set(cheap) <= set(table.columns)
    assert table[cheap].iloc[1:].notna().all().all()


def test_frozen_params_none_grads_and_param_groups() -> None:
    model = _model()
    model[0].bias.requires_grad_(False)  # frozen: not measured
    extra = torch.nn.Parameter(torch.zeros(3))  # never used: grad stays None
    opt = torch.optim.SGD(
        [
            {"params": [model[0].weight, model[0].bias], "lr": 0.1},
            {"params": [*model[3].parameters(), extra], "lr": 0.01},
        ]
    )
    tel = Telemetry(model, opt)
    _train(model, opt, 4, tel=tel)
    table = tel.close()
    assert table["lr"].tolist() == [0.1] * 4
    assert table["lr/group1"].tolist() == [0.01] * 4
    grads = torch.cat(
        [
            model[0].weight.grad.reshape(-1),
            model[3].weight.grad.reshape(-1),
            model[3].bias.grad.reshape(-1),
        ]
    )
    assert table["grad_norm"].iloc[-1] == pytest.approx(float(grads.norm()), rel=1e-5)


def test_lr_column_follows_a_scheduler() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    tel = Telemetry(model, opt)
    _train(model, opt, 6, sched=sched, tel=tel)
    assert tel.close()["lr"].tolist() == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_several_optimizers_get_prefixed_columns() -> None:
    actor, critic = _model(1), _model(2)
    a_opt, c_opt = torch.optim.Adam(actor.parameters()), torch.optim.Adam(critic.parameters())
    tel = Telemetry(None, {"critic": c_opt, "actor": a_opt})
    x = torch.randn(8, 6)
    for step in range(4):
        for net, opt in ((critic, c_opt), (actor, a_opt)):
            if net is actor and step % 2:  # TD3-style delayed actor updates
                continue
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    table = tel.close()
    assert table["step"].tolist() == [0, 1, 2, 3]
    assert table["critic/grad_norm"].notna().all()
    assert table["actor/grad_norm"].notna().tolist() == [True, False, True, False]


def test_env_step_and_log_before_first_step() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tel = Telemetry(model, opt)
    tel.log(episode_return=3.0)
    tel.env_step = 128
    _train(model, opt, 2)
    table = tel.close()
    assert table["env_step"].tolist() == [128, 128]
    assert table["episode_return"].iloc[0] == 3.0


def test_sinks_parquet_and_tensorboard(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from torch.utils.tensorboard import SummaryWriter

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    tel = Telemetry(model, opt, sink=[ParquetSink(tmp_path / "t.parquet"), TensorBoardSink(writer)])
    _train(model, opt, 3, tel=tel)
    table = tel.close()
    writer.close()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "t.parquet"), table)
    assert any((tmp_path / "tb").iterdir())


def test_no_trainable_parameters_is_a_clear_error() -> None:
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(StabilityBenchError, match="no trainable parameters"):
        Telemetry(model, opt)


def test_unknown_probe_name_lists_allowed_names() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        StabilityBenchError, match=r"unknown probe 'hessian'.*allowed probes: .*sharpness"
    ):
        Telemetry(model, opt, probes=["cheap", "hessian"])


def test_sharpness_without_closure_is_a_clear_error() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(StabilityBenchError, match=r"sharpness.*closure"):
        Telemetry(model, opt, probes="full")
    with pytest.raises(StabilityBenchError, match="closure"):
        Sharpness(None)
