"""Feature extraction: transforms, robust normalisation, missing columns, non-finite values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from monitor_synthetic import synthetic_telemetry

from stabilitybench.monitor.features import CLIP, FeatureExtractor, base_name, feature_columns


def test_columns_are_those_present_in_every_run_and_prefixes_are_understood() -> None:
    a = pd.DataFrame(
        {
            "step": [0, 1],
            "grad_norm": [1.0, 2.0],
            "actor/grad_norm": [1.0, 1.0],
            "grad_norm/0.weight": [1.0, 1.0],
            "loss": [1.0, 2.0],
        }
    )
    b = a.drop(columns=["loss"])
    assert base_name("actor/grad_norm") == "grad_norm"
    assert base_name("grad_norm/0.weight") == "grad_norm/0.weight"
    assert feature_columns([a, b]) == ["actor/grad_norm", "grad_norm"]


def test_normalisation_is_robust_and_log_scaled() -> None:
    table = pd.DataFrame({"step": range(5), "grad_norm": [1.0, 10.0, 100.0, 1000.0, 1e6]})
    features = FeatureExtractor.fit([table])
    # log10 values 0,1,2,3,6: median 2, IQR 3-1 = 2 → scale 2/1.349
    assert features.center[0] == pytest.approx(2.0)
    assert features.scale[0] == pytest.approx(2.0 / 1.349)
    x = features.transform(table)
    assert x[:, 0] == pytest.approx((np.array([0, 1, 2, 3, 6]) - 2.0) * 1.349 / 2.0)
    assert x[:, -1].tolist() == [0.0] * 5  # no divergence


def test_missing_column_and_missing_values_carry_forward() -> None:
    healthy = synthetic_telemetry(0, n=50)
    features = FeatureExtractor.fit([healthy])
    without_loss = healthy.drop(columns=["loss"])
    x = features.transform(without_loss)
    assert x.shape == (50, features.dim)
    assert np.all(x[:, features.columns.index("loss")] == 0.0)  # the baseline median
    gaps = healthy.copy()
    gaps.loc[10:12, "loss"] = np.nan  # not logged on these steps, gradients fine
    xg = features.transform(gaps)
    j = features.columns.index("loss")
    assert xg[10:13, j] == pytest.approx([xg[9, j]] * 3)
    assert np.all(np.isfinite(xg))


def test_non_finite_values_clamp_and_flag_instead_of_crashing() -> None:
    healthy = synthetic_telemetry(0, n=50)
    features = FeatureExtractor.fit([healthy])
    broken = healthy.copy()
    broken.loc[30, "grad_norm"] = math.inf
    broken.loc[31, "grad_norm"] = math.nan
    broken.loc[31, "loss"] = math.nan
    broken.loc[32, "nonfinite_grads"] = 7.0
    x = features.transform(broken)
    assert np.all(np.isfinite(x)) and np.abs(x).max() <= CLIP
    assert np.all(x[30:33] == CLIP)  # every feature at the clip, divergence flag on
    assert x[29, -1] == 0.0


def test_online_rows_equal_the_offline_table() -> None:
    healthy = synthetic_telemetry(1, n=40)
    features = FeatureExtractor.fit([synthetic_telemetry(0, n=40)])
    table = healthy.copy()
    table.loc[5:7, "loss"] = np.nan
    table.loc[20, "grad_norm"] = math.inf
    offline = features.transform(table)
    features.reset()
    rows = [
        {
            k: (None if isinstance(v, float) and math.isnan(v) and k == "loss" else v)
            for k, v in r.items()
        }
        for r in table.to_dict("records")
    ]
    online = np.stack([features.transform_row(r) for r in rows])
    np.testing.assert_allclose(online, offline, atol=1e-12)
