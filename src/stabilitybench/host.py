"""The machine a run trained on, recorded in its run.json (`RunInfo.host`).

A run at the edge of stability is not reproducible across machines: the same config and seed
diverged on one CPU and trained on another (`paper_lm_intrinsic_edge`), because the float
kernels torch picks (`torch.backends.cpu.get_cpu_capability()`: AVX2, AVX512, …) sum in a
different order. Run ids are keyed on config and seed, not on machine, so an audit resumed on
another machine, or runs copied between audits, mix hardware; `host` says which runs did, and
`export` lists the distinct hosts in `version.json`.

Nothing here imports torch: its version, threads and CPU capability are read only when the
process has already imported it (every workload and integration has, by the time a run starts).
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

MACHINE_KEYS = ("cpu", "machine", "torch", "torch_cpu")
"""The keys of `host_info` that can change a run's arithmetic (cores, OS and threads do not)."""


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere `platform.processor()`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def _static() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}".strip(),
        "python": platform.python_version(),
    }


def host_info() -> dict[str, Any]:
    """This process's machine: CPU model and architecture, cores, OS, Python, and torch's
    version, CPU capability (the kernels it dispatches to) and thread count where torch is
    loaded."""
    info = dict(_static())
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = str(getattr(torch, "__version__", ""))
        with contextlib.suppress(AttributeError, RuntimeError):
            info["torch_cpu"] = str(torch.backends.cpu.get_cpu_capability())
        with contextlib.suppress(AttributeError, RuntimeError):
            info["torch_threads"] = int(torch.get_num_threads())
    return info


def machine_of(host: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
    """The part of a run's `host` that can change its arithmetic (`MACHINE_KEYS`), as a
    hashable key; None for a run that recorded no host (written before `host` existed, or
    imported)."""
    if not host:
        return None
    return tuple((k, host.get(k)) for k in MACHINE_KEYS)


def distinct_hosts(hosts: Iterable[Mapping[str, Any] | None]) -> list[dict[str, Any]]:
    """The distinct machines of some runs' `host` records, with how many runs trained on each,
    most runs first; runs that recorded none are counted under `{"unknown": true}`."""
    counts: Counter[tuple[tuple[str, Any], ...] | None] = Counter(machine_of(h) for h in hosts)
    out: list[dict[str, Any]] = []
    for key, n in counts.most_common():
        entry: dict[str, Any] = {"unknown": True} if key is None else dict(key)
        entry["runs"] = n
        out.append(entry)
    return out
