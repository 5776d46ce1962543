"""Parquet streaming: parts at each flush, one finished file at close, readable after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from stabilitybench import Telemetry, streaming
from stabilitybench.streaming import ParquetSink, partial_dir, read_parts


def _train(tel: Telemetry, model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        tel.log(loss=loss)


def _setup() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_rows_stream_in_parts_and_become_one_file_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streaming, "ROW_GROUP_ROWS", 10)
    path = tmp_path / "telemetry.parquet"
    model, opt = _setup()
    tel = Telemetry(model, opt, sink=ParquetSink(path), flush_every=10)
    _train(tel, model, opt, 25)
    parts = sorted(partial_dir(path).glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-000000.parquet", "part-000001.parquet"]
    assert not path.exists()  # never shown as finished while the run goes on
    assert read_parts(partial_dir(path))["step"].tolist() == list(range(20))
    # rows() reads back the finished rows 20..23 (a flush: a third part) and the open row 24.
    assert tel.rows()["step"].tolist() == list(range(25))
    assert len(list(partial_dir(path).glob("part-*.parquet"))) == 3
    table = tel.close()  # row 24: the fourth part
    assert path.exists() and not partial_dir(path).exists()
    # Parts of 10, 10, 4 and 1 rows, gathered into row groups of at least 10 rows: 10, 10, 5.
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [10, 10, 5]
    stored = pd.read_parquet(path)
    assert stored["step"].tolist() == list(range(25))
    pd.testing.assert_frame_equal(stored, table)
    assert list(stored.columns[:2]) == ["step", "loss"]


def test_columns_that_appear_late_are_united(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    model, opt = _setup()
    tel = Telemetry(model, opt, sink=ParquetSink(path), flush_every=4)
    _train(tel, model, opt, 6)
    tel.log(episode_return=5)  # goes to step 5, in the second part only
    tel.close()
    stored = pd.read_parquet(path)
    assert stored["episode_return"].isna().tolist() == [True] * 5 + [False]
    assert stored["nonfinite_grads"].dtype.kind == "i"


def test_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "t.parquet"
        model, opt = _setup()
        tel = Telemetry(model, opt, sink=ParquetSink(path), flush_every=2)
        _train(tel, model, opt, 3)
        (part,) = partial_dir(path).glob("part-*.parquet")
        assert part.stat().st_mode & 0o777 == 0o644
        tel.close()
        assert path.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


_CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from stabilitybench import Telemetry
    from stabilitybench.streaming import ParquetSink
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tel = Telemetry(model, opt, sink=ParquetSink(sys.argv[1]), flush_every=10)
    for step in range(35):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        tel.log(loss=loss)
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_after_sigkill_every_row_up_to_the_last_flush_is_readable(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.parquet"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert not path.exists()
    rows = read_parts(partial_dir(path))
    # Flushes happened when steps 10, 20 and 30 started: rows 0..29; rows 30..34 were lost.
    assert rows["step"].tolist() == list(range(30))
    assert rows[["loss", "grad_norm", "update_norm"]].notna().all().all()
