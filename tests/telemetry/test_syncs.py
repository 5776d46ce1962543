"""Host–device syncs: none per optimizer step in steady state; one transfer per flush."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

from host_reads import CountReads
from stabilitybench import StabilityBenchError, Telemetry


def _setup(device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(
        device
    )
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int, tel: Telemetry | None):  # type: ignore[no-untyped-def]
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(1)
    for _ in range(n):
        x = torch.randn(16, 8, generator=gen, device=device)
        loss = (model(x) - x[:, :1]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if tel is not None:
            tel.log(loss=loss)  # a tensor: kept on the device, not read


def _reads_of(device: str, steps: int, **telemetry: Any) -> tuple[int, Counter[str], Telemetry]:
    """Reads during `steps` training steps with telemetry, minus those of the same loop without."""
    model, opt = _setup(device)
    with CountReads() as plain:
        _steps(model, opt, steps, None)
    model, opt = _setup(device)
    tel = Telemetry(model, opt, **telemetry)
    with CountReads() as counted:
        _steps(model, opt, steps, tel)
    extra = counted.counts.copy()
    extra.subtract(plain.counts)
    return counted.total - plain.total, +extra, tel


def test_cheap_preset_reads_back_once_per_flush_on_cpu() -> None:
    reads, kinds, tel = _reads_of("cpu", 200, flush_every=100)
    # 200 steps: rows 0..99 are read back when step 100 starts (one tolist); row 199 only
    # when the telemetry is flushed or closed.
    assert reads == 1 and kinds == Counter({"tolist": 1}), kinds
    assert tel.transfers == 1
    table = tel.close()
    assert tel.transfers == 2
    assert table["step"].tolist() == list(range(200))
    assert table["loss"].notna().all() and table["grad_cos_ema"].iloc[1:].notna().all()
    assert table["nonfinite_grads"].tolist() == [0] * 200


def test_no_read_between_flushes() -> None:
    reads, kinds, tel = _reads_of("cpu", 99, flush_every=100)
    assert reads == 0, kinds
    assert len(tel.close()) == 99


def test_sync_every_step_reads_each_row_as_it_finishes() -> None:
    seen: list[int] = []
    model, opt = _setup("cpu")
    tel = Telemetry(model, opt, flush_every=100)
    tel.on_row(lambda row: seen.append(row["step"]), every_step=True)
    with CountReads() as counted:
        _steps(model, opt, 20, tel)
    # Row k is finished when step k + 1 starts: 19 rows read, one transfer each.
    assert seen == list(range(19))
    assert counted.counts["tolist"] == 19


def test_callbacks_get_rows_in_order_at_flush_and_can_add_fields() -> None:
    seen: list[int] = []
    model, opt = _setup("cpu")
    tel = Telemetry(model, opt, flush_every=10)

    def score(row: dict[str, Any]) -> None:
        seen.append(row["step"])
        row["msd"] = 2.0 * row["grad_norm"]

    tel.on_row(score)
    _steps(model, opt, 25, tel)
    assert seen == list(range(20))  # two flushes so far; rows 20..24 still on the device
    table = tel.close()
    assert seen == list(range(25))
    assert (table["msd"] == 2.0 * table["grad_norm"]).all()


def test_flush_every_must_be_a_positive_integer() -> None:
    model, opt = _setup("cpu")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(StabilityBenchError, match="flush_every must be an integer >= 1"):
            Telemetry(model, opt, flush_every=bad)  # type: ignore[arg-type]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cheap_preset_reads_back_once_per_flush_on_cuda() -> None:
    reads, kinds, tel = _reads_of("cuda", 200, flush_every=100)
    assert reads == 1 and kinds == Counter({"tolist": 1}), kinds
    assert len(tel.close()) == 200


@cuda
def test_steady_state_steps_do_not_synchronize_the_cuda_stream() -> None:
    """CUDA's own sync detector raises on any synchronizing call inside the steps."""
    model, opt = _setup("cuda")
    tel = Telemetry(model, opt, flush_every=1000)
    _steps(model, opt, 5, tel)  # first steps allocate buffers
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _steps(model, opt, 50, tel)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    table = tel.close()
    assert len(table) == 55 and table["grad_norm"].notna().all()
