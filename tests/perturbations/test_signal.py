"""Learning-signal perturbations: gradient noise / scale / drop, loss scale, in the window only."""

from __future__ import annotations

from typing import Any

import torch
from pert_helpers import Recorder, tiny_mlp

from stabilitybench.perturbations import PerturbationSchedule
from stabilitybench.telemetry import Telemetry


def sgd_run(
    perturbations: list[dict[str, Any]] | None, steps: int = 6, clip: float | None = None
) -> dict[str, Any]:
    """Plain SGD on the tiny MLP; records the gradient the optimizer used and the update it made."""
    model = tiny_mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tel = Telemetry(model, opt, probes=[])
    if perturbations is not None:
        PerturbationSchedule(perturbations, seed=3).attach(tel)
    used: list[torch.Tensor] = []
    before: list[torch.Tensor] = []
    updates: list[torch.Tensor] = []
    raw: list[torch.Tensor] = []

    def pre(ctx: Any) -> None:
        used.append(torch.cat([p.grad.reshape(-1).clone() for p in ctx.params]))
        before.append(torch.cat([p.detach().reshape(-1).clone() for p in ctx.params]))

    def post(ctx: Any) -> None:
        after = torch.cat([p.detach().reshape(-1) for p in ctx.params])
        updates.append(after - before[-1])

    tel.add_hook(Recorder(pre=pre, post=post))
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 4, generator=data), torch.randn(8, 2, generator=data)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        raw.append(torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()]))
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    tel.close()
    return {"used": used, "updates": updates, "raw": raw, "model": model}


def test_grad_noise_has_the_requested_norm_and_lands_between_backward_and_step() -> None:
    base = sgd_run(None)
    run = sgd_run([{"kind": "grad_noise", "at": 2, "scale": 0.5, "duration": 2}])
    for step in range(6):
        clean = run["raw"][step]
        noise = run["used"][step] - clean
        if step in (2, 3):
            ratio = float(noise.norm() / clean.norm())
            assert abs(ratio - 0.5) < 1e-5
        else:
            assert torch.equal(noise, torch.zeros_like(noise))
        # The optimizer stepped with the noisy gradient: SGD's update is -lr × used gradient.
        torch.testing.assert_close(run["updates"][step], -0.1 * run["used"][step])
    # Before the window, training is bitwise what it is without the perturbation.
    for step in range(2):
        assert torch.equal(run["raw"][step], base["raw"][step])
    assert not torch.equal(run["raw"][4], base["raw"][4])


def test_grad_scale_and_grad_drop_act_only_in_the_window() -> None:
    scaled = sgd_run([{"kind": "grad_scale", "at": 1, "factor": 4, "duration": 2}])
    for step in range(6):
        factor = 4.0 if step in (1, 2) else 1.0
        torch.testing.assert_close(
            scaled["used"][step], factor * scaled["raw"][step], rtol=0, atol=0
        )
    dropped = sgd_run([{"kind": "grad_drop", "at": 3, "fraction": 0.5, "duration": 1}])
    for step in range(6):
        used, raw = dropped["used"][step], dropped["raw"][step]
        if step == 3:
            zeroed = (used == 0) & (raw != 0)
            kept = used == raw
            assert bool((zeroed | kept).all())
            assert 0.3 < float(zeroed.float().mean()) < 0.7  # 106 entries, fraction 0.5
        else:
            assert torch.equal(used, raw)


def test_loss_scale_equals_scaling_the_loss_even_with_clipping() -> None:
    # With clipping, scaling the loss by 0.01 makes small gradients escape the clip: compare with
    # a run whose loss is really multiplied on the window's steps.
    run = sgd_run([{"kind": "loss_scale", "at": 2, "factor": 0.01, "duration": 2}], clip=0.05)

    model = tiny_mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(1)
    for step in range(6):
        x, y = torch.randn(8, 4, generator=data), torch.randn(8, 2, generator=data)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y) * (0.01 if step in (2, 3) else 1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
    for a, b in zip(run["model"].parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # Scaling the clipped gradient instead (grad_scale) gives a different run here.
    after_clip = sgd_run(
        [{"kind": "grad_scale", "at": 2, "factor": 0.01, "duration": 2}], clip=0.05
    )
    assert not torch.allclose(next(after_clip["model"].parameters()), next(model.parameters()))
    # The raw gradients (seen after backward) really were scaled on steps 2 and 3 only.
    assert float(run["raw"][2].norm()) < 0.02 * float(run["raw"][1].norm())


def test_loss_scale_from_step_zero_is_installed_at_attach() -> None:
    run = sgd_run([{"kind": "loss_scale", "at": 0, "factor": 2.0, "duration": 1}])
    base = sgd_run(None)
    torch.testing.assert_close(run["raw"][0], 2.0 * base["raw"][0], rtol=0, atol=0)
    assert not torch.equal(run["raw"][1], 2.0 * base["raw"][1])
