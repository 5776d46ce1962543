"""The monitor explains its first alarm: which features (and which layer) moved the deviation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from monitor_synthetic import synthetic_telemetry
from stabilitybench.detectors.msm import MSMDetector
from stabilitybench.monitor.attribution import Contribution, MonitorAttribution, argmax_columns
from stabilitybench.monitor.ssm import MetaStateMonitor

FAST = {"max_epochs": 3, "window": 32, "hidden": 16}
TENSORS = ["wte.weight", "h.0.attn.c_attn.weight", "h.1.attn.c_attn.weight"]


class _Run:
    def __init__(self, seed: int, telemetry: pd.DataFrame) -> None:
        self.seed, self.telemetry = seed, telemetry


def _layered(seed: int, blowup_at: int | None = None) -> pd.DataFrame:
    """Synthetic telemetry with per-layer columns: the largest gradient norm sits in tensor 1
    (h.0) until `blowup_at`, then tensor 2 (h.1) grows 1000×; block 1's attention logit too."""
    table = synthetic_telemetry(seed, n=120)
    rng = np.random.default_rng(seed + 100)
    table["grad_norm_layer_max"] = table["grad_norm"] / 3 * (1 + 0.05 * rng.standard_normal(120))
    table["grad_norm_layer_argmax"] = 1.0
    table["attn_logit_max/0"] = 20.0 + rng.standard_normal(120)
    table["attn_logit_max/1"] = 20.0 + rng.standard_normal(120)
    if blowup_at is not None:
        growth = np.geomspace(1.0, 1000.0, 120 - blowup_at)
        table.loc[blowup_at:, "grad_norm_layer_max"] *= growth
        table.loc[blowup_at:, "grad_norm_layer_argmax"] = 2.0
        table.loc[blowup_at:, "attn_logit_max/1"] *= np.sqrt(growth)
    return table


@pytest.fixture(scope="module")
def monitor() -> MetaStateMonitor:
    return MetaStateMonitor(latent_dim=3, seed=0, **FAST).fit(
        [_Run(s, _layered(s)) for s in range(4)]
    )


def test_argmax_columns_come_from_the_probe_declarations() -> None:
    found = argmax_columns()
    assert found["grad_norm_layer_max"] == ("grad_norm_layer_argmax", "layer_max")
    assert found["update_ratio_layer_max"] == ("update_ratio_layer_argmax", "layer_max")
    assert found["adam_rms_max"] == ("adam_rms_argmax", "adam_rms")


def test_the_first_alarm_names_the_feature_and_the_layer(monitor: MetaStateMonitor) -> None:
    run = _layered(9, blowup_at=70)
    scored = monitor.score(run)
    after = scored["alarm"].to_numpy() & (scored["step"].to_numpy() >= 70)
    index = int(np.argmax(after))  # the first alarm of the blow-up
    assert after.any() and index < 100
    explained = monitor.explain(run, index, {"layer_max": TENSORS})
    top = explained.contributions[0]
    assert top.feature in {"grad_norm_layer_max", "attn_logit_max/1"}
    named = {c.feature: c for c in explained.contributions}
    assert named["grad_norm_layer_max"].layer == "h.1.attn.c_attn.weight"
    assert named["grad_norm_layer_max"].z > 2  # above healthy, in per-bin std units
    if "attn_logit_max/1" in named:
        assert named["attn_logit_max/1"].layer == "block 1"
    # without run.json's names the tensor is named by its index
    bare = monitor.explain(run, index)
    assert {c.feature: c.layer for c in bare.contributions}["grad_norm_layer_max"] == "tensor #2"
    # the detector's attribution is the same decomposition, as one line
    text = MSMDetector(monitor).attribution(run, index, {"layer_max": TENSORS})
    assert text is not None and text == explained.text()
    assert "h.1.attn.c_attn.weight" in text


def test_shares_are_the_hand_worked_decomposition(monitor: MetaStateMonitor) -> None:
    """Shares of gap' P gap: δ_j (P δ)_j / Σ; a non-finite feature takes all of it."""
    assert monitor.features is not None
    d = monitor.features.dim
    row = monitor.reference["feature_mean"][5].copy()
    row[0] += 1.0
    shares = monitor.contributions(row, step=int(5 * monitor.horizon / 10))
    precision = monitor.reference["feature_precision"][5]
    gap = np.zeros(d)
    gap[0] = 1.0
    assert shares[monitor.features.names[0]] == pytest.approx(
        gap[0] * (precision @ gap)[0] / float(gap @ precision @ gap)
    )
    row[2] -= 2.0
    both = monitor.contributions(row, step=int(5 * monitor.horizon / 10))
    assert sum(both.values()) == pytest.approx(1.0)  # off-diagonal parts may be negative
    row[1] = math.inf
    broken = monitor.contributions(row, step=0)
    assert broken[monitor.features.names[1]] == 1.0


def test_text_is_short_and_marks_non_finite() -> None:
    explained = MonitorAttribution(
        step=12,
        term="features",
        contributions=[
            Contribution("grad_norm_layer_max", 0.62, 8.14, "h.3.mlp.c_fc.weight"),
            Contribution("nonfinite", 0.3, math.inf),
            Contribution("loss", 0.08, 1.0),
        ],
    )
    assert explained.text() == (
        "grad_norm_layer_max @ h.3.mlp.c_fc.weight (+8.1σ, 62%), nonfinite (non-finite, 30%)"
    )
