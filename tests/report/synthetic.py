"""A small synthetic audit for the report tests: baseline and perturbed runs, a collapse, a
divergence (perf −inf), a failed run, and optionally monitor scores and an evaluation."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from stabilitybench.store import RunStore
from stabilitybench.types import RunSpec

TOTAL_STEPS = 120
EVAL_EVERY = 10
ONSET, DURATION = 40, 10
LR_SPIKE = {"kind": "lr_spike", "at": ONSET, "factor": 10, "duration": DURATION}
DETECTORS = ("zclip", "olmo", "lightning", "megatron", "ews", "pca")


def _perf_curve(steps: np.ndarray, *, perturbed: bool, collapse: str) -> np.ndarray:
    """Rising performance; a perturbed run dips after onset and recovers (or not)."""
    perf = -np.exp(-steps / 40.0) - 0.05
    if perturbed and collapse in ("recover", "hold"):
        depth = 1.4 if collapse == "recover" else 0.05
        dip = depth * np.exp(-np.clip(steps - ONSET - 10, 0, None) / 15.0) * (steps >= ONSET)
        perf = perf - dip
    return perf


def write_run(
    store: RunStore,
    *,
    workload: str,
    knobs: dict[str, Any],
    seed: int,
    perturbed: bool,
    collapse: str = "hold",  # hold | recover | diverge
    scores: bool,
    label_suffix: str = "",
) -> str:
    """One finished run with telemetry, evals, events (and scores); returns its run_id."""
    spec = RunSpec(
        workload={"name": workload, "kind": "toy", "total_steps": TOTAL_STEPS, "knobs": knobs},
        perturbations=(LR_SPIKE,) if perturbed else (),
        seed=seed,
        audit="synthetic",
    )
    rng = np.random.default_rng(seed * 101 + int(perturbed) * 7 + int(knobs.get("noise", 0) * 100))
    pert = (
        {
            "kind": "lr_spike",
            "label": spec.perturbation_label,
            "params": {"at": ONSET, "factor": 10, "duration": DURATION},
        }
        if perturbed
        else {"kind": "none", "label": "none", "params": {}}
    )
    writer = store.writer(spec.run_id)
    writer.start(
        {
            "run_id": spec.run_id,
            "label": spec.label + label_suffix,
            "audit": "synthetic",
            "workload": workload,
            "kind": "toy",
            "knobs": knobs,
            "perturbation": pert,
            "seed": seed,
            "spec": spec.to_dict(),
        }
    )
    last_step = 45 if collapse == "diverge" else TOTAL_STEPS - 1
    steps = np.arange(last_step + 1)
    in_window = (
        (steps >= ONSET) & (steps < ONSET + DURATION) if perturbed else np.zeros(len(steps), bool)
    )
    grad_norm = np.exp(rng.normal(0, 0.2, len(steps))) * (1 + 20 * in_window)
    telemetry = pd.DataFrame(
        {
            "step": steps,
            "loss": np.exp(-steps / 40.0) + 0.05,
            "grad_norm": grad_norm,
            "grad_cos_prev": np.clip(
                0.2 + rng.normal(0, 0.05, len(steps)) - 0.5 * in_window, -1, 1
            ),
            "grad_cos_ema": np.clip(0.4 + rng.normal(0, 0.02, len(steps)) - 0.3 * in_window, -1, 1),
            "update_ratio": 1e-3 * np.exp(rng.normal(0, 0.1, len(steps))) * (1 + 9 * in_window),
            "lr": 0.01 * (1 + 9 * in_window),
        }
    )
    if perturbed:
        telemetry["perturbed"] = in_window
    if collapse == "diverge":
        telemetry.loc[telemetry.index[-1], "grad_norm"] = math.inf
    writer.close(telemetry)

    eval_steps = np.array([0, *range(EVAL_EVERY - 1, last_step + 1, EVAL_EVERY)])
    perf = _perf_curve(eval_steps.astype(float), perturbed=perturbed, collapse=collapse)
    perf = perf + rng.normal(0, 0.01, len(perf))
    if collapse == "diverge":
        eval_steps = np.append(eval_steps, last_step)
        perf = np.append(perf, -math.inf)
    evals = pd.DataFrame(
        {
            "step": eval_steps,
            "env_step": pd.array([None] * len(eval_steps), dtype="Int64"),
            "perf": perf,
            "val_loss": -perf,
        }
    )
    writer.write_table("evals", evals)
    events = (
        [
            {
                "kind": "lr_spike",
                "name": "lr_spike",
                "dimension": "optimization",
                "params": {"factor": 10},
                "start_step": ONSET,
                "end_step": ONSET + DURATION - 1,
                "start_env_step": None,
                "end_env_step": None,
            }
        ]
        if perturbed
        else []
    )
    writer.write_events(events)
    if scores:
        t = steps / TOTAL_STEPS
        deviation = (steps >= ONSET) * (
            1.5 if perturbed and collapse != "hold" else 0.2 * perturbed
        )
        frame = pd.DataFrame(
            {
                "step": steps,
                "msd": rng.normal(0, 0.3, len(steps)) ** 2
                + 4 * deviation * in_window.astype(float)
                + deviation,
                "z_1": np.cos(3 * t) + deviation * t + rng.normal(0, 0.03, len(steps)),
                "z_2": np.sin(3 * t) - deviation * t + rng.normal(0, 0.03, len(steps)),
                "z_3": t + rng.normal(0, 0.03, len(steps)),
            }
        )
        for name in DETECTORS:
            frame[name] = rng.random(len(steps))
        writer.write_table("scores", frame)
    final = -math.inf if collapse == "diverge" else float(np.mean(perf[-3:]))
    writer.finish(
        {
            "final_perf": final,
            "diverged": collapse == "diverge",
            "steps": int(last_step + 1),
            "env_steps": None,
        }
    )
    return spec.run_id


def evaluation_document() -> dict[str, Any]:
    """A `monitor evaluate --json` document; one detector could estimate nothing (notes say why)."""
    from stabilitybench.detectors.base import detector_classes
    from stabilitybench.evaluation.results import DetectorResult, Evaluation, WorkloadResult
    from stabilitybench.metrics.serialize import to_jsonable

    detectors = {
        "msm": DetectorResult(
            event_recall=0.75,
            lead_time_median=12.0,
            lead_time_iqr=[6.0, 20.0],
            false_alarms_per_1k=0.8,
            false_alarms_per_1k_not_collapsed=1.5,
            auroc=0.91,
            auroc_ci=[0.74, 1.0],
            outcome_auroc=0.88,
        )
    }
    for i, name in enumerate(n for n in detector_classes() if n != "msm"):
        detectors[name] = DetectorResult(
            event_recall=0.25,
            lead_time_median=3.0 + i,
            lead_time_iqr=[1.0, 5.0],
            false_alarms_per_1k=1.0,
            false_alarms_per_1k_not_collapsed=2.0,
            auroc=0.5 + 0.03 * i,  # below the monitor's 0.91 for a dozen detectors
            auroc_ci=[0.3, 0.8],
            outcome_auroc=0.5,
        )
    detectors["ews"] = DetectorResult(notes=["too few runs"])
    evaluation = Evaluation(
        target_false_alarms_per_1k=1.0,
        horizon=100,
        workloads={"toy": WorkloadResult(3, 2, 4, detectors)},
        detectors=detectors,
    )
    evaluation.protocol.no_lead_possible = {"toy": 1}
    document: dict[str, Any] = to_jsonable(evaluation)
    return document


def make_audit(
    root: Path,
    *,
    name: str = "synthetic",
    workload: str = "toy",
    scores: bool = True,
    evaluation: bool = True,
    failed: bool = True,
    perturbed: bool = True,
    label_suffix: str = "",
) -> RunStore:
    """An audit: knobs noise ∈ {0.0, 0.2} × {baseline, lr_spike} × seeds {0, 1}, plus a failure."""
    store = RunStore(root)
    root.mkdir(parents=True, exist_ok=True)
    store.write_audit(
        {
            "name": name,
            "version": "0.1.0",
            "created": 0.0,
            "spec": {
                "name": name,
                "seeds": [0, 1],
                "workloads": [
                    {
                        "name": workload,
                        "kind": "toy",
                        "total_steps": TOTAL_STEPS,
                        "knobs": {"noise": [0.0, 0.2]},
                    }
                ],
                "perturbations": ["none", LR_SPIKE],
                "collapse": {"threshold": 0.5, "recovery": 0.9},
            },
        }
    )
    outcomes = {(0.0, 0): "recover", (0.0, 1): "diverge", (0.2, 0): "hold", (0.2, 1): "recover"}
    for noise in (0.0, 0.2):
        for seed in (0, 1):
            common = {
                "workload": workload,
                "knobs": {"noise": noise},
                "seed": seed,
                "scores": scores,
                "label_suffix": label_suffix,
            }
            write_run(store, perturbed=False, **common)
            if perturbed:
                write_run(store, perturbed=True, collapse=outcomes[(noise, seed)], **common)
    if failed:
        spec = RunSpec(workload={"name": workload, "kind": "toy", "knobs": {"noise": 0.2}}, seed=7)
        writer = store.writer(spec.run_id)
        writer.start(
            {
                "run_id": spec.run_id,
                "label": spec.label + label_suffix,
                "workload": workload,
                "kind": "toy",
                "knobs": {"noise": 0.2},
                "perturbation": {"kind": "none"},
                "seed": 7,
                "spec": spec.to_dict(),
            }
        )
        writer.fail("Traceback (most recent call last):\nRuntimeError: out of memory <boom> & more")
    if evaluation:
        (root / "monitor").mkdir(exist_ok=True)
        (root / "monitor" / "evaluation.json").write_text(json.dumps(evaluation_document()))
    return store


@contextmanager
def fast_summary() -> Iterator[None]:
    """The real metrics summary with fewer bootstrap resamples, to keep the tests quick."""
    import stabilitybench.metrics.summary as summary

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(summary, "summarize", partial(summary.summarize, reps=100))
        yield
