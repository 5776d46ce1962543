"""What nothing would score: the criterion's flag rate on sham and unperturbed runs, and collapse
rates as the excess over the sham arm, paired by seed — on a hand-built audit."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from stabilitybench.metrics.conditions import paired_excess
from stabilitybench.metrics.summary import summarize
from stabilitybench.store import RunStore

STEPS = [0, 10, 20, 30, 40, 50, 60, 70]
FLAT = [0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]  # learned by step 20, then steady
DOWN = [0.0, 1.0, 2.0, 0.1, 0.1, 0.1, 0.1, 0.1]  # a collapse at 30, never back


def _run(store: RunStore, run_id: str, seed: int, kind: str, perf: list[float]) -> None:
    writer = store.writer(run_id)
    label = "none" if kind == "none" else f"{kind}(at=25)"
    writer.start(
        {
            "run_id": run_id,
            "workload": "w",
            "kind": "toy",
            "seed": seed,
            "perturbation": {"kind": kind, "label": label, "params": {"at": 25}},
        }
    )
    writer.write_table("evals", pd.DataFrame({"step": STEPS, "perf": perf}))
    events = [] if kind == "none" else [{"kind": kind, "start_step": 25, "end_step": 25}]
    writer.write_events(events)
    writer.finish({})


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    store = RunStore(tmp_path / "a")
    store.root.mkdir()
    store.write_audit({"name": "controls", "spec": {}})
    for seed in range(4):
        _run(store, f"base{seed}", seed, "none", FLAT)
        # the sham of seed 3 falls as the spike does: a false positive of the criterion
        _run(store, f"sham{seed}", seed, "sham", DOWN if seed == 3 else FLAT)
        # the spike collapses seeds 1, 2 and 3
        _run(store, f"spike{seed}", seed, "lr_spike", FLAT if seed == 0 else DOWN)
    return store


def test_the_flag_rate_of_sham_and_unperturbed_runs(store: RunStore) -> None:
    (item,) = summarize(store, reps=200).false_positives
    assert (item.n_flagged, item.n_judged, item.n_runs) == (1, 8, 8)
    assert item.sham_flag_rate == pytest.approx(1 / 8) and item.share_judged == 1.0
    low, high = item.sham_flag_rate_ci
    assert low is not None and high is not None and low < 1 / 8 < high


def test_collapse_rate_in_excess_of_the_sham_arm_paired_by_seed(store: RunStore) -> None:
    spike = next(
        c for c in summarize(store, reps=200).conditions if c.perturbation_kind == "lr_spike"
    )
    assert spike.collapse_rate == pytest.approx(3 / 4) and spike.control == "sham"
    # seed by seed: 0 − 0, 1 − 0, 1 − 0, 1 − 1 → mean 0.5
    assert spike.collapse_excess == pytest.approx(0.5) and spike.n_pairs == 4
    low, high = spike.collapse_excess_ci
    assert low is not None and high is not None and low <= 0.5 <= high


def test_paired_excess_needs_both_arms_judged() -> None:
    assert paired_excess([], [], rng=None, reps=10) == (None, [None, None], 0)  # type: ignore[arg-type]
