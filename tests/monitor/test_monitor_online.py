"""Every detector that runs online gives, row by row, what it gives offline (and resets)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stabilitybench.monitor.registry import DetectorSettings, detector_classes

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
            "adam_rms_max": 0.8 + 0.1 * rng.random(n),  # the build-up probes (adam_rms, eos)
            "eos_ratio": 0.3 * rng.standard_normal(n),
        }
    )
    table.loc[0, ["adam_rms_max", "eos_ratio"]] = np.nan  # not measured before the first update
    if spike is not None:
        table.loc[spike, ["grad_norm", "loss"]] = [40.0, 9.0]
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
