"""The one exception type for errors a user can cause."""

from __future__ import annotations


class StabilityBenchError(Exception):
    """A problem with the user's input (spec, arguments, paths) — shown as one line, exit code 2."""
