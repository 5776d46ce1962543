"""The Meta-State Monitor: a GRU state-space model of healthy training and its deviation score.

A GRU encoder reads the per-step feature vector (features.py) into a hidden state; a linear map
gives the k-dimensional latent meta-state z_t; a small decoder predicts the next step's features
from z_t. Trained on baseline runs (truncated windows, Adam, early stopping on held-out baseline
runs). The meta-state deviation (MSD) of a step combines, in units calibrated on held-out
baseline runs at the same training progress (step / run length, in bins):

- u_t: the Mahalanobis distance of z_t to the baseline latent distribution of its progress bin,
- v_t: the log one-step prediction error of the features,

each standardised per bin, `raw_t = max(u_t, v_t)`, smoothed by an EMA: `msd_t`. An alarm is
`msd_t >= threshold`, the threshold chosen on held-out baseline runs for a target rate of
false alarms (up-crossings) per 1,000 steps.

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
from typing import Any

import numpy as np
import pandas as pd

from stabilitybench.errors import StabilityBenchError
from stabilitybench.monitor.alarms import calibrate_threshold
from stabilitybench.monitor.features import FeatureExtractor

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "monitor.json"
FORMAT_VERSION = 1


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
    ema: float = 0.3  # smoothing weight of the newest raw deviation
    shrinkage: float = 0.1  # covariance shrinkage towards the diagonal
    target_false_alarms: float = 1.0  # per 1,000 steps, on held-out baseline runs
    seed: int = 0


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
        the runs of the highest seed are held out if there are at least two seeds; otherwise the
        last 25% of every run's steps serve for early stopping and the training runs themselves
        for calibration (recorded in `fit_info["holdout"]`).
        """
        tables, val_tables, holdout = _split_holdout(runs, validation)
        all_tables = [*tables, *val_tables]
        self.features = FeatureExtractor.fit(all_tables)
        self.horizon = int(np.median([_run_length(t) for t in all_tables]))
        train_x = [self.features.transform(t) for t in tables]
        val_x = [self.features.transform(t) for t in val_tables]
        train_steps = [_steps(t) for t in tables]
        val_steps = [_steps(t) for t in val_tables]
        epochs, best_loss = self._train(train_x, val_x)
        calibration = (val_x, val_steps) if val_x else (train_x, train_steps)
        self._fit_reference((train_x + val_x, train_steps + val_steps), calibration)
        self.fit_info = {
            "train_runs": len(tables),
            "validation_runs": len(val_tables),
            "holdout": holdout,
            "epochs": epochs,
            "best_validation_loss": best_loss,
            "features": self.features.names,
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
        """Per-bin latent mean/precision, then per-bin standardisation and threshold.

        Each argument is (features (n_i, d) per run, steps (n_i,) per run).
        """
        cfg = self.config
        k, bins = cfg.latent_dim, cfg.bins
        reference_x, reference_steps = reference
        calibration_x, calibration_steps = calibration
        passes = [self._raw_pass(x) for x in reference_x]
        latents = np.concatenate([p[0] for p in passes])
        bin_ids = np.concatenate([self._bins(s) for s in reference_steps])
        mean = np.zeros((bins, k))
        precision = np.zeros((bins, k, k))
        for b in range(bins):
            zb = latents[bin_ids == b]
            if len(zb) < 2:
                zb = latents
            mean[b] = zb.mean(axis=0)
            cov = np.cov(zb, rowvar=False).reshape(k, k)
            cov = (
                (1 - cfg.shrinkage) * cov + cfg.shrinkage * np.diag(np.diag(cov)) + 1e-6 * np.eye(k)
            )
            precision[b] = np.linalg.inv(cov)
        self.reference = {
            "latent_mean": mean,
            "latent_precision": precision,
            "dist_mean": np.zeros(bins),
            "dist_std": np.ones(bins),
            "err_mean": np.zeros(bins),
            "err_std": np.ones(bins),
        }
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
        """Per-bin robust centre and spread of the latent distance and prediction error."""
        mean, precision = self.reference["latent_mean"], self.reference["latent_precision"]
        dists, errs, cal_bins = [], [], []
        for x, steps in zip(calibration_x, calibration_steps, strict=True):
            z, err = self._raw_pass(x)
            step_bins = self._bins(steps)
            delta = z - mean[step_bins]
            dists.append(np.sqrt(np.einsum("ni,nij,nj->n", delta, precision[step_bins], delta)))
            errs.append(err)
            cal_bins.append(step_bins)
        dist_all, err_all, bin_all = (
            np.concatenate(dists),
            np.concatenate(errs),
            np.concatenate(cal_bins),
        )
        for name, values in (("dist", dist_all), ("err", err_all)):
            for b in range(self.config.bins):
                vb = values[bin_ids_or_all(bin_all, b)]
                vb = vb[np.isfinite(vb)]
                self.reference[f"{name}_mean"][b] = float(np.median(vb)) if vb.size else 0.0
                spread = (
                    float(np.percentile(vb, 75) - np.percentile(vb, 25)) / 1.349 if vb.size else 1.0
                )
                self.reference[f"{name}_std"][b] = max(spread, 1e-3)

    def _bins(self, steps: np.ndarray) -> np.ndarray:
        """Progress bin of each optimizer step (steps: (n,) int) → (n,) int."""
        bins = (np.asarray(steps, dtype=np.int64) * self.config.bins) // max(self.horizon, 1)
        return np.clip(bins, 0, self.config.bins - 1)

    # -- inference (numpy, float64) ------------------------------------------------------------
    def reset(self) -> None:
        """Start a new run for `step()`: zero hidden state, step counter and smoothing."""
        self._h = np.zeros(self.config.hidden)
        self._prediction: np.ndarray | None = None
        self._ema: float | None = None
        self._t = 0
        if self.features is not None:
            self.features.reset()

    def _advance(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """One recurrent step on a (d,) feature vector → (latent z (k,), log prediction error)."""
        w = self.weights
        gi = w["gru.weight_ih_l0"] @ x + w["gru.bias_ih_l0"]  # (3H,)
        gh = w["gru.weight_hh_l0"] @ self._h + w["gru.bias_hh_l0"]
        hidden = self.config.hidden
        r = _sigmoid(gi[:hidden] + gh[:hidden])
        u = _sigmoid(gi[hidden : 2 * hidden] + gh[hidden : 2 * hidden])
        n = np.tanh(gi[2 * hidden :] + r * gh[2 * hidden :])
        self._h = (1.0 - u) * n + u * self._h
        z = w["to_latent.weight"] @ self._h + w["to_latent.bias"]
        err = math.nan
        if self._prediction is not None:
            err = math.log(float(np.mean((self._prediction - x) ** 2)) + 1e-8)
        hid = np.tanh(w["decoder.0.weight"] @ z + w["decoder.0.bias"])
        self._prediction = w["decoder.2.weight"] @ hid + w["decoder.2.bias"]
        return z, err

    def _raw_pass(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, d) features → latents (n, k) and log prediction errors (n,), from a fresh state."""
        self.reset()
        latents = np.zeros((len(x), self.config.latent_dim))
        errs = np.full(len(x), np.nan)
        for t in range(len(x)):
            latents[t], errs[t] = self._advance(x[t])
        self.reset()
        return latents, errs

    def _deviation(self, z: np.ndarray, err: float, b: int) -> float:
        """Raw deviation of one step: max of the standardised latent distance and prediction error."""
        ref = self.reference
        delta = z - ref["latent_mean"][b]
        dist = math.sqrt(max(float(delta @ ref["latent_precision"][b] @ delta), 0.0))
        u = (dist - ref["dist_mean"][b]) / ref["dist_std"][b]
        v = 0.0 if math.isnan(err) else (err - ref["err_mean"][b]) / ref["err_std"][b]
        return max(u, v)

    def _smooth(self, raw: float) -> float:
        alpha = self.config.ema
        self._ema = raw if self._ema is None else (1 - alpha) * self._ema + alpha * raw
        return self._ema

    def _score_features(self, x: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, d) features and (n,) steps → msd (n,) and latents (n, k), from a fresh state."""
        self.reset()
        msd = np.zeros(len(x))
        latents = np.zeros((len(x), self.config.latent_dim))
        bins = self._bins(steps)
        for t in range(len(x)):
            z, err = self._advance(x[t])
            latents[t] = z
            msd[t] = self._smooth(self._deviation(z, err, int(bins[t])))
        self.reset()
        return msd, latents

    def score(self, run: Any) -> pd.DataFrame:
        """Per step: `step`, `env_step` (if present), `msd`, `z_1..z_k`, `alarm`."""
        self._check_fitted()
        assert self.features is not None
        table = _table(run)
        self.features.reset()
        x = self.features.transform(table)
        steps = _steps(table)
        msd, latents = self._score_features(x, steps)
        out = pd.DataFrame({"step": steps})
        if "env_step" in table.columns:
            out["env_step"] = table["env_step"].to_numpy()
        out["msd"] = msd
        for i in range(latents.shape[1]):
            out[f"z_{i + 1}"] = latents[:, i]
        out["alarm"] = msd >= self.threshold
        return out

    def step(self, row: Mapping[str, Any]) -> float:
        """Online: feed one telemetry row (a mapping of column → value); returns the step's MSD.

        Keeps the GRU state between calls; call `reset()` at the start of each run. Progress is
        `row["step"]` (or the number of calls so far) over the baseline run length.
        """
        assert self.features is not None, "fit or load the monitor first"
        x = self.features.transform_row(row)
        step_value = row.get("step")
        t = int(step_value) if step_value is not None else self._t
        b = min(max((t * self.config.bins) // max(self.horizon, 1), 0), self.config.bins - 1)
        z, err = self._advance(x)
        self._t += 1
        return self._smooth(self._deviation(z, err, b))

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
        meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        config = dict(meta["config"])
        monitor = cls(
            latent_dim=int(config.pop("latent_dim")), seed=int(config.pop("seed")), **config
        )
        monitor.features = FeatureExtractor.from_dict(meta["features"])
        monitor.horizon = int(meta["horizon"])
        monitor.threshold = math.inf if meta.get("threshold") is None else float(meta["threshold"])
        monitor.fit_info = dict(meta.get("fit_info", {}))
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
