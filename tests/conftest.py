"""Shared test set-up: one torch thread, and mujoco's log file kept out of the repo."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _keep_cwd_clean(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run each test from a temporary folder so tools that write to the cwd (mujoco) stay out."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    os.environ.setdefault("MUJOCO_GL", "egl")
