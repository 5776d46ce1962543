"""Feature extraction: transforms, robust normalisation, missing columns, non-finite values."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest

from monitor_synthetic import synthetic_telemetry
from stabilitybench.monitor.features import (
    CLIP,
    FeatureExtractor,
    base_name,
    control_columns,
    feature_columns,
    layer_of,
)


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
    assert base_name("attn_logit_max/2") == "attn_logit_max"  # one column per block
    assert layer_of("attn_logit_max/2") == "2" and layer_of("grad_norm") is None
    features, excluded = feature_columns([a, b])
    assert features == ["actor/grad_norm", "grad_norm"]
    assert excluded == {"loss": "missing from some healthy runs"}


def _with_controls(seed: int) -> pd.DataFrame:
    table = synthetic_telemetry(seed, n=60)  # has `lr`
    table["lr/group1"] = table["lr"] * 2
    table["ent_coef"] = 0.01
    table["perturbed"] = False
    table["attn_logit_max/0"] = 30.0 + seed + np.arange(60) * 0.1
    return table


def test_the_controls_are_left_out_with_their_reason() -> None:
    tables = [_with_controls(s) for s in range(2)]
    features = FeatureExtractor.fit(tables)
    for control in ("lr", "lr/group1", "ent_coef", "perturbed"):
        assert control not in features.columns
    assert "attn_logit_max/0" in features.columns  # a measurement, per layer
    assert features.excluded["lr"].startswith("control: probe 'lr' records a setting")
    assert features.excluded["lr/group1"] == features.excluded["lr"]
    assert "entropy coefficient" in features.excluded["ent_coef"]
    assert features.excluded["perturbed"] == "control: the perturbation schedule's flag"
    # the ablation reads them, and says so
    ablation = FeatureExtractor.fit(tables, include_controls=True)
    assert {"lr", "ent_coef"} <= set(ablation.columns)
    assert ablation.include_controls and not any(
        why.startswith("control") for why in ablation.excluded.values()
    )
    restored = FeatureExtractor.from_dict(features.to_dict())
    assert restored.excluded == features.excluded and not restored.include_controls


def test_controls_come_from_the_declarations() -> None:
    from stabilitybench.perturbations.base import REGISTRY, Perturbation
    from stabilitybench.telemetry.base import Probe

    found = control_columns(knobs=["clip_range"])
    assert found["perturbed"] == "the perturbation schedule's flag"
    assert found["clip_range"] == "the knob 'clip_range'"

    class TemperatureProbe(Probe):
        name = "temperature_echo"
        columns: ClassVar[dict[str, str | None]] = {"temperature": "log"}
        controls = frozenset({"temperature"})

    class SetsMomentum(Perturbation):
        name = "sets_momentum_test"
        dimension = "optimization"
        sets_columns = ("momentum_echo",)

    REGISTRY.register(SetsMomentum.name, SetsMomentum)
    try:
        found = control_columns()
        assert found["temperature"] == (
            "probe 'temperature_echo' records a setting, not a measurement"
        )
        assert found["momentum_echo"] == "set by the perturbation 'sets_momentum_test'"
    finally:
        REGISTRY.unregister(SetsMomentum.name)
    assert "lr" in control_columns() and control_columns()["lr"].startswith("probe 'lr'")


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


def test_unclipped_view_keeps_the_distance_and_marks_divergence_infinite() -> None:
    healthy = synthetic_telemetry(0, n=50)
    features = FeatureExtractor.fit([healthy])
    far = healthy.copy()
    far.loc[40:, "grad_norm"] = 1e40  # 40 decades out: far beyond the clip
    far.loc[45, "grad_norm"] = math.inf
    raw = features.transform(far, clip=False)
    j = features.columns.index("grad_norm")
    assert raw[40, j] > 10 * CLIP
    assert np.isinf(raw[45]).all()
    np.testing.assert_array_equal(features.transform(far), np.clip(raw, -CLIP, CLIP))


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


def test_change_view_is_the_transformed_change_over_the_window() -> None:
    # grad_norm 1, 10, 100, 1000, 1000 is log10 0, 1, 2, 3, 3: over a 2-row window (the first
    # row before that) the changes are 0, 1, 2, 2, 1; normalised by centre 1 and scale 0.5.
    table = pd.DataFrame({"step": range(5), "grad_norm": [1.0, 10.0, 100.0, 1000.0, 1000.0]})
    features = FeatureExtractor(
        ["grad_norm"],
        np.asarray([0.0]),
        np.asarray([2.0]),
        view="change",
        change_window=2,
        change_center=np.asarray([1.0]),
        change_scale=np.asarray([0.5]),
    )
    assert features.names == ["delta:grad_norm", "nonfinite"]
    x = features.transform(table)
    np.testing.assert_allclose(x[:, 0], [-2.0, 0.0, 2.0, 2.0, 0.0], atol=1e-9)
    both = dataclasses.replace(features, view="level+change")
    assert both.names == ["grad_norm", "delta:grad_norm", "nonfinite"]
    np.testing.assert_allclose(both.transform(table)[:, 0], [0.0, 0.5, 1.0, 1.5, 1.5], atol=1e-9)


def test_change_view_fits_its_centre_and_scale_and_runs_online() -> None:
    healthy = [synthetic_telemetry(seed, n=60) for seed in (0, 1)]
    features = FeatureExtractor.fit(healthy, view="change", change_window=4, exclude=["loss"])
    assert "loss" not in features.columns and "loss" in features.excluded
    assert features.change_center is not None and features.change_scale is not None
    x = np.concatenate([features.transform(t, clip=False) for t in healthy])
    # on the runs it was fitted on, each change feature has median 0
    np.testing.assert_allclose(np.median(x[:, :-1], axis=0), 0.0, atol=1e-9)
    table = synthetic_telemetry(2, n=60)
    table.loc[20, "grad_norm"] = math.inf
    offline = features.transform(table, clip=False)
    assert np.isinf(offline[20]).all()
    assert np.isfinite(offline[21:]).all()  # after it the change reads the last finite level
    features.reset()
    online = np.stack([features.transform_row(r, clip=False) for r in table.to_dict("records")])
    np.testing.assert_allclose(online, offline, atol=1e-12)
    again = FeatureExtractor.from_dict(features.to_dict())
    np.testing.assert_allclose(again.transform(table, clip=False), offline, atol=1e-12)


def test_an_unknown_view_is_one_clear_error() -> None:
    from stabilitybench.errors import StabilityBenchError

    with pytest.raises(StabilityBenchError, match="feature_view must be one of level, change"):
        FeatureExtractor(["grad_norm"], np.zeros(1), np.ones(1), view="slope")


def test_a_role_that_did_not_step_is_missing_not_diverged() -> None:
    """TD3 steps its actor every `policy_delay` critic steps: the actor's columns are empty on the
    other rows. That is no divergence (it used to score every other TD3 step +inf); a missing
    grad norm on a row where the role stepped (its `nonfinite_grads` recorded) still is."""
    from stabilitybench.monitor.features import divergence_mask

    def two_roles(seed: int) -> pd.DataFrame:
        base = synthetic_telemetry(seed, n=40)
        table = pd.DataFrame({"step": base["step"]})
        for role in ("critic", "actor"):
            for column in ("grad_norm", "update_ratio", "nonfinite_grads"):
                table[f"{role}/{column}"] = base[column].to_numpy(dtype=float)
        table.loc[table.index % 2 == 0, [c for c in table if c.startswith("actor/")]] = np.nan
        return table

    features = FeatureExtractor.fit([two_roles(0)])
    table = two_roles(1)
    assert not divergence_mask(table).any()
    x = features.transform(table, clip=False)
    assert np.all(np.isfinite(x)) and np.all(x[:, -1] == 0.0)
    stepped = table.copy()
    stepped.loc[5, "actor/grad_norm"] = np.nan  # the actor stepped (counter 0) with no norm
    assert divergence_mask(stepped).tolist() == [i == 5 for i in range(40)]
    features.reset()
    online = np.stack([features.transform_row(r) for r in table.to_dict("records")])
    np.testing.assert_allclose(online, features.transform(table), atol=1e-12)
