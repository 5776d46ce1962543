"""The Meta-State Monitor, the reactive guards it is compared with, and their evaluation."""

from __future__ import annotations

from stabilitybench.monitor.ssm import MetaStateMonitor

__all__ = ["MetaStateMonitor"]
