"""Files in an audit folder get the user's umask (issue 15: they were all 0600)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from stabilitybench.io import write_json, write_parquet
from stabilitybench.store import RunStore


@pytest.fixture
def umask() -> Iterator[object]:
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(umask, tmp_path: Path, mask: int, expected: int) -> None:  # type: ignore[no-untyped-def]
    umask(mask)
    store = RunStore(tmp_path / "audit")
    store.write_audit({"name": "modes"})
    writer = store.writer("0123456789abcdef")
    writer.start({"run_id": "0123456789abcdef"})
    writer.write_table("evals", pd.DataFrame({"step": [0, 1], "perf": [0.5, 0.25]}))
    writer.write_events([])
    writer.finish({"steps": 2})
    write_json(tmp_path / "audit" / "extra.json", {"a": 1})
    write_parquet(tmp_path / "audit" / "extra.parquet", pd.DataFrame({"x": [1]}))
    files = [p for p in (tmp_path / "audit").rglob("*") if p.is_file()]
    assert len(files) == 6
    assert {p.name: _mode(p) for p in files} == {p.name: expected for p in files}
    assert not list((tmp_path / "audit").rglob("*.tmp"))
    # the content is what was written
    assert store.info("0123456789abcdef").document()["outcome"] == {"steps": 2}
    assert store.table("0123456789abcdef", "evals")["perf"].tolist() == [0.5, 0.25]
