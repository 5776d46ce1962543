"""The Meta-State Monitor: features, the state-space model and attribution."""

from __future__ import annotations

from stabilitybench.monitor.ssm import MetaStateMonitor

__all__ = ["MetaStateMonitor"]
