"""Build-up probes: Adam's second-moment lag, the edge-of-stability ratio (against an analytic
quadratic), per-layer maxima with their tensor index, and GPT-2 attention/output logits."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from stabilitybench.errors import StabilityBenchError
from stabilitybench.telemetry import Telemetry
from stabilitybench.telemetry.probes import PRESETS, ProbeOptions, resolve_probes
from stabilitybench.telemetry.stability_probes import (
    AdamRms,
    AttentionLogits,
    EdgeOfStability,
    LayerMaxima,
    index_names,
    param_index,
)


class Hook:
    """A StepHook that records what a test needs at pre/post step (runs before the probes)."""

    def __init__(self, pre: Any = None, post: Any = None) -> None:
        self.pre, self.post = pre, post

    def on_pre_step(self, ctx: Any) -> None:
        if self.pre is not None:
            self.pre(ctx)

    def on_post_step(self, ctx: Any) -> None:
        if self.post is not None:
            self.post(ctx)

    def row_fields(self, step: int) -> dict[str, Any]:
        return {}


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def train(
    model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, hook: Hook | None, probes: Any
) -> Any:
    tel = Telemetry(model, opt, probes=probes)
    if hook is not None:
        tel.add_hook(hook)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 3, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return tel.close(), tel


def test_adam_rms_is_the_rms_of_g_over_the_previous_preconditioner() -> None:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    expected: list[tuple[float, int]] = []

    def pre(ctx: Any) -> None:
        values = []
        for p in ctx.params:
            state = opt.state.get(p)
            if not state:
                return
            t = float(state["step"])
            v_hat = state["exp_avg_sq"] / (1 - 0.99**t)
            values.append(float((p.grad / (v_hat.sqrt() + 1e-8)).pow(2).mean().sqrt()))
        best = max(range(len(values)), key=values.__getitem__)
        expected.append((values[best], best))

    rows, tel = train(model, opt, 5, Hook(pre=pre), ["adam_rms"])
    assert math.isnan(rows["adam_rms_max"].iloc[0])  # no optimizer state before the first step
    assert rows["adam_rms_max"].iloc[1:].tolist() == pytest.approx(
        [e[0] for e in expected], rel=1e-5
    )
    assert rows["adam_rms_argmax"].iloc[1:].tolist() == [e[1] for e in expected]
    names = index_names(tel.probes)["adam_rms"]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"] == param_index(model, opt)


def test_adam_rms_gives_nothing_for_sgd() -> None:
    model = mlp()
    rows, _ = train(model, torch.optim.SGD(model.parameters(), lr=0.1), 3, None, ["adam_rms"])
    assert rows["adam_rms_max"].isna().all()


def quadratic_run(
    opt_name: str, h: list[float], lr: float, steps: int = 6, **kw: Any
) -> tuple[Any, list[Any]]:
    """Full-batch f(θ) = ½ Σ h_i θ_i²: the gradient is h ⊙ θ exactly, so the secant is exact."""
    theta = torch.nn.Parameter(torch.tensor([1.0, 0.5, -0.25]))
    curv = torch.tensor(h)
    opt: torch.optim.Optimizer = (
        torch.optim.SGD([theta], lr=lr, **kw)
        if opt_name == "sgd"
        else torch.optim.Adam([theta], lr=lr, **kw)
    )
    states: list[Any] = []

    def pre(ctx: Any) -> None:
        state = opt.state.get(theta)
        if state and "exp_avg_sq" in state:
            states.append((state["exp_avg_sq"].clone(), float(state["step"])))
        else:
            states.append(None)

    tel = Telemetry(None, opt, probes=[EdgeOfStability()])
    tel.add_hook(Hook(pre=pre))
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (curv * theta * theta).sum()).backward()
        opt.step()
    return tel.close(), states


def test_eos_ratio_is_one_at_sgds_edge() -> None:
    # One curvature h = 4 in every direction: λ = 4 exactly; η = 0.5 → η λ / 2 = 1 (the edge).
    rows, _ = quadratic_run("sgd", [4.0, 4.0, 4.0], lr=0.5)
    assert math.isnan(rows["eos_ratio"].iloc[0])
    assert rows["eos_curvature"].iloc[1:].tolist() == pytest.approx([4.0] * 5, rel=1e-5)
    assert rows["eos_ratio"].iloc[1:].tolist() == pytest.approx([1.0] * 5, rel=1e-5)


def test_eos_curvature_is_the_rayleigh_quotient_along_the_update() -> None:
    # SGD: Δθ = −η h⊙θ, so λ = Σ h³θ² / Σ h²θ² for the θ of the previous step.
    h = torch.tensor([1.0, 2.0, 8.0])
    rows, _ = quadratic_run("sgd", h.tolist(), lr=0.1, momentum=0.0)
    theta = torch.tensor([1.0, 0.5, -0.25])
    expected = []
    for _ in range(5):
        g = h * theta
        expected.append(float((h * g * g).sum() / (g * g).sum()))
        theta = theta - 0.1 * g
    assert rows["eos_curvature"].iloc[1:].tolist() == pytest.approx(expected, rel=1e-4)
    assert rows["eos_ratio"].iloc[1:].tolist() == pytest.approx(
        [0.1 * e / 2 for e in expected], rel=1e-4
    )


def test_eos_with_momentum_uses_the_heavy_ball_limit() -> None:
    rows, _ = quadratic_run("sgd", [4.0, 4.0, 4.0], lr=0.5, momentum=0.9)
    assert rows["eos_ratio"].iloc[1:].tolist() == pytest.approx([0.5 * 4.0 / 3.8] * 5, rel=1e-5)


def test_eos_for_adam_is_the_preconditioned_curvature_over_38_over_lr() -> None:
    # One curvature h: (g_t − g_{t−1})·Δθ = h‖Δθ‖², so λ_pre = h Σ Δθ² / Σ Δθ² (sqrt(v̂) + eps).
    h, lr = 3.0, 0.05
    rows, states = quadratic_run("adam", [h, h, h], lr=lr, betas=(0.9, 0.999))
    theta_hist: list[torch.Tensor] = []
    theta = torch.nn.Parameter(torch.tensor([1.0, 0.5, -0.25]))
    opt = torch.optim.Adam([theta], lr=lr, betas=(0.9, 0.999))
    for _ in range(6):
        theta_hist.append(theta.detach().clone())
        opt.zero_grad()
        (0.5 * h * (theta * theta).sum()).backward()
        opt.step()
    expected = []
    for t in range(1, 6):
        delta = theta_hist[t] - theta_hist[t - 1]
        v, step = states[t]
        precond = (v / (1 - 0.999**step)).sqrt() + 1e-8
        lam = float(h * (delta * delta).sum() / (delta * delta * precond).sum())
        expected.append(lr * lam / 38.0)
    assert rows["eos_ratio"].iloc[1:].tolist() == pytest.approx(expected, rel=1e-4)


def test_layer_maxima_name_the_tensor() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    seen: list[tuple[list[float], list[float]]] = []
    before: list[torch.Tensor] = []

    def pre(ctx: Any) -> None:
        before[:] = [p.detach().clone() for p in ctx.params]
        seen.append(([float(p.grad.norm()) for p in ctx.params], []))

    def post(ctx: Any) -> None:
        ratios = [float((p - b).norm() / b.norm()) for p, b in zip(ctx.params, before, strict=True)]
        seen[-1][1].extend(ratios)

    rows, tel = train(model, opt, 3, Hook(pre=pre, post=post), [LayerMaxima()])
    for step, (grads, ratios) in enumerate(seen):
        assert rows["grad_norm_layer_max"].iloc[step] == pytest.approx(max(grads), rel=1e-5)
        assert rows["grad_norm_layer_argmax"].iloc[step] == grads.index(max(grads))
        assert rows["update_ratio_layer_max"].iloc[step] == pytest.approx(max(ratios), rel=1e-4)
        assert rows["update_ratio_layer_argmax"].iloc[step] == ratios.index(max(ratios))
    assert index_names(tel.probes)["layer_max"][1] == "0.bias"


def test_layer_maxima_skip_a_zero_tensor() -> None:
    model = mlp()
    with torch.no_grad():
        model[0].bias.zero_()
    rows, _ = train(model, torch.optim.SGD(model.parameters(), lr=0.5), 1, None, [LayerMaxima()])
    assert rows["update_ratio_layer_argmax"].iloc[0] != 1  # 0.bias had norm 0: no ratio
    assert math.isfinite(rows["update_ratio_layer_max"].iloc[0])


def tiny_gpt2(qk_layernorm: bool = False) -> torch.nn.Module:
    from stabilitybench.workloads.lm import build_model

    torch.manual_seed(0)
    return build_model({"n_layer": 2, "n_embd": 16, "n_head": 2}, 32, 8, 0.0, qk_layernorm)


def manual_logits(model: Any, x: torch.Tensor) -> tuple[list[float], float]:
    """Per layer, max over causal (i ≥ j) positions of q·k/√d; and max |output logit|."""
    with torch.no_grad():
        out = model(input_ids=x, output_hidden_states=True)
        tops = []
        for block, hidden in zip(model.transformer.h, out.hidden_states, strict=False):
            qkv = block.attn.c_attn(block.ln_1(hidden))  # (B, T, 3C); qk-norm hook applies
            q, k, _ = qkv.split(16, dim=2)
            q = q.reshape(*q.shape[:2], 2, 8).transpose(1, 2)
            k = k.reshape(*k.shape[:2], 2, 8).transpose(1, 2)
            scores = q @ k.transpose(-1, -2) / math.sqrt(8)
            mask = torch.ones(8, 8, dtype=torch.bool).tril()
            tops.append(float(scores.masked_fill(~mask, -math.inf).max()))
        return tops, float(out.logits.abs().max())


@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_attention_logits_match_a_manual_computation(qk_layernorm: bool) -> None:
    model = tiny_gpt2(qk_layernorm)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    probe = AttentionLogits(every=2)
    tel = Telemetry(model, opt, probes=[probe])
    gen = torch.Generator().manual_seed(3)
    expected: dict[int, tuple[list[float], float]] = {}
    for step in range(5):
        x = torch.randint(0, 32, (3, 8), generator=gen)
        if step in (2, 4):
            expected[step] = manual_logits(model, x)  # the weights this step's forward sees
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), x.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # an evaluation pass must not overwrite what was recorded
            model(input_ids=torch.zeros(1, 8, dtype=torch.long))
    rows = tel.close()
    probe.close()
    assert math.isnan(rows["attn_logit_max"].iloc[0])  # hooks are installed on the first step
    for step, (layers, out_max) in expected.items():
        row = rows.iloc[step]
        assert [row["attn_logit_max/0"], row["attn_logit_max/1"]] == pytest.approx(layers, rel=1e-5)
        assert row["attn_logit_max"] == pytest.approx(max(layers), rel=1e-5)
        assert row["out_logit_max"] == pytest.approx(out_max, rel=1e-5)
    assert rows["attn_logit_max"].iloc[[1, 3]].isna().all()  # not on the schedule
    assert not any(m._forward_hooks for m in model.lm_head.modules())  # close() removed them


def test_stability_preset_and_names() -> None:
    probes = resolve_probes("stability", ProbeOptions())
    names = [p.name for p in probes]
    assert names[-4:] == ["adam_rms", "eos", "layer_max", "attn_logits"]
    assert PRESETS["cheap"] == tuple(names[:-4])
    assert isinstance(probes[-4], AdamRms)
    with pytest.raises(StabilityBenchError, match="adam_rms"):
        resolve_probes("adam_rmss", ProbeOptions())
