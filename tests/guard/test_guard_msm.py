"""An msm-driven guard: the Meta-State Monitor must not read the guard's own LR cut as a deviation
(it did: an LR cut moves `lr`, `update_norm` and `update_ratio` by 4–6 robust units, the monitor
alarmed, each alarm renewed the cut, and a rollback guard acted on 180 of 200 steps)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from stabilitybench.guard import Guard
from stabilitybench.monitor.ssm import MetaStateMonitor
from stabilitybench.telemetry import Telemetry
from stabilitybench.types import StepContext

torch.set_num_threads(1)
STEPS = 120
LR = 0.01


class SetLR:
    """The loop's own LR: `LR`, times `factor` on the steps in `window` (a spike or a cut)."""

    def __init__(self, opt: torch.optim.Optimizer, window: range, factor: float) -> None:
        self.opt, self.window, self.factor = opt, window, factor

    def on_pre_step(self, ctx: StepContext) -> None:
        for group in self.opt.param_groups:
            group["lr"] = LR * (self.factor if ctx.step in self.window else 1.0)

    def on_post_step(self, ctx: StepContext) -> None:
        pass

    def row_fields(self, step: int) -> dict[str, Any]:
        return {}


class ForceCut:
    """Makes `guard` cut the LR over `window` as if it had alarmed (no alarm needed)."""

    def __init__(self, window: range) -> None:
        self.window = window
        self.guard: Guard | None = None

    def on_pre_step(self, ctx: StepContext) -> None:
        if self.guard is not None and ctx.step == self.window.start:
            self.guard._cut_until = self.window.stop - 1

    def on_post_step(self, ctx: StepContext) -> None:
        pass

    def row_fields(self, step: int) -> dict[str, Any]:
        return {}


def _run(
    seed: int,
    lr_window: range = range(0),
    lr_factor: float = 1.0,
    guard: dict[str, Any] | None = None,
    force_cut: range | None = None,
) -> tuple[pd.DataFrame, Guard | None, float]:
    """A teacher-student MLP (the toy workload's task, smaller); returns rows, guard, val MSE."""
    torch.manual_seed(seed)
    data = torch.Generator().manual_seed(1000 + seed)
    task = torch.Generator().manual_seed(7)
    teacher = torch.randn(8, 1, generator=task)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
    )
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    tel = Telemetry(model, opt, total_steps=STEPS)
    tel.add_hook(SetLR(opt, lr_window, lr_factor))  # before the guard: the guard's cut wins
    forcing = ForceCut(force_cut) if force_cut is not None else None
    if forcing is not None:
        tel.add_hook(forcing)
    g = Guard(tel, **guard) if guard is not None else None
    if forcing is not None:
        forcing.guard = g
    for _ in range(STEPS):
        x = torch.randn(32, 8, generator=data)
        loss = nn.functional.mse_loss(model(x), torch.tanh(x @ teacher))
        opt.zero_grad()
        loss.backward()
        opt.step()
        tel.log(loss=loss)
        if g is not None:
            g.after_step()
    table = tel.close()
    val = torch.randn(512, 8, generator=task)
    with torch.no_grad():
        mse = float(nn.functional.mse_loss(model(val), torch.tanh(val @ teacher)))
    return table, g, mse


