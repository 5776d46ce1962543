"""Every norm, dot product and cosine the telemetry writes agrees with a float64 reference.

The model is the LM workload's `tiny` GPT-2 (4 layers, n_embd 128, byte vocabulary, a 64-token
context: 834k parameters, so each flat reduction runs over 834k float32 values), trained a few
AdamW steps the way the workload does (decay and no-decay groups). The reference is computed
here from float64 copies of the gradients, the parameters and Adam's second moments, captured by
optimizer hooks of the test's own. (Plain float32 reductions are off by up to 1e-4 in
`update_norm` and 4e-5 in `grad_cos_prev` on this run.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from stabilitybench import Telemetry
from stabilitybench.telemetry import reductions
from stabilitybench.telemetry.stability_probes import param_index
from stabilitybench.workloads.lm import SIZES, build_model

TOLERANCE = 1e-5  # relative to the float64 value
# A cosine is measured relative to max(|cos|, COSINE_FLOOR): the gradients and the EMA are stored in
# float32, which puts an absolute floor of ~1e-9 under a cosine (a cosine of 1e-7 is zero).
COSINE_FLOOR = 1e-4
STEPS = 6
EMA_DECAY = 0.9  # GradCoherence's default
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.norm() for t in tensors])


class Float64Copies:
    """Per step: float64 copies of the gradients, the parameters before and after the step, and
    Adam's second moments with their step count, from the optimizer's own hooks."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.steps: list[dict[str, Any]] = []
        optimizer.register_step_pre_hook(self._before)
        optimizer.register_step_post_hook(self._after)

    def _before(self, *_: Any) -> None:
        moments = []
        for p in self.params:
            state = self.optimizer.state.get(p)
            if state and "exp_avg_sq" in state:
                moments.append((state["exp_avg_sq"].double(), float(state["step"])))
            else:
                moments.append(None)
        self.steps.append(
            {
                "grads": [p.grad.double() for p in self.params],  # type: ignore[union-attr]
                "before": [p.detach().double() for p in self.params],
                "moments": moments,
                "lr": float(self.optimizer.param_groups[0]["lr"]),
            }
        )

    def _after(self, *_: Any) -> None:
        self.steps[-1]["after"] = [p.detach().double() for p in self.params]


def _cheap_reference(steps: list[dict[str, Any]]) -> Iterator[dict[str, float]]:
    """The cheap preset's columns and the per-tensor ones, in float64, one dict per step."""
    prev: torch.Tensor | None = None
    ema: torch.Tensor | None = None
    for step in steps:
        g = _flat(step["grads"])
        before, after = _flat(step["before"]), _flat(step["after"])
        deltas = [a - b for a, b in zip(step["after"], step["before"], strict=True)]
        grad_norms, update_norms = _norms(step["grads"]), _norms(deltas)
        ratios = update_norms / _norms(step["before"])
        row = {
            "grad_norm": g.norm(),
            "grad_norm_max_layer": grad_norms.max(),
            "update_norm": (after - before).norm(),
            "update_ratio": (after - before).norm() / before.norm(),
            "param_norm": after.norm(),
            "grad_norm_layer_max": grad_norms.max(),
            "update_ratio_layer_max": ratios.max(),
        }
        for i, (gn, un) in enumerate(zip(grad_norms, update_norms, strict=True)):
            row[f"grad_norm/{i}"], row[f"update_norm/{i}"] = gn, un
        if prev is not None and ema is not None:
            row["grad_cos_prev"] = g @ prev / (g.norm() * prev.norm())
            row["grad_cos_ema"] = g @ ema / (g.norm() * ema.norm())
        prev = g
        ema = g.clone() if ema is None else ema + (1.0 - EMA_DECAY) * (g - ema)
        yield {k: float(v) for k, v in row.items()}


def _adam_reference(steps: list[dict[str, Any]]) -> Iterator[dict[str, float]]:
    """adam_rms and eos columns in float64 (empty before Adam has state)."""
    beta1, beta2 = ADAM_BETAS
    last: dict[str, Any] | None = None
    for step in steps:
        row: dict[str, float] = {}
        if all(m is not None for m in step["moments"]):
            denoms = [(v / (1.0 - beta2**count)).sqrt() + ADAM_EPS for v, count in step["moments"]]
            rms = torch.stack(
                [(g / d).pow(2).mean().sqrt() for g, d in zip(step["grads"], denoms, strict=True)]
            )
            row["adam_rms_max"], row["adam_rms_mean"] = float(rms.max()), float(rms.mean())
            if last is not None:
                delta = [b - a for a, b in zip(last["before"], step["before"], strict=True)]
                dgrad = [b - a for a, b in zip(last["grads"], step["grads"], strict=True)]
                numerator = sum(float((a * b).sum()) for a, b in zip(dgrad, delta, strict=True))
                denominator = sum(
                    float((d * d * w).sum()) for d, w in zip(delta, denoms, strict=True)
                )
                curvature = numerator / denominator
                row["eos_curvature"] = curvature
                row["eos_ratio"] = last["lr"] * curvature * (1 - beta1) / (2 + 2 * beta1)
        last = step
        yield row


