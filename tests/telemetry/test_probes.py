"""Each built-in probe against a slow reference computed independently (explicit flatten/autograd)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stabilitybench import Telemetry
from stabilitybench.telemetry import Probe, Sharpness


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 5, generator=g), torch.randn(32, 2, generator=g)


def _flat(tensors: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([t.detach().double().numpy().ravel() for t in tensors])


def test_cheap_probes_match_reference() -> None:
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = _data()
    tel = Telemetry(model, opt)
    params = list(model.parameters())
    ref_rows = []
    prev, ema = None, None
    for step in range(6):
        opt.zero_grad()
        loss = ((model(x[step:]) - y[step:]) ** 2).mean()
        loss.backward()
        grads = [p.grad.clone() for p in params]
        g = _flat(grads)
        before = _flat([p.detach().clone() for p in params])
        opt.step()
        after = _flat(list(params))
        tel.log(loss=loss)
        row = {
            "grad_norm": np.linalg.norm(g),
            "grad_norm_max_layer": max(np.linalg.norm(_flat([t])) for t in grads),
            "update_norm": np.linalg.norm(after - before),
            "update_ratio": np.linalg.norm(after - before) / np.linalg.norm(before),
            "param_norm": np.linalg.norm(after),
            "lr": 0.05,
            "nonfinite_grads": 0,
            "loss": float(loss.detach()),
        }
        cos = lambda a, b: float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))  # noqa: E731
        row["grad_cos_prev"] = math.nan if prev is None else cos(g, prev)
        row["grad_cos_ema"] = math.nan if ema is None else cos(g, ema)
        ema = g.copy() if ema is None else 0.9 * ema + 0.1 * g
        prev = g
        ref_rows.append(row)
    table = tel.close()
    assert list(table["step"]) == list(range(6))
    for step, ref in enumerate(ref_rows):
        got = table.iloc[step]
        for key, value in ref.items():
            if math.isnan(value):
                assert math.isnan(got[key]), key
            else:
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)


def test_sharpness_matches_analytic_top_eigenvalue() -> None:
    torch.manual_seed(0)
    n = 12
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    eigs = torch.linspace(0.1, 7.5, n, dtype=torch.float64)
    hessian = (q * eigs) @ q.T  # known Hessian: Q diag(λ) Qᵀ

    class Quadratic(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.theta = torch.nn.Parameter(torch.randn(n, dtype=torch.float64))

        def forward(self) -> torch.Tensor:
            return 0.5 * self.theta @ hessian @ self.theta

    model = Quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tel = Telemetry(model, opt, probes=["cheap", Sharpness(model, every=1, iters=200)])
    for _ in range(2):
        opt.zero_grad()
        model().backward()
        opt.step()
    table = tel.close()
    assert table["sharpness"].iloc[-1] == pytest.approx(float(eigs.max()), rel=0.01)


def _micro_batch_setup() -> tuple[
    torch.nn.Module, torch.optim.Optimizer, list[tuple[torch.Tensor, torch.Tensor]]
]:
    model = _mlp(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = _data(4)
    micro = [(x[i::4], y[i::4]) for i in range(4)]  # 4 micro-batches of 8
    return model, opt, micro


def test_m_coherence_and_noise_scale_match_reference() -> None:
    model, opt, micro = _micro_batch_setup()

    def losses() -> list[torch.Tensor]:
        return [((model(xb) - yb) ** 2).mean() for xb, yb in micro]

    tel = Telemetry(
        model,
        opt,
        probes=["m_coherence", "grad_noise_scale"],
        micro_batches=losses,
        micro_batch_size=8,
        scheduled_every=1,
    )
    x = torch.cat([m[0] for m in micro])
    y = torch.cat([m[1] for m in micro])
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    table = tel.close()
    # Reference at the updated parameters, one micro-batch at a time.
    grads = []
    for xb, yb in micro:
        model.zero_grad()
        ((model(xb) - yb) ** 2).mean().backward()
        grads.append(_flat([p.grad for p in model.parameters()]))
    g = np.stack(grads)
    k, b = 4, 8.0
    mean_sq = float(np.sum(g.mean(0) ** 2))
    sq_mean = float(np.mean(np.sum(g**2, axis=1)))
    assert table["m_coherence"].iloc[0] == pytest.approx(k * mean_sq / sq_mean, rel=1e-4)
    g2 = (k * b * mean_sq - b * sq_mean) / (k * b - b)
    s = (sq_mean - mean_sq) / (1 / b - 1 / (k * b))
    assert table["grad_noise_scale"].iloc[0] == pytest.approx(s / g2, rel=1e-4)


def test_identical_micro_batches_have_full_coherence() -> None:
    model, opt, micro = _micro_batch_setup()
    xb, yb = micro[0]
    tel = Telemetry(
        model,
        opt,
        probes="m_coherence",
        scheduled_every=1,
        micro_batches=lambda: [((model(xb) - yb) ** 2).mean() for _ in range(5)],
    )
    opt.zero_grad()
    ((model(xb) - yb) ** 2).mean().backward()
    opt.step()
    assert tel.close()["m_coherence"].iloc[0] == pytest.approx(5.0, rel=1e-5)


def test_layer_norms_per_parameter() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    tel = Telemetry(model, opt, probes="layer_norms", scheduled_every=1)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    grad_norms = {n: float(p.grad.norm()) for n, p in model.named_parameters()}
    opt.step()
    row = tel.close().iloc[0]
    for name, value in grad_norms.items():
        assert row[f"grad_norm/{name}"] == pytest.approx(value, rel=1e-5)
        assert row[f"update_norm/{name}"] == pytest.approx(0.1 * value, rel=1e-4)


def test_scheduled_probe_writes_only_on_its_steps() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = _data()
    tel = Telemetry(
        model,
        opt,
        probes=["cheap", "sharpness"],
        scheduled_every=3,
        closure=lambda: ((model(x) - y) ** 2).mean(),
    )
    for _ in range(7):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    table = tel.close()
    measured = table["sharpness"].notna().to_numpy()
    assert measured.tolist() == [s % 3 == 0 for s in range(7)]
    assert table["grad_norm"].notna().all()


def test_coherence_with_stride_compares_consecutive_steps() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _data()
    strided = Telemetry(model, opt, every=2)
    grads = []
    for step in range(5):
        opt.zero_grad()
        ((model(x[step:]) - y[step:]) ** 2).mean().backward()
        grads.append(_flat([p.grad for p in model.parameters()]))
        opt.step()
    table = strided.close()
    assert table["grad_norm"].notna().tolist() == [True, False, True, False, True]
    cos = float(grads[4] @ grads[3] / (np.linalg.norm(grads[4]) * np.linalg.norm(grads[3])))
    assert table["grad_cos_prev"].iloc[4] == pytest.approx(cos, rel=1e-5)


class LossSpread(Probe):
    """A user probe: the spread of gradient values (the README example)."""

    name = "grad_spread"

    def measure(self, ctx):  # type: ignore[no-untyped-def]
        return {"grad_std": ctx.grad_flat().std()}


def test_user_probe_with_one_measure_method() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _data()
    tel = Telemetry(model, opt, probes=["cheap", LossSpread()])
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    expected = float(_flat([p.grad for p in model.parameters()]).std(ddof=1))
    opt.step()
    assert tel.close()["grad_std"].iloc[0] == pytest.approx(expected, rel=1e-5)
