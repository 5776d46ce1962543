"""Helpers for audit tests: small toy specs written to YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml


def toy_spec(**overrides: Any) -> dict[str, Any]:
    """A 4-run toy audit (2 perturbations × 2 seeds) that trains in well under a second per run."""
    spec: dict[str, Any] = {
        "name": "toy-test",
        "seeds": [0, 1],
        "workloads": [
            {
                "name": "toy",
                "kind": "toy",
                "total_steps": 60,
                "eval": {"every": 10, "batches": 1},
                "knobs": {"lr": 0.01, "hidden": 16},
            }
        ],
        "perturbations": ["none", {"kind": "lr_spike", "at": 0.5, "factor": 50, "duration": 5}],
    }
    spec.update(overrides)
    return spec


@pytest.fixture
def write_spec(tmp_path: Path) -> Any:
    """Write a spec mapping (or raw YAML text) to a file and return its path."""

    def write(spec: dict[str, Any] | str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
        return path

    return write