@pytest.fixture(scope="module")
def monitor_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A monitor fitted on six healthy runs (seeds 0–5), saved as `monitor fit` saves one."""
    folder = tmp_path_factory.mktemp("monitor")
    monitor = MetaStateMonitor(latent_dim=3, seed=0, max_epochs=20)
    monitor.fit([_run(seed)[0] for seed in range(6)])
    monitor.save(folder)
    return folder


def test_the_monitor_reads_an_lr_cut_as_a_deviation_but_not_the_guards_own(
    monitor_dir: Path,
) -> None:
    monitor = MetaStateMonitor.load(monitor_dir)
    cut = range(50, 110)

    def offline(table: pd.DataFrame) -> np.ndarray:
        monitor.reset()
        return np.array([monitor.step(row) for row in table.to_dict("records")])

    healthy = offline(_run(10)[0])
    # Halving the LR for 60 steps (the loop's own doing): the monitor sees it (through the
    # update size: `lr` itself is a control, not a feature), well above what
    # the healthy run of the same seed ever shows.
    halved = offline(_run(10, cut, 0.5)[0])
    assert halved[cut.start : cut.stop].max() > 2 * healthy.max()
    # The same cut made by the guard: it shows the monitor the update as it would be without its
    # cut, so the cut alone looks like healthy training (before the fix the monitor alarmed on
    # the cut, each alarm renewed it, and the guard never let go).
    guard = {"detector": "msm", "action": "lr_cut", "monitor": monitor_dir}
    table, guarded, _ = _run(10, guard=guard, force_cut=cut)
    assert guarded is not None
    assert list(table["lr"][cut.start : cut.stop]) == pytest.approx([LR * 0.5] * len(cut))
    scores = dict(guarded.scores)
    assert max(scores[s] for s in cut) < healthy.max()


def test_an_msm_rollback_guard_acts_on_a_spike_about_as_often_as_the_monitor_alarms(
    monitor_dir: Path,
) -> None:
    """Before the fix it rolled back on most steps; now it acts about as often as the monitor
    alarms on the same run unguarded (this small test monitor has a few false alarms per run)."""
    monitor = MetaStateMonitor.load(monitor_dir)
    monitor.reset()
    plain = np.array([monitor.step(r) for r in _run(10)[0].to_dict("records")])
    up_crossings = int(np.sum((plain[1:] >= monitor.threshold) & (plain[:-1] < monitor.threshold)))
    guard = {
        "detector": "msm",
        "action": "rollback",
        "monitor": monitor_dir,
        "every": 10,
        "keep": 3,
        "min_age": 10,
    }
    _, healthy, _ = _run(10, guard=guard)
    _, spiked, spiked_mse = _run(10, range(80, 84), 60.0, guard=guard)
    _, _, unguarded_mse = _run(10, range(80, 84), 60.0)
    assert healthy is not None and spiked is not None
    assert len(healthy.interventions) <= up_crossings + 1
    steps = [i.step for i in spiked.interventions]
    assert {80, 81, 82, 83} <= set(steps)  # each spiked update rolled back
    assert len(steps) <= up_crossings + 4 + 1, steps
    assert math.isfinite(spiked_mse) and spiked_mse < unguarded_mse / 4


def test_an_msm_skip_takes_the_undone_row_out_of_the_monitors_state(
    monitor_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A skipped update is not on the run's timeline, so its row leaves the monitor's smoothing
    and recurrent state as they were. Kept in them, the spike's deviation decays over ~1/ema
    rows and every one of those steps is skipped too, each a healthy update thrown away."""
    from stabilitybench.detectors.msm import MSMDetector

    # The fixture's threshold comes from one held-out run; set it, as `monitor fit` does, from
    # healthy runs the model has not seen (seeds 11-14; the guarded run is seed 10).
    monitor = MetaStateMonitor.load(monitor_dir)
    unseen = []
    for seed in range(11, 15):
        monitor.reset()
        unseen.append(np.array([monitor.step(r) for r in _run(seed)[0].to_dict("records")]))
    monitor.recalibrate(unseen, "unseen healthy seeds")
    monitor.save(tmp_path)
    guard = {"detector": "msm", "action": "skip", "monitor": tmp_path}
    spike = range(80, 84)
    _, rewound, _ = _run(10, spike, 60.0, guard=guard)
    monkeypatch.setattr(MSMDetector, "rewind_on_undo", False)
    _, kept, _ = _run(10, spike, 60.0, guard=guard)
    assert rewound is not None and kept is not None
    after = [i.step for i in rewound.interventions if i.step >= spike.start]
    assert set(spike) <= set(after) and len(after) <= len(spike) + 2, after
    streak = [i.step for i in kept.interventions if i.step >= spike.start]
    assert len(streak) > 2 * len(after), (after, streak)
