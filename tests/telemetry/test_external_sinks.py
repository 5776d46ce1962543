"""The W&B (offline) and MLflow (local file store) sinks, on a real Telemetry of a tiny model."""

from __future__ import annotations

import sys
from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from rich.console import Console

from stabilitybench.errors import StabilityBenchError
from stabilitybench.telemetry import Telemetry


def train(sink: object, steps: int = 6) -> pd.DataFrame:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    telemetry = Telemetry(model, optimizer, sink=sink)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    y = x.sum(dim=1, keepdim=True)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        telemetry.log(loss=float(loss.detach()))
    return telemetry.close()


def test_mlflow_sink_logs_every_column_per_step_and_imports_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from stabilitybench.telemetry.external_sinks import MLflowSink

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    sink = MLflowSink(tracking_uri=uri, experiment="sinks", run_name="tiny", batch=7)
    table = train(sink)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED"  # the sink started the run, so it ends it
    history = client.get_metric_history(sink.run_id, "stability/loss")
    assert [m.step for m in history] == list(range(6))
    assert np.allclose([m.value for m in history], table["loss"])
    grad = client.get_metric_history(sink.run_id, "stability/grad_norm")
    assert np.allclose([m.value for m in grad], table["grad_norm"])

    from stabilitybench.importers import import_logs
    from stabilitybench.store import RunStore

    import_logs(tmp_path / "mlruns", tmp_path / "audit", console=Console(file=StringIO()))
    store = RunStore.open(tmp_path / "audit")
    (run_id,) = store.run_ids()
    back = store.load(run_id).telemetry
    for column in ("loss", "grad_norm", "update_norm", "param_norm", "lr"):
        assert np.allclose(back[column], table[column]), column


def test_wandb_sink_offline_logs_each_row_at_its_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    from stabilitybench.telemetry.external_sinks import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = WandbSink(project="stabilitybench-test", dir=str(tmp_path), mode="offline")
    logged: list[tuple[int, dict[str, float]]] = []
    real_log = sink.run.log

    def spy(values: dict[str, float], step: int) -> None:
        logged.append((step, dict(values)))
        real_log(values, step=step)

    sink.run.log = spy  # type: ignore[method-assign]
    table = train(sink)
    assert [step for step, _ in logged] == list(range(6))
    assert np.allclose([v["stability/loss"] for _, v in logged], table["loss"])
    # the offline run file (what `wandb sync` uploads) holds the history records with our keys
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    data = run_file.read_bytes()
    assert b"stability/loss" in data and b"stability/grad_norm" in data


@pytest.mark.parametrize(
    ("module", "sink"), [("wandb", "WandbSink"), ("mlflow.tracking", "MLflowSink")]
)
def test_missing_client_is_one_clear_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, sink: str
) -> None:
    from stabilitybench.telemetry import external_sinks

    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(StabilityBenchError, match=r"pip install 'stabilitybench\["):
        getattr(external_sinks, sink)()
