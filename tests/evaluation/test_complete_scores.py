"""Scores written before a detector existed gain its columns from the run's telemetry, with the
`perturbed` flag rebuilt from the run's events where the telemetry lacks it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from monitor_synthetic import ONSET, synthetic_telemetry
from stabilitybench.detectors.auto import AutoDetector
from stabilitybench.detectors.base import DetectorSettings
from stabilitybench.detectors.coherence import CoherenceDetector
from stabilitybench.detectors.controls import RandomDetector
from stabilitybench.evaluation.fitting import complete_scores, score_frame
from stabilitybench.findings.slim import kept_telemetry_columns
from stabilitybench.store import RunData, empty_events

NEW = ("coherence", "auto", "clock", "random")


def _events() -> pd.DataFrame:
    """A guard's intervention at step 40 (not a perturbation), the LR spike's window at ONSET."""
    rows = [
        {"kind": "guard", "name": "zclip", "start_step": 40, "end_step": 40},
        {"kind": "lr_spike", "name": "lr_spike", "start_step": ONSET, "end_step": ONSET + 9},
    ]
    return pd.concat([empty_events(), pd.DataFrame(rows)], ignore_index=True)


def _run(events: pd.DataFrame) -> RunData:
    telemetry = synthetic_telemetry(0, drift_at=ONSET, factor=20.0)  # no `perturbed` column
    info = {"run_id": "r", "workload": "synth", "kind": "toy", "seed": 0}
    return RunData("r", info, telemetry, pd.DataFrame(), events)


def _old_frame(run: RunData) -> pd.DataFrame:
    """scores.parquet as written before the new detectors existed."""
    frame = score_frame(run, None, DetectorSettings())
    return frame.drop(columns=[c for name in NEW for c in (name, f"{name}_native")])


def test_the_missing_columns_are_scored_and_the_flag_rebuilt_from_the_events() -> None:
    run = _run(_events())
    old = _old_frame(run)
    completed = complete_scores(run, old)
    pd.testing.assert_frame_equal(completed[list(old.columns)], old)
    steps = completed["step"].to_numpy()
    # the clock counts from the LR spike's start (the guard's step 40 is no perturbation)
    np.testing.assert_array_equal(completed["clock"], np.where(steps >= ONSET, steps - ONSET, 0))
    assert completed["clock_native"].tolist() == (steps > ONSET).tolist()
    np.testing.assert_array_equal(completed["random"], RandomDetector().score(run.telemetry))
    np.testing.assert_array_equal(completed["coherence"], CoherenceDetector().score(run.telemetry))
    assert completed["coherence_native"].dtype == bool
    np.testing.assert_array_equal(completed["auto"], AutoDetector().score(run.telemetry))
    fresh = score_frame(run, None, DetectorSettings())  # the new columns come last
    pd.testing.assert_frame_equal(completed[list(fresh.columns)], fresh)


def test_a_run_without_perturbations_and_a_complete_frame() -> None:
    run = _run(empty_events())
    completed = complete_scores(run, _old_frame(run))
    assert (completed["clock"] == 0).all() and not completed["clock_native"].any()
    assert complete_scores(run, completed) is completed  # nothing lacking: as it is


def test_rows_are_matched_by_step() -> None:
    run = _run(_events())
    old = _old_frame(run).iloc[[150, 90, 10]].reset_index(drop=True)
    old.loc[2, "step"] = 999  # a step the telemetry does not have
    completed = complete_scores(run, old)
    assert completed["clock"].tolist()[:2] == [150 - ONSET, 90 - ONSET]
    assert np.isnan(completed["clock"][2]) and not completed["clock_native"][2]


def test_findings_folders_keep_what_the_new_detectors_read() -> None:
    columns = ["step", "loss", "perturbed", "grad_cos_ema", "actor/grad_cos_prev", "lr"]
    assert kept_telemetry_columns(columns) == columns[:-1]