def _tiny_gpt2_run(probes: list[str]) -> tuple[pd.DataFrame, list[dict[str, Any]], list[str]]:
    """A few steps of the LM workload's tiny GPT-2 (AdamW with decay / no-decay groups)."""
    torch.manual_seed(0)
    model = build_model(SIZES["tiny"], vocab_size=256, block_size=64, dropout=0.0)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3,
        betas=ADAM_BETAS,
        eps=ADAM_EPS,
    )
    telemetry = Telemetry(model, optimizer, probes=probes, keep_rows=True)
    copies = Float64Copies(optimizer)
    data = torch.randint(0, 256, (STEPS, 8, 64), generator=torch.Generator().manual_seed(0))
    for batch in data:
        optimizer.zero_grad(set_to_none=True)
        model(batch, labels=batch).loss.backward()  # the model shifts the labels
        optimizer.step()
    return telemetry.close(), copies.steps, param_index(model, optimizer)


@pytest.fixture(scope="module")
def tiny_gpt2() -> tuple[pd.DataFrame, list[dict[str, Any]], list[str]]:
    return _tiny_gpt2_run(["cheap", "layer_norms", "layer_max", "adam_rms", "eos"])


def relative_errors(
    rows: pd.DataFrame, reference: list[dict[str, float]], rename: Callable[[str], str]
) -> dict[str, float]:
    """Largest |telemetry − reference| / |reference| per column over the steps (for a cosine:
    / max(|reference|, COSINE_FLOOR))."""
    worst: dict[str, float] = {}
    for step, expected in enumerate(reference):
        for key, value in expected.items():
            got = float(rows[rename(key)].iloc[step])
            scale = max(abs(value), COSINE_FLOOR) if key.startswith("grad_cos") else abs(value)
            worst[key] = max(worst.get(key, 0.0), abs(got - value) / scale)
    return worst


def test_the_tiny_gpt2_has_flat_reductions_over_800k_values(tiny_gpt2: Any) -> None:
    _, steps, _ = tiny_gpt2
    assert sum(g.numel() for g in steps[0]["grads"]) > 800_000
    assert len(steps) == STEPS


def test_cheap_and_per_tensor_columns_agree_with_float64(tiny_gpt2: Any) -> None:
    rows, steps, names = tiny_gpt2

    def rename(key: str) -> str:
        head, _, index = key.partition("/")
        return f"{head}/{names[int(index)]}" if index else key

    errors = relative_errors(rows, list(_cheap_reference(steps)), rename)
    columns = {k.partition("/")[0] for k in errors}
    assert columns >= {"grad_norm", "update_norm", "param_norm", "grad_cos_prev", "grad_cos_ema"}
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE}
    assert not bad, f"relative error above {TOLERANCE}: {bad}"


def test_adam_rms_and_eos_agree_with_float64(tiny_gpt2: Any) -> None:
    rows, steps, _ = tiny_gpt2
    errors = relative_errors(rows, list(_adam_reference(steps)), lambda key: key)
    assert set(errors) == {"adam_rms_max", "adam_rms_mean", "eos_curvature", "eos_ratio"}
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE}
    assert not bad, f"relative error above {TOLERANCE}: {bad}"


def test_sum_squares_and_row_dots_agree_with_float64_on_long_skewed_vectors() -> None:
    """Values of very different sizes over a million entries: what a float32 sum gets wrong."""
    gen = torch.Generator().manual_seed(1)
    n = 1_000_003  # not a multiple of the chunk: the tail is summed too
    x = torch.randn(n, generator=gen) * torch.rand(n, generator=gen) ** 4
    noise = torch.randn(2, n, generator=gen)
    rows = torch.stack([x * 0.5 + noise[0] * 1e-3, noise[1]])  # row 1 ⟂ x: a dot ~1e-3 of |·||·|
    x64, rows64 = x.double(), rows.double()
    assert reductions.sum_squares(x).dtype == torch.float64
    assert float(torch.linalg.vector_norm(x)) != pytest.approx(float(x64.norm()), rel=1e-5)
    assert float(reductions.norm(x)) == pytest.approx(float(x64.norm()), rel=1e-7)
    np.testing.assert_allclose(reductions.sum_squares(rows), (rows64**2).sum(1), rtol=1e-7)
    np.testing.assert_allclose(reductions.row_dots(rows, x), rows64 @ x64, rtol=1e-7)
    for short in (x[:100], x[: reductions.CHUNK]):  # only a tail; only whole chunks
        expected = float((short.double() ** 2).sum())
        assert float(reductions.sum_squares(short)) == pytest.approx(expected, rel=1e-7)
        assert float(reductions.row_dots(short[None], short)[0]) == pytest.approx(
            expected, rel=1e-7
        )


def test_tensor_norms_chunk_long_cpu_tensors_and_keep_float64() -> None:
    gen = torch.Generator().manual_seed(2)
    tensors = [
        torch.randn(1000, 1000, generator=gen) * torch.rand(1000, 1, generator=gen) ** 4,
        torch.randn(7, generator=gen),
        torch.randn(300, 300, generator=gen),
    ]
    assert tensors[0].numel() > reductions.SHORT
    norms = reductions.tensor_norms(tensors)
    assert norms.dtype == torch.float64 and norms.shape == (3,)
    np.testing.assert_allclose(norms, [t.double().norm() for t in tensors], rtol=1e-6)
    mixed = reductions.tensor_norms([tensors[1].double(), tensors[2].bfloat16()])
    assert float(mixed[0]) == pytest.approx(float(tensors[1].double().norm()), rel=1e-12)
    assert float(mixed[1]) == pytest.approx(float(tensors[2].bfloat16().double().norm()), rel=1e-6)


def test_mps_accumulates_in_float32_every_other_device_in_float64() -> None:
    assert reductions.accumulation_dtype(torch.device("mps")) == torch.float32
    assert reductions.accumulation_dtype(torch.device("cpu")) == torch.float64
    assert reductions.accumulation_dtype(torch.device("cuda", 0)) == torch.float64
