"""Baseline detectors on hand-made series, against their reference implementations."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pandas as pd
import pytest

from stabilitybench.detectors import builtin as det
from stabilitybench.detectors import scores as score_fns
from stabilitybench.detectors.pca import PCADetector


def _frame(grad_norm: np.ndarray, loss: np.ndarray | None = None) -> pd.DataFrame:
    data = {"step": np.arange(len(grad_norm)), "grad_norm": grad_norm}
    if loss is not None:
        data["loss"] = loss
    return pd.DataFrame(data)


def _noise(n: int, seed: int = 0, level: float = 1.0) -> np.ndarray:
    return level + 0.05 * np.random.default_rng(seed).standard_normal(n)


def _smooth(n: int) -> np.ndarray:
    """A flat series with a gentle wobble (bounded z-scores, no spike)."""
    return 1.0 + 0.05 * np.sin(np.arange(n) / 3.0)


def test_zclip_warmup_spike_and_flat() -> None:
    assert not det.ZClipDetector().alarms(_frame(_smooth(300))).any()
    flat = _noise(300)
    early = flat.copy()
    early[10] = 100.0  # inside the 25-step warm-up: never an alarm
    assert score_fns.zclip_scores(early)[:25].tolist() == [0.0] * 25
    spiky = _smooth(300)
    spiky[200] = 5.0
    alarms = det.ZClipDetector().alarms(_frame(spiky))
    assert alarms[200] and alarms.sum() == 1
    # first z after warm-up, worked out by hand from the warm-up mean/variance
    warm = flat[:25]
    z = (flat[25] - warm.mean()) / (warm.std() + 1e-6)
    assert score_fns.zclip_scores(flat)[25] == pytest.approx(z)


def test_zclip_locks_in_after_a_lasting_jump_of_the_norm() -> None:
    # The published rule feeds the clipped value back into the EMA: after a jump of the norm's
    # level (PPO's pre-clip norm jumps several-fold when a new rollout's value targets arrive),
    # the clipped value is about the old mean, the variance decays by alpha every step, and z
    # never comes back (benchmarks/zclip_lockin.py measures it on PPO HalfCheetah).
    rng = np.random.default_rng(0)
    level = np.r_[np.full(300, 10.0), np.full(700, 50.0)]  # a x5 jump at step 300
    z = score_fns.zclip_scores(level * (1 + 0.1 * rng.standard_normal(1000)))
    assert (z[:300] > 2.5).mean() < 0.05
    assert (z[300:] > 2.5).all()  # every update after the jump alarms ...
    assert z[-1] > 1e4  # ... ever louder
    milder = np.r_[np.full(300, 10.0), np.full(700, 15.0)]  # x1.5: the EMA absorbs it
    z = score_fns.zclip_scores(milder * (1 + 0.1 * rng.standard_normal(1000)))
    assert (z[300:] > 2.5).mean() < 0.1 and z[-1] < 2.5


def test_olmo_needs_a_full_window_and_uses_six_sigma() -> None:
    values = _noise(300, seed=1)
    values[100] = 50.0  # before 128 values of history: not judged
    values[250] = 50.0
    scores = score_fns.rolling_zscores(values, 128)
    assert scores[100] == 0.0
    history = values[250 - 128 : 250]
    assert scores[250] == pytest.approx((50.0 - history.mean()) / history.std())
    alarms = det.OLMoDetector().alarms(_frame(values, loss=_noise(300, seed=2)))
    assert alarms[250] and alarms.sum() == 1
    assert not det.OLMoDetector().alarms(_frame(_smooth(300), loss=_smooth(300))).any()


def test_lightning_matches_spike_detection_source() -> None:
    pytest.importorskip("torchmetrics")
    import torch
    from lightning.fabric.utilities.spike import SpikeDetection

    rng = np.random.default_rng(3)
    loss = 1.0 + 0.1 * rng.random(60)
    loss[30] = 3.5  # 3.5 - ~1.05 ≥ 2 × ~1.05: a spike
    loss[45] = 2.0  # below rtol: not a spike
    reference = SpikeDetection(window=10, rtol=2.0, warmup=1)
    expected = []
    for i, value in enumerate(loss):  # on_train_batch_end without a Fabric
        tensor = torch.tensor(value)
        spike = bool(i >= reference.warmup and reference._is_spike(tensor))
        expected.append(spike)
        if not spike:
            reference._update_stats(tensor)
    ours = det.LightningDetector().alarms(_frame(np.ones(60), loss=loss))
    assert ours.tolist() == expected
    assert ours[30] and not ours[45]


def test_megatron_ten_times_the_max_of_the_first_hundred() -> None:
    loss = np.full(200, 1.0)
    loss[50] = 2.0  # the max of the first 100 values
    loss[150] = 19.9
    loss[160] = 20.0
    alarms = det.MegatronDetector().alarms(_frame(np.ones(200), loss=loss))
    assert np.flatnonzero(alarms).tolist() == [160]
    loss[170] = math.inf  # a divergence
    assert det.MegatronDetector().alarms(_frame(np.ones(200), loss=loss))[170]


LOSS_GUARDS = (det.OLMoDetector, det.LightningDetector, det.MegatronDetector, det.EWSDetector)


def _sparse_loss_frame(n: int = 400, every: int = 40) -> pd.DataFrame:
    """A PPO-like run: a grad norm every step, the loss logged once per 'rollout' (NaN between)."""
    frame = _frame(_noise(n, seed=5), loss=np.full(n, np.nan))
    frame.loc[::every, "loss"] = _noise(n // every, seed=6)
    frame["nonfinite_grads"] = 0
    return frame


@pytest.mark.parametrize("cls", LOSS_GUARDS, ids=lambda c: c.name)
def test_a_loss_that_was_not_logged_is_missing_not_a_divergence(cls: type) -> None:
    frame = _sparse_loss_frame()
    scores = cls().score(frame)
    assert not np.isinf(scores).any(), cls.name  # 390 rows without a loss: none scores inf
    assert not cls().alarms(frame)[1:40].any()
    online = cls()
    np.testing.assert_allclose([online.update(r) for r in frame.to_dict("records")], scores)


@pytest.mark.parametrize("cls", LOSS_GUARDS, ids=lambda c: c.name)
def test_a_genuinely_non_finite_loss_is_still_an_alarm(cls: type) -> None:
    frame = _sparse_loss_frame()
    frame.loc[200, "loss"] = math.inf  # stored as inf: a divergence
    # NaN on a row that recorded non-finite gradients: the divergence the store wrote as null
    frame.loc[300, ["loss", "nonfinite_grads"]] = [math.nan, 12]
    frame.loc[300, "grad_norm"] = math.nan
    scores = cls().score(frame)
    assert scores[200] == math.inf and scores[300] == math.inf, cls.name
    online = cls()
    assert [online.update(r) for r in frame.to_dict("records")][300] == math.inf


def test_missing_values_are_skipped_not_counted() -> None:
    # Megatron's anchor is the max of the first 100 *logged* losses: with a loss every other
    # step, the anchor covers the first 200 steps, so the spike at step 150 is still in it.
    loss = np.full(400, np.nan)
    loss[::2] = 1.0
    loss[150] = 5.0
    loss[300] = 49.0  # 9.8 × 5: not a spike; 10 × 1 would have been
    scores = score_fns.megatron_scores(loss)
    assert np.isnan(scores[1::2]).all() and scores[150] == 0.0
    assert scores[300] == pytest.approx(49.0 / 5.0)
    # OLMo's window holds the previous 128 logged values
    values = np.where(np.arange(600) % 3 == 0, _noise(600, seed=7), np.nan)
    values[450] = 50.0
    z = score_fns.rolling_zscores(values, 128)
    history = values[:450][~np.isnan(values[:450])][-128:]
    assert z[450] == pytest.approx((50.0 - history.mean()) / history.std())
    assert np.isnan(z[451])


def test_online_update_equals_offline_score() -> None:
    rng = np.random.default_rng(4)
    frame = _frame(1 + 0.1 * rng.random(250), loss=1 + 0.1 * rng.random(250))
    frame.loc[200, "grad_norm"] = 9.0
    frame.loc[210, "loss"] = 9.0
    for detector_cls in (
        det.ZClipDetector,
        det.OLMoDetector,
        det.LightningDetector,
        det.MegatronDetector,
    ):
        offline = detector_cls().score(frame)
        online_detector = detector_cls()
        online = [online_detector.update(row) for row in frame.to_dict("records")]
        np.testing.assert_allclose(online, offline, rtol=1e-9, atol=1e-9, err_msg=detector_cls.name)


def _import_ewstools():  # type: ignore[no-untyped-def]
    """ewstools imports `arch` only for bootstrapping; an arch release broken by pandas 3 is stubbed."""
    try:
        import ewstools
    except TypeError:
        stub = types.ModuleType("arch.bootstrap")
        stub.StationaryBootstrap = stub.CircularBlockBootstrap = stub.IIDBootstrap = object  # type: ignore[attr-defined]
        sys.modules["arch"] = types.ModuleType("arch")
        sys.modules["arch.bootstrap"] = stub
        import ewstools
    return ewstools


def test_rolling_variance_and_lag1_autocorrelation_match_ewstools() -> None:
    ewstools = _import_ewstools()
    rng = np.random.default_rng(5)
    x = np.zeros(200)
    for t in range(1, 200):  # AR(1) with slowly rising memory: a critical-slowing-down toy
        x[t] = (0.2 + 0.7 * t / 200) * x[t - 1] + rng.standard_normal()
    series = ewstools.TimeSeries(pd.Series(x))
    series.detrend(method="Gaussian", bandwidth=0.2)
    series.compute_var(rolling_window=0.25)
    series.compute_auto(rolling_window=0.25, lag=1)
    residuals = series.state["residuals"].to_numpy()
    window = int(0.25 * 200)
    np.testing.assert_allclose(
        score_fns.rolling_variance(residuals, window), series.ews["variance"].to_numpy(), rtol=1e-8
    )
    np.testing.assert_allclose(
        score_fns.rolling_lag1_autocorrelation(residuals, window),
        series.ews["ac1"].to_numpy(),
        rtol=1e-8,
    )


def test_rolling_kendall_tau_matches_scipy() -> None:
    from scipy.stats import kendalltau

    values = np.random.default_rng(6).standard_normal(40).cumsum()
    taus = score_fns.rolling_kendall_tau(values, 15)
    for end in (14, 25, 39):
        window = values[end - 14 : end + 1]
        assert taus[end] == pytest.approx(kendalltau(np.arange(15), window).statistic)
    assert np.isnan(taus[13])


def test_rolling_kendall_tau_is_tau_a_over_every_pair_with_ties_and_gaps() -> None:
    """Tau-a (ties count 0, over all w(w−1)/2 pairs) of each full window, exactly; a window
    holding a NaN is NaN."""
    rng = np.random.default_rng(8)
    values = np.round(rng.standard_normal(120), 1)  # many ties
    values[[30, 31, 90]] = np.nan
    window = 12
    taus = score_fns.rolling_kendall_tau(values, window)
    pairs = window * (window - 1) / 2
    for end in range(window - 1, len(values)):
        win = values[end - window + 1 : end + 1]
        if np.isnan(win).any():
            assert np.isnan(taus[end])
            continue
        by_hand = sum(np.sign(win[j] - win[i]) for i in range(window) for j in range(i + 1, window))
        assert taus[end] == by_hand / pairs
    assert np.isnan(taus[: window - 1]).all()


def test_ews_rises_on_critical_slowing_down_and_stays_low_on_white_noise() -> None:
    rng = np.random.default_rng(7)
    n = 400
    white = 1.0 + 0.05 * rng.standard_normal(n)
    slowing = np.ones(n)
    for t in range(1, n):
        phi = 0.1 + 0.85 * max(0, t - 200) / 200
        slowing[t] = (
            1.0
            + phi * (slowing[t - 1] - 1.0)
            + 0.05 * (1 + 3 * max(0, t - 200) / 200) * rng.standard_normal()
        )
    calm = score_fns.ews_scores(white, white)
    rising = score_fns.ews_scores(slowing, slowing)
    assert np.nanmax(rising[300:]) > 0.8
    assert np.mean(rising[300:]) > np.mean(calm[300:]) + 0.2


def test_pca_mahalanobis_is_chi_like_on_baseline_and_large_on_an_outlier() -> None:
    rng = np.random.default_rng(8)
    tables = []
    for _ in range(4):
        g = np.exp(0.3 * rng.standard_normal(300))
        tables.append(
            pd.DataFrame(
                {
                    "step": np.arange(300),
                    "grad_norm": g,
                    "update_norm": g * 1e-3,
                    "grad_cos_prev": 0.2 * rng.standard_normal(300),
                }
            )
        )
    pca = PCADetector(latent_dim=2).fit(tables)
    scores = np.concatenate([pca.score(t) for t in tables])
    assert np.mean(scores**2) == pytest.approx(2.0, rel=0.05)  # E[d²] = k on the fitted data
    outlier = tables[0].copy()
    outlier.loc[100, ["grad_norm", "update_norm"]] = [100.0, 0.1]
    assert pca.score(outlier)[100] > 5 * np.sqrt(2.0)
    assert pca.alarms(outlier)[100]


def test_adam_rms_is_the_largest_rms_over_optimizers_with_the_stableadamw_rule() -> None:
    frame = pd.DataFrame(
        {
            "step": np.arange(5),
            "actor/adam_rms_max": [np.nan, 0.9, 1.0, 1.4, np.nan],
            "critic/adam_rms_max": [np.nan, 1.2, 0.7, np.nan, np.nan],
            "critic/nonfinite_grads": [0, 0, 0, 0, 3],
        }
    )
    detector = det.AdamRMSDetector()
    scores = detector.score(frame)
    # row 0: not measured (NaN); row 4: NaN on a row with non-finite gradients: a divergence
    np.testing.assert_array_equal(scores, [np.nan, 1.2, 1.0, 1.4, np.inf])
    assert detector.native(scores).tolist() == [False, True, False, True, True]  # RMS > 1
    online = [detector.update(r) for r in frame.to_dict("records")]
    np.testing.assert_array_equal(online, scores)


def test_eos_crosses_its_stability_limit_at_one() -> None:
    frame = pd.DataFrame({"step": np.arange(4), "eos_ratio": [np.nan, 0.5, 1.0, 3.0]})
    detector = det.EdgeOfStabilityDetector()
    scores = detector.score(frame)
    np.testing.assert_array_equal(scores, [np.nan, 0.5, 1.0, 3.0])
    assert detector.native(scores).tolist() == [False, False, False, True]  # strictly above 1
    no_probe = pd.DataFrame({"step": np.arange(3), "loss": [1.0, 2.0, 3.0]})
    assert np.isnan(detector.score(no_probe)).all()  # a run without the probe is not scored
