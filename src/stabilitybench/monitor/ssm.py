"""The Meta-State Monitor: a GRU state-space model of healthy training and its deviation score.

A GRU encoder reads the per-step feature vector (features.py, the clipped view) into a hidden
state; a linear map gives the k-dimensional latent meta-state z_t; a small decoder predicts the
next step's features from z_t. Trained on healthy runs (truncated windows, Adam, early stopping on
held-out healthy runs). The meta-state deviation (MSD) of a step combines up to three terms, each
standardised per progress bin (step / run length) on held-out healthy runs (median, IQR / 1.349):

- `latent`: the Mahalanobis distance of z_t to the healthy latent distribution of its bin,
- `prediction`: the RMS error of the one-step prediction of the (unclipped) features,
- `features`: the Mahalanobis distance of the unclipped features to their healthy distribution
  in the bin (shrunk covariance) — the linear meta-state beside the learned one,

`raw_t = max(terms)`, smoothed by an EMA: `msd_t`. The GRU's state is bounded (tanh), so the
latent term alone saturates far from healthy training; the prediction and feature terms grow
linearly with the distance, so the MSD keeps growing with it. A non-finite step scores +inf (and
leaves the smoothing state as it was). An alarm is `msd_t >= threshold`, the threshold chosen on
held-out healthy runs for a target rate of false alarms (up-crossings) per 1,000 steps.

Inference runs in float64 numpy with the trained weights (the same code path online and
offline), so `step(row)` costs tens of microseconds and equals `score(run)` step by step.
Saved as `model.safetensors` (weights and reference statistics) + `monitor.json` (config).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from stabilitybench.errors import StabilityBenchError
from stabilitybench.metrics.alarms import calibrate_threshold
from stabilitybench.monitor.features import (
    CLIP,
    DEFAULT_CHANGE_WINDOW,
    FeatureExtractor,
    check_view,
)
from stabilitybench.store import RunInfo

if TYPE_CHECKING:
    from stabilitybench.monitor.attribution import MonitorAttribution

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "monitor.json"
FORMAT_VERSION = 2
TERMS = ("latent", "prediction", "features")  # the deviation terms, in the order of `terms`
DEFAULT_TERMS = ("prediction", "features")


@dataclass
class MonitorConfig:
    """Hyper-parameters of the monitor (all saved in monitor.json)."""

    latent_dim: int = 4
    hidden: int = 32
    decoder_hidden: int = 32
    window: int = 64  # training window length, optimizer steps
    batch_size: int = 32
    max_epochs: int = 40
    patience: int = 5
    lr: float = 3e-3
    bins: int = 10  # progress bins for the baseline reference
    ema: float = 0.1  # smoothing weight of the newest raw deviation (chosen on build-up audits)
    shrinkage: float = 0.1  # covariance shrinkage towards the diagonal
    target_false_alarms: float = 1.0  # per 1,000 steps, on held-out baseline runs
    seed: int = 0
    # Which deviation terms the MSD is the max of. The latent term is computed (msd_latent) but
    # left out by default: on the build-up audits it added false alarms and no lead
    # (benchmarks/monitor_model_selection.py; README, "Choosing the model").
    terms: tuple[str, ...] = DEFAULT_TERMS
    feature_shrinkage: float = 0.5  # of the features' per-bin covariance towards its diagonal
    feature_floor: float = 0.5  # smallest per-bin std of a feature, in its normalised units
    include_controls: bool = False  # ablation: read the columns the audit controls too
    warmup_steps: int = 8  # first rows of a run that are not scored (MSD 0: a fresh state)
    # What the monitor reads of each column (features.VIEWS): its level, its change over the
    # last `change_window` rows, or both. `feature_view`, `exclude_features` and `relative`
    # default to the level monitor: on lm_buildup the change view or the relative MSD raised
    # the event recall (0.38 → up to 0.88) but no variant raised both recall and step AUROC on
    # rl_buildup's PPO as well without a worse quickstart (benchmarks/monitor_variants.py).
    feature_view: str = "level"
    change_window: int = DEFAULT_CHANGE_WINDOW
    # Columns (base names, e.g. `param_norm`) left out of the features, beside the controls.
    exclude_features: tuple[str, ...] = ()
    # The MSD as the smoothed deviation's rise above its own running minimum in the run (after
    # the warm-up): a deviation a run has had since its start (its recipe) is not scored.
    relative: bool = False

    def __post_init__(self) -> None:
        self.terms = tuple(self.terms)
        self.exclude_features = tuple(self.exclude_features)
        check_view(self.feature_view, self.change_window, where="monitor ")
        unknown = sorted(set(self.terms) - set(TERMS))
        if unknown or not self.terms:
            raise StabilityBenchError(
                f"monitor terms must be a non-empty subset of {', '.join(TERMS)}; got "
                f"{', '.join(self.terms) or 'none'}"
            )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class MetaStateMonitor:
    """Learn a low-dimensional meta-state of healthy training; score how far a run strays from it."""

    def __init__(self, latent_dim: int = 4, seed: int = 0, **options: Any) -> None:
        self.config = MonitorConfig(latent_dim=latent_dim, seed=seed, **options)
        self.features: FeatureExtractor | None = None
        self.weights: dict[str, np.ndarray] = {}
        self.reference: dict[str, np.ndarray] = {}
        self.horizon = 1  # baseline run length in optimizer steps (for progress)
        self.threshold = math.inf
        self.fit_info: dict[str, Any] = {}
        self.reset()

    # -- fitting --------------------------------------------------------------------------------
    def fit(self, runs: Sequence[Any], validation: Sequence[Any] | None = None) -> MetaStateMonitor:
        """Fit on baseline runs (RunData or telemetry DataFrames).

        `validation`: held-out baseline runs for early stopping and calibration. When omitted,
        the runs of the highest seed are held out if there are at least two seeds (plain tables
        without seeds: the last one, if there are at least three); otherwise the
        last 25% of every run's steps serve for early stopping and the training runs themselves
        for calibration (recorded in `fit_info["holdout"]`).
        """
        tables, val_tables, holdout = _split_holdout(runs, validation)
        all_tables = [*tables, *val_tables]
        self.features = FeatureExtractor.fit(
            all_tables,
            include_controls=self.config.include_controls,
            knobs=_knob_names(runs),
            view=self.config.feature_view,
            change_window=self.config.change_window,
            exclude=self.config.exclude_features,
        )
        self.horizon = int(np.median([_run_length(t) for t in all_tables]))
        train_raw = [self.features.transform(t, clip=False) for t in tables]
        val_raw = [self.features.transform(t, clip=False) for t in val_tables]
        train_x = [_clip(x) for x in train_raw]
        val_x = [_clip(x) for x in val_raw]
        train_steps = [_steps(t) for t in tables]
        val_steps = [_steps(t) for t in val_tables]
        epochs, best_loss = self._train(train_x, val_x)
        # The reference statistics come from the training runs only when there are held-out
        # runs, so the held-out runs that set the threshold are scored out of sample: with them
        # in the reference, a new healthy run sat above the threshold (an msm guard then acted on
        # nearly every step of it).
        if val_raw:
            self._fit_reference((train_raw, train_steps), (val_raw, val_steps))
        else:
            self._fit_reference((train_raw, train_steps), (train_raw, train_steps))
        self.fit_info = {
            "train_runs": len(tables),
            "validation_runs": len(val_tables),
            "holdout": holdout,
            "epochs": epochs,
            "best_validation_loss": best_loss,
            "features": self.features.names,
            "excluded_features": dict(self.features.excluded),
            "include_controls": self.features.include_controls,
            "terms": list(self.config.terms),
        }
        self.reset()
        return self

    def _train(self, train_x: list[np.ndarray], val_x: list[np.ndarray]) -> tuple[int, float]:
        """Train the network on windows of the features with early stopping; keeps the best
        weights in `self.weights` (float64). Returns (epochs run, best validation loss)."""
        import torch

        cfg = self.config
        assert self.features is not None
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        model = _Net(self.features.dim, cfg.hidden, cfg.latent_dim, cfg.decoder_hidden)
        train_windows, val_windows = _train_and_validation_windows(train_x, val_x, cfg.window)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        best_loss, best_state, bad_epochs, epochs = math.inf, None, 0, 0
        train_t = torch.as_tensor(train_windows, dtype=torch.float32)
        val_t = torch.as_tensor(
            val_windows if len(val_windows) else train_windows, dtype=torch.float32
        )
        for epoch in range(cfg.max_epochs):
            epochs = epoch + 1
            model.train()
            order = rng.permutation(len(train_t))
            for start in range(0, len(order), cfg.batch_size):
                batch = train_t[torch.as_tensor(order[start : start + cfg.batch_size])]  # (B, T, d)
                loss = model.loss(batch)
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
            model.eval()
            with torch.no_grad():
                val_loss = float(model.loss(val_t))
            if val_loss < best_loss - 1e-5:
                best_loss, bad_epochs = val_loss, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad_epochs += 1
                if bad_epochs >= cfg.patience:
                    break
        if best_state is not None:
            model.load_state_dict(best_state)
        self.weights = {
            k: v.detach().double().numpy().copy() for k, v in model.state_dict().items()
        }
        return epochs, best_loss

    def _fit_reference(
        self,
        reference: tuple[list[np.ndarray], list[np.ndarray]],
        calibration: tuple[list[np.ndarray], list[np.ndarray]],
    ) -> None:
        """Per-bin latent and feature mean/precision, then per-bin standardisation of each
        term and the threshold.

        Each argument is (unclipped features (n_i, d) per run, steps (n_i,) per run).
        """
        cfg = self.config
        reference_x, reference_steps = reference
        calibration_x, calibration_steps = calibration
        latents = np.concatenate([self._raw_pass(_clip(x))[0] for x in reference_x])
        features = np.concatenate(reference_x)
        features = np.where(np.isfinite(features), features, np.nan)
        bin_ids = np.concatenate([self._bins(s) for s in reference_steps])
        latent_mean, latent_precision = _binned_gaussian(
            latents, bin_ids, cfg.bins, cfg.shrinkage, floor=1e-3
        )
        feature_mean, feature_precision = _binned_gaussian(
            features, bin_ids, cfg.bins, cfg.feature_shrinkage, floor=cfg.feature_floor
        )
        self.reference = {
            "latent_mean": latent_mean,
            "latent_precision": latent_precision,
            "feature_mean": feature_mean,
            "feature_precision": feature_precision,
        }
        for term in TERMS:
            self.reference[f"{term}_center"] = np.zeros(cfg.bins)
            self.reference[f"{term}_spread"] = np.ones(cfg.bins)
        self._standardise(calibration_x, calibration_steps)
        self.threshold = math.inf
        cal_scores = [
            self._score_features(x, s)[0]
            for x, s in zip(calibration_x, calibration_steps, strict=True)
        ]
        self.threshold = calibrate_threshold(cal_scores, cfg.target_false_alarms)

    def _standardise(
        self, calibration_x: list[np.ndarray], calibration_steps: list[np.ndarray]
    ) -> None:
        """Per-bin robust centre and spread of each term on the calibration runs."""
        values: dict[str, list[np.ndarray]] = {term: [] for term in TERMS}
        cal_bins = []
        for x, steps in zip(calibration_x, calibration_steps, strict=True):
            terms = self._term_pass(x, steps)
            for term in TERMS:
                values[term].append(terms[term])
            cal_bins.append(self._bins(steps))
        bin_all = np.concatenate(cal_bins)
        for term in TERMS:
            all_values = np.concatenate(values[term])
            for b in range(self.config.bins):
                vb = all_values[bin_ids_or_all(bin_all, b)]
                vb = vb[np.isfinite(vb)]
                center = float(np.median(vb)) if vb.size else 0.0
                spread = (
                    float(np.percentile(vb, 75) - np.percentile(vb, 25)) / 1.349 if vb.size else 1.0
                )
                self.reference[f"{term}_center"][b] = center
                self.reference[f"{term}_spread"][b] = max(spread, 1e-3)

    def _bins(self, steps: np.ndarray) -> np.ndarray:
        """Progress bin of each optimizer step (steps: (n,) int) → (n,) int."""
        bins = (np.asarray(steps, dtype=np.int64) * self.config.bins) // max(self.horizon, 1)
        return np.clip(bins, 0, self.config.bins - 1)

    def _bin(self, step: int) -> int:
        return min(max((step * self.config.bins) // max(self.horizon, 1), 0), self.config.bins - 1)

    # -- inference (numpy, float64) ------------------------------------------------------------
    def reset(self) -> None:
        """Start a new run for `step()`: zero hidden state, step counter and smoothing."""
        self._h = np.zeros(self.config.hidden)
        self._prediction: np.ndarray | None = None
        self._ema: float | None = None
        self._floor = math.inf  # running minimum of the smoothed deviation (`relative`)
        self._t = 0
        if self.features is not None:
            self.features.reset()

    def _advance(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """One recurrent step on a (d,) clipped feature vector → (latent z (k,), the prediction
        of this step's features made at the previous step, or None at the first step)."""
        w = self.weights
        gi = w["gru.weight_ih_l0"] @ x + w["gru.bias_ih_l0"]  # (3H,)
        gh = w["gru.weight_hh_l0"] @ self._h + w["gru.bias_hh_l0"]
        hidden = self.config.hidden
        r = _sigmoid(gi[:hidden] + gh[:hidden])
        u = _sigmoid(gi[hidden : 2 * hidden] + gh[hidden : 2 * hidden])
        n = np.tanh(gi[2 * hidden :] + r * gh[2 * hidden :])
        self._h = (1.0 - u) * n + u * self._h
        z = w["to_latent.weight"] @ self._h + w["to_latent.bias"]
        previous = self._prediction
        hid = np.tanh(w["decoder.0.weight"] @ z + w["decoder.0.bias"])
        self._prediction = w["decoder.2.weight"] @ hid + w["decoder.2.bias"]
        return z, previous

    def _terms(
        self, z: np.ndarray, prediction: np.ndarray | None, raw: np.ndarray, b: int, t: int
    ) -> dict[str, float]:
        """The unstandardised terms of row `t` of a run: latent distance, prediction RMS error,
        feature distance (raw: the (d,) unclipped features; non-finite → every term +inf). The
        GRU terms are NaN (not scored) for the first `warmup_steps` rows: a fresh state."""
        ref = self.reference
        if not np.all(np.isfinite(raw)):
            return dict.fromkeys(TERMS, math.inf)
        delta = z - ref["latent_mean"][b]
        latent = math.sqrt(max(float(delta @ ref["latent_precision"][b] @ delta), 0.0))
        error = (
            math.nan if prediction is None else math.sqrt(float(np.mean((prediction - raw) ** 2)))
        )
        if t < self.config.warmup_steps:
            latent = error = math.nan
        gap = raw - ref["feature_mean"][b]
        distance = math.sqrt(max(float(gap @ ref["feature_precision"][b] @ gap), 0.0) / len(raw))
        return {"latent": latent, "prediction": error, "features": distance}

    def _standardised(self, terms: Mapping[str, float], b: int) -> dict[str, float]:
        """Each term in units of its healthy spread in bin `b` (a missing term is 0)."""
        ref = self.reference
        out = {}
        for term in TERMS:
            value = terms[term]
            out[term] = (
                0.0
                if math.isnan(value)
                else (value - ref[f"{term}_center"][b]) / ref[f"{term}_spread"][b]
            )
        return out

    def _deviation(self, terms: Mapping[str, float], b: int) -> float:
        """Raw deviation of one step: the max of its standardised terms in `config.terms`."""
        standardised = self._standardised(terms, b)
        return max(standardised[t] for t in self.config.terms)

    def _msd(self, terms: Mapping[str, float], b: int, t: int) -> float:
        """The MSD of row `t`: the smoothed deviation; 0 for the first `warmup_steps` rows of
        a run (a fresh state is not scored, and the smoothing starts after it), unless the row
        is non-finite (+inf, an alarm at any step)."""
        deviation = self._deviation(terms, b)
        if t < self.config.warmup_steps and math.isfinite(deviation):
            return 0.0
        return self._smooth(deviation)

    def recalibrate(self, scores: Sequence[np.ndarray], source: str) -> None:
        """Set the threshold from out-of-sample MSD series of healthy runs (one (n_i,) array
        per run) at the configured false-alarm target; `fit_info` records where it came from."""
        self.threshold = calibrate_threshold(list(scores), self.config.target_false_alarms)
        self.fit_info["threshold_from"] = source

    def _smooth(self, raw: float) -> float:
        """EMA of the raw deviation, started at the healthy centre (0: each term is standardised
        by its healthy median and spread), so that one row, the first scored one included, moves
        it by `ema` × its deviation (started at the first row's value, a fresh run's first
        scored row alarmed alone, and a guard skipped it again and again); a non-finite step
        scores +inf and leaves the state as it was."""
        if not math.isfinite(raw):
            return math.inf
        alpha = self.config.ema
        previous = 0.0 if self._ema is None else self._ema
        self._ema = (1 - alpha) * previous + alpha * raw
        if not self.config.relative:
            return self._ema
        self._floor = min(self._floor, self._ema)
        return self._ema - self._floor

    def _raw_pass(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """(n, d) clipped features → latents (n, k) and each step's prediction, fresh state."""
        self.reset()
        latents = np.zeros((len(x), self.config.latent_dim))
        predictions: list[np.ndarray | None] = []
        for t in range(len(x)):
            latents[t], previous = self._advance(x[t])
            predictions.append(previous)
        self.reset()
        return latents, predictions

    def _term_pass(self, raw: np.ndarray, steps: np.ndarray) -> dict[str, np.ndarray]:
        """(n, d) unclipped features → each unstandardised term per step (n,)."""
        latents, predictions = self._raw_pass(_clip(raw))
        bins = self._bins(steps)
        out = {term: np.zeros(len(raw)) for term in TERMS}
        for t in range(len(raw)):
            terms = self._terms(latents[t], predictions[t], raw[t], int(bins[t]), t)
            for term in TERMS:
                out[term][t] = terms[term]
        return out

    def _score_features(
        self, raw: np.ndarray, steps: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """(n, d) unclipped features and (n,) steps → msd (n,), latents (n, k) and each
        standardised term (n,), from a fresh state."""
        self.reset()
        x = _clip(raw)
        msd = np.zeros(len(raw))
        latents = np.zeros((len(raw), self.config.latent_dim))
        standardised = {term: np.zeros(len(raw)) for term in TERMS}
        bins = self._bins(steps)
        for t in range(len(raw)):
            z, prediction = self._advance(x[t])
            latents[t] = z
            b = int(bins[t])
            terms = self._terms(z, prediction, raw[t], b, t)
            for term, value in self._standardised(terms, b).items():
                standardised[term][t] = value
            msd[t] = self._msd(terms, b, t)
        self.reset()
        return msd, latents, standardised

    def _scored(
        self, run: Any
    ) -> tuple[
        pd.DataFrame, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]
    ]:
        """(table, unclipped features, steps, `_score_features` output) of one run."""
        self._check_fitted()
        assert self.features is not None
        table = _table(run)
        self.features.reset()
        raw = self.features.transform(table, clip=False)
        steps = _steps(table)
        return table, raw, steps, self._score_features(raw, steps)

    def score(self, run: Any) -> pd.DataFrame:
        """Per step: `step`, `env_step` (if present), `msd`, `z_1..z_k`, `alarm`, and each
        standardised term `msd_<term>` (latent, prediction, features)."""
        table, _, steps, (msd, latents, standardised) = self._scored(run)
        out = pd.DataFrame({"step": steps})
        if "env_step" in table.columns:
            out["env_step"] = table["env_step"].to_numpy()
        out["msd"] = msd
        for i in range(latents.shape[1]):
            out[f"z_{i + 1}"] = latents[:, i]
        out["alarm"] = msd >= self.threshold
        for term, values in standardised.items():
            out[f"msd_{term}"] = values
        return out

    def step(self, row: Mapping[str, Any]) -> float:
        """Online: feed one telemetry row (a mapping of column → value); returns the step's MSD.

        Keeps the GRU state between calls; call `reset()` at the start of each run. Progress is
        `row["step"]` (or the number of calls so far) over the baseline run length.
        """
        assert self.features is not None, "fit or load the monitor first"
        raw = self.features.transform_row(row, clip=False)
        step_value = row.get("step")
        b = self._bin(int(step_value) if step_value is not None else self._t)
        z, prediction = self._advance(_clip(raw))
        terms = self._terms(z, prediction, raw, b, self._t)
        msd = self._msd(terms, b, self._t)
        self._t += 1
        return msd

    def online_state(self) -> tuple[Any, ...]:
        """A copy of what `step()` carries from row to row (hidden state, last prediction,
        smoothing, row count, the features' online state, the running floor of `relative`),
        for `set_online_state`."""
        assert self.features is not None
        prediction = None if self._prediction is None else self._prediction.copy()
        features = self.features.online_state()
        return (self._h.copy(), prediction, self._ema, self._t, features, self._floor)

    def set_online_state(self, state: tuple[Any, ...]) -> None:
        """Go back to a state `online_state()` returned: the rows fed since are forgotten."""
        assert self.features is not None
        h, prediction, self._ema, self._t, features, self._floor = state
        self._h = h.copy()
        self._prediction = None if prediction is None else prediction.copy()
        self.features.set_online_state(features)

    def contributions(self, row_features: np.ndarray, step: int) -> dict[str, float]:
        """Feature name → its share of the feature term's squared distance at one step (the
        shares sum to 1; a non-finite feature takes it all). row_features: (d,) unclipped."""
        assert self.features is not None
        names = self.features.names
        bad = ~np.isfinite(row_features)
        if bad.any():
            share = 1.0 / int(bad.sum())
            return {n: (share if bad[j] else 0.0) for j, n in enumerate(names)}
        b = self._bin(step)
        gap = row_features - self.reference["feature_mean"][b]
        parts = gap * (self.reference["feature_precision"][b] @ gap)  # (d,): sums to gap' P gap
        total = float(parts.sum())
        if total <= 0:
            return dict.fromkeys(names, 0.0)
        return {n: float(parts[j]) / total for j, n in enumerate(names)}

    def feature_z(self, row_features: np.ndarray, step: int) -> np.ndarray:
        """(d,) signed deviation of each feature from its healthy mean in the bin, in units of
        its healthy per-bin standard deviation."""
        b = self._bin(step)
        precision = self.reference["feature_precision"][b]
        std = np.sqrt(np.diag(np.linalg.inv(precision)))
        return (row_features - self.reference["feature_mean"][b]) / std

    def explain(
        self,
        run: Any,
        index: int,
        index_names: Mapping[str, Sequence[str]] | None = None,
        top: int = 5,
    ) -> MonitorAttribution:
        """Which features (and layers) moved the deviation at row `index` (the first alarm).

        The dominant term decides the decomposition: `prediction` → each feature's share of the
        squared one-step prediction error; `features` or `latent` (the latent reads the same
        inputs) → each feature's share of the squared feature distance to healthy in the bin.
        `index_names`: run.json's `telemetry_index` (tensor names of argmax columns).
        """
        from stabilitybench.monitor.attribution import (
            Contribution,
            MonitorAttribution,
            argmax_columns,
            layer_name,
        )

        table, raw, steps, (_, _, standardised) = self._scored(run)
        assert self.features is not None
        term = max(self.config.terms, key=lambda t: standardised[t][index])
        step = int(steps[index])
        row = raw[index]
        names = self.features.names
        if term == "prediction" and np.all(np.isfinite(row)):
            prediction = self._raw_pass(_clip(raw))[1][index]
            squared = np.zeros(len(row)) if prediction is None else (prediction - row) ** 2
            total = float(squared.sum())
            shares = {
                n: float(squared[j]) / total if total > 0 else 0.0 for j, n in enumerate(names)
            }
        else:
            shares = self.contributions(row, step)
        z = (
            self.feature_z(row, step)
            if np.all(np.isfinite(row))
            else np.where(np.isfinite(row), 0.0, math.inf)
        )
        argmax = argmax_columns()
        ranked = sorted(names, key=lambda n: -shares[n])[:top]
        contributions = [
            Contribution(
                feature=n,
                share=shares[n],
                z=float(z[names.index(n)]),
                layer=layer_name(table, n, index, index_names, argmax),
            )
            for n in ranked
            if shares[n] > 0
        ]
        return MonitorAttribution(step=step, term=term, contributions=contributions)

    def alarm(self, value: float) -> bool:
        """Whether an MSD value is an alarm at the calibrated threshold."""
        return value >= self.threshold

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write `model.safetensors` + `monitor.json` into the folder `path` (no pickle)."""
        from safetensors.numpy import save_file

        self._check_fitted()
        assert self.features is not None
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"weights.{k}": np.ascontiguousarray(v) for k, v in self.weights.items()}
        tensors.update(
            {f"reference.{k}": np.ascontiguousarray(v) for k, v in self.reference.items()}
        )
        tmp = folder / f".{MODEL_FILE}.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(folder / MODEL_FILE)
        from stabilitybench.io import write_json

        write_json(
            folder / CONFIG_FILE,
            {
                "format_version": FORMAT_VERSION,
                "config": asdict(self.config),
                "features": self.features.to_dict(),
                "horizon": self.horizon,
                "threshold": self.threshold if math.isfinite(self.threshold) else None,
                "fit_info": self.fit_info,
            },
        )
        return folder

    @classmethod
    def load(cls, path: str | Path) -> MetaStateMonitor:
        """Read a monitor written by `save` (a folder with monitor.json + model.safetensors)."""
        from safetensors.numpy import load_file

        folder = Path(path)
        if not (folder / CONFIG_FILE).exists() or not (folder / MODEL_FILE).exists():
            raise StabilityBenchError(
                f"{folder}: no fitted monitor ({CONFIG_FILE} + {MODEL_FILE}); "
                "run `stabilitybench monitor fit DIR`"
            )
        meta: dict[str, Any] = {"format_version": 1, "threshold": None, "fit_info": {}}
        meta.update(json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")))
        if int(meta["format_version"]) != FORMAT_VERSION:
            raise StabilityBenchError(
                f"{folder}: monitor format {meta['format_version']} is from an older "
                f"release (this one reads format {FORMAT_VERSION}); refit it with "
                "`stabilitybench monitor fit DIR`"
            )
        config = dict(meta["config"])
        monitor = cls(
            latent_dim=int(config.pop("latent_dim")), seed=int(config.pop("seed")), **config
        )
        monitor.features = FeatureExtractor.from_dict(meta["features"])
        monitor.horizon = int(meta["horizon"])
        monitor.threshold = math.inf if meta["threshold"] is None else float(meta["threshold"])
        monitor.fit_info = dict(meta["fit_info"])
        tensors = load_file(str(folder / MODEL_FILE))
        monitor.weights = {
            k[len("weights.") :]: v for k, v in tensors.items() if k.startswith("weights.")
        }
        monitor.reference = {
            k[len("reference.") :]: v for k, v in tensors.items() if k.startswith("reference.")
        }
        monitor.reset()
        return monitor

    def _check_fitted(self) -> None:
        if self.features is None or not self.weights:
            raise StabilityBenchError(
                "the monitor is not fitted: call fit(runs) or load(path) first"
            )


def _clip(x: np.ndarray) -> np.ndarray:
    """The clipped view the network reads (+inf → CLIP)."""
    return np.clip(x, -CLIP, CLIP)


def _knob_names(runs: Sequence[Any]) -> set[str]:
    """The knob names recorded in the runs' run.json (none for bare tables)."""
    names: set[str] = set()
    for run in runs:
        info = getattr(run, "info", None)
        if isinstance(info, RunInfo | Mapping):  # (a DataFrame's `info` is a method)
            names |= set(RunInfo.of(info).knobs)
    return names


def _binned_gaussian(
    values: np.ndarray, bin_ids: np.ndarray, bins: int, shrinkage: float, floor: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per progress bin: mean (bins, k) and precision (bins, k, k) of (n, k) values, the
    covariance shrunk towards its diagonal and each std floored at `floor` (NaN rows skipped;
    a bin with fewer than 2 rows uses every row)."""
    k = values.shape[1]
    mean = np.zeros((bins, k))
    precision = np.zeros((bins, k, k))
    finite = np.all(np.isfinite(values), axis=1)
    for b in range(bins):
        vb = values[(bin_ids == b) & finite]
        if len(vb) < 2:
            vb = values[finite] if finite.sum() >= 2 else np.zeros((2, k))
        mean[b] = vb.mean(axis=0)
        cov = np.cov(vb, rowvar=False).reshape(k, k)
        cov = (1 - shrinkage) * cov + shrinkage * np.diag(np.diag(cov))
        cov += np.diag(np.maximum(floor**2 - np.diag(cov), 0.0)) + 1e-9 * np.eye(k)
        precision[b] = np.linalg.inv(cov)
    return mean, precision


def bin_ids_or_all(bin_ids: np.ndarray, b: int) -> np.ndarray:
    """Mask of steps in bin `b`, or of all steps if the bin holds fewer than 5."""
    mask = bin_ids == b
    return mask if mask.sum() >= 5 else np.ones_like(mask)


def _Net(d: int, hidden: int, latent: int, decoder_hidden: int) -> Any:
    """GRU encoder → latent → MLP decoder predicting the next step's features."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = nn.GRU(d, hidden, batch_first=True)
            self.to_latent = nn.Linear(hidden, latent)
            self.decoder = nn.Sequential(
                nn.Linear(latent, decoder_hidden), nn.Tanh(), nn.Linear(decoder_hidden, d)
            )

        def loss(self, x: torch.Tensor) -> torch.Tensor:
            h, _ = self.gru(x)  # (B, T, H)
            prediction = self.decoder(self.to_latent(h))  # (B, T, d): the next step's features
            return ((prediction[:, :-1] - x[:, 1:]) ** 2).mean()

    return Net()


def _windows(xs: Sequence[np.ndarray], length: int) -> np.ndarray:
    """Cut (n_i, d) arrays into windows of `length` steps with half overlap → (m, length, d)."""
    out: list[np.ndarray] = []
    for x in xs:
        n = len(x)
        if n < 3:
            continue
        size = min(length, n)
        stride = max(1, size // 2)
        starts = list(range(0, n - size + 1, stride))
        if starts[-1] != n - size:
            starts.append(n - size)
        out.extend(x[s : s + size] for s in starts)
    if not out:
        return np.zeros((0, length, xs[0].shape[1] if xs else 1))
    size = min(len(w) for w in out)
    return np.stack([w[:size] for w in out])


def _table(run: Any) -> pd.DataFrame:
    if isinstance(run, pd.DataFrame):
        return run
    return run.telemetry


def _tables_and_seeds(runs: Sequence[Any]) -> tuple[list[pd.DataFrame], list[int | None]]:
    tables, seeds = [], []
    for run in runs:
        table = _table(run)
        if len(table) == 0:
            continue
        tables.append(table)
        seeds.append(None if isinstance(run, pd.DataFrame) else run.seed)
    return tables, seeds


def _steps(table: pd.DataFrame) -> np.ndarray:
    if "step" in table.columns:
        return table["step"].to_numpy(dtype=np.int64)
    return np.arange(len(table), dtype=np.int64)


def _run_length(table: pd.DataFrame) -> int:
    return int(_steps(table).max()) + 1 if len(table) else 1


def _split_holdout(
    runs: Sequence[Any], validation: Sequence[Any] | None
) -> tuple[list[pd.DataFrame], list[pd.DataFrame], str]:
    """(training tables, validation tables, how the validation runs were chosen)."""
    tables, seeds = _tables_and_seeds(runs)
    if not tables:
        raise StabilityBenchError("monitor fit: no baseline runs to learn from (need >= 1)")
    if validation is not None:
        return tables, _tables_and_seeds(validation)[0], "given"
    distinct = sorted({s for s in seeds if s is not None})
    if not distinct and len(tables) >= 3:  # plain tables, no seeds: the last run is held out
        return tables[:-1], tables[-1:], "last run"
    if len(distinct) < 2:
        return tables, [], "last 25% of steps"
    held = distinct[-1]
    val_tables = [t for t, s in zip(tables, seeds, strict=True) if s == held]
    train = [t for t, s in zip(tables, seeds, strict=True) if s != held]
    return train, val_tables, f"seed {held}"


def _train_and_validation_windows(
    train_x: list[np.ndarray], val_x: list[np.ndarray], window: int
) -> tuple[np.ndarray, np.ndarray]:
    """Training and early-stopping windows; without validation runs, the last 25% of each run."""
    if val_x:
        train_windows, val_windows = _windows(train_x, window), _windows(val_x, window)
    else:
        cut = [max(2, int(0.75 * len(x))) for x in train_x]
        train_windows = _windows([x[:c] for x, c in zip(train_x, cut, strict=True)], window)
        val_windows = _windows([x[c - 1 :] for x, c in zip(train_x, cut, strict=True)], window)
    if len(train_windows) == 0:
        raise StabilityBenchError("monitor fit: baseline runs are too short (need >= 3 steps)")
    return train_windows, val_windows
