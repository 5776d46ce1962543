"""Every detector that runs online gives, row by row, what it gives offline (and resets)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from stabilitybench.detectors.base import DetectorSettings, detector_classes

FAST = {"max_epochs": 2, "window": 32, "hidden": 8}


def _table(seed: int, n: int = 260, spike: int | None = None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    table = pd.DataFrame(
        {
            "step": np.arange(n),
            "grad_norm": 1 + 0.1 * rng.random(n),
            "loss": 2 - np.linspace(0, 1, n) + 0.05 * rng.random(n),
            "update_ratio": 1e-3 * (1 + 0.1 * rng.random(n)),
            "grad_cos_prev": 0.2 * rng.standard_normal(n),
            "grad_cos_ema": 0.5 + 0.02 * rng.standard_normal(n),  # coherence
            "adam_rms_max": 0.8 + 0.1 * rng.random(n),  # the build-up probes (adam_rms, eos)
            "eos_ratio": 0.3 * rng.standard_normal(n),
        }
    )
    table.loc[0, ["adam_rms_max", "eos_ratio"]] = np.nan  # not measured before the first update
    if spike is not None:
        table["perturbed"] = (table["step"] >= spike - 10) & (table["step"] < spike)  # clock
        table.loc[spike, ["grad_norm", "loss", "grad_cos_ema"]] = [40.0, 9.0, 0.1]
        table.loc[spike + 20 :, "grad_norm"] *= np.linspace(1, 3, n - spike - 20)
        table.loc[spike, ["adam_rms_max", "eos_ratio"]] = [6.0, 2.5]
    return table


@pytest.mark.parametrize("name", list(detector_classes()))
def test_online_update_equals_offline_score(name: str) -> None:
    cls = detector_classes()[name]
    assert cls.online, f"{name} should support the online path"
    settings = DetectorSettings(latent_dim=2, seed=0, monitor_options=FAST)
    detector = cls.create(settings)
    if cls.fitted:
        detector = detector.fit([_table(1), _table(2), _table(3)])
    run = _table(0, spike=150)
    offline = detector.score(run)
    for _ in range(2):  # a second pass after reset() starts afresh
        detector.reset()
        online = [detector.update(row) for row in run.to_dict("records")]
        np.testing.assert_allclose(online, offline, rtol=1e-7, atol=1e-9, err_msg=name)
    assert np.isfinite(offline).any()
    assert detector.native(offline).dtype == bool


def test_the_monitor_does_not_score_its_warm_up_rows_unless_they_are_non_finite() -> None:
    from stabilitybench.monitor.ssm import MetaStateMonitor

    monitor = MetaStateMonitor(latent_dim=2, seed=0, **FAST)
    monitor.fit([_table(1), _table(2), _table(3)])
    run = _table(0, spike=3)  # a spike inside the first `warmup_steps` rows
    scored = monitor.score(run)
    msd = scored["msd"].to_numpy()
    warm = monitor.config.warmup_steps
    assert warm == 8 and np.all(msd[:warm] == 0.0)
    # The smoothing starts at the first scored row, from the healthy centre (0): one row moves
    # it by `ema` × its deviation.
    first = max(scored[f"msd_{term}"][warm] for term in monitor.config.terms)
    assert msd[warm] == pytest.approx(monitor.config.ema * first) and first != 0.0
    run.loc[2, "grad_norm"] = np.inf
    msd = monitor.score(run)["msd"].to_numpy()
    assert msd[2] == np.inf and msd[1] == 0.0


@pytest.mark.parametrize("name", ["msm", "zclip"])
def test_going_back_to_an_online_state_forgets_the_rows_fed_since(name: str) -> None:
    cls = detector_classes()[name]
    detector = cls.create(DetectorSettings(latent_dim=2, seed=0, monitor_options=FAST))
    if cls.fitted:
        detector = detector.fit([_table(1), _table(2), _table(3)])
    rows = _table(0, spike=150).to_dict("records")
    detector.reset()
    straight = [detector.update(r) for r in rows[:150] + rows[151:]]  # row 150 never fed
    detector.reset()
    rewound = [detector.update(r) for r in rows[:150]]
    state = detector.online_state()
    detector.update(rows[150])  # the spike, then taken back
    detector.set_online_state(state)
    rewound += [detector.update(r) for r in rows[151:]]
    if cls.rewind_on_undo:
        np.testing.assert_allclose(rewound, straight, rtol=1e-12)
    else:
        # A reactive guard keeps its running statistics (its `online_state` is None): the spike
        # stays in them, and the scores after it differ from a run that never had it.
        assert state is None and not np.allclose(rewound[150:], straight[150:])


@pytest.mark.parametrize("view", ["change", "level+change"])
def test_the_monitor_on_change_features_runs_online_as_offline(view: str) -> None:
    from stabilitybench.monitor.ssm import MetaStateMonitor

    options = {**FAST, "feature_view": view, "change_window": 8, "exclude_features": ["loss"]}
    monitor = MetaStateMonitor(latent_dim=2, seed=0, **options)
    monitor.fit([_table(1), _table(2), _table(3)])
    assert monitor.features is not None and "loss" not in monitor.features.columns
    assert "delta:grad_norm" in monitor.fit_info["features"]
    run = _table(0, spike=150)
    offline = monitor.score(run)["msd"].to_numpy()
    monitor.reset()
    online = [monitor.step(row) for row in run.to_dict("records")]
    np.testing.assert_allclose(online, offline, rtol=1e-7, atol=1e-9)
    assert offline[150] > offline[140]  # the spike is a change too


def test_the_relative_monitor_scores_the_rise_above_its_own_floor_online_as_offline() -> None:
    from stabilitybench.monitor.ssm import MetaStateMonitor

    plain = MetaStateMonitor(latent_dim=2, seed=0, **FAST).fit([_table(1), _table(2), _table(3)])
    relative = MetaStateMonitor(latent_dim=2, seed=0, relative=True, **FAST)
    relative.fit([_table(1), _table(2), _table(3)])
    run = _table(0, spike=150)
    msd = plain.score(run)["msd"].to_numpy()
    rise = relative.score(run)["msd"].to_numpy()
    warm = plain.config.warmup_steps
    floor = np.minimum.accumulate(msd[warm:])
    np.testing.assert_allclose(rise[warm:], msd[warm:] - floor, atol=1e-9)
    assert (rise[:warm] == 0).all() and (rise >= 0).all()
    relative.reset()
    online = [relative.step(row) for row in run.to_dict("records")]
    np.testing.assert_allclose(online, rise, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"feature_view": "slope"}, "feature_view must be one of level, change, level+change"),
        ({"change_window": 0}, "change_window must be an integer >= 1; got 0"),
    ],
)
def test_bad_monitor_feature_options_are_one_clear_error(
    options: dict[str, object], message: str
) -> None:
    from stabilitybench.errors import StabilityBenchError
    from stabilitybench.monitor.ssm import MetaStateMonitor

    with pytest.raises(StabilityBenchError, match=re.escape(message)):
        MetaStateMonitor(latent_dim=2, **options)  # type: ignore[arg-type]
