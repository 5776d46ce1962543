"""The one exception type for errors a user can cause, and how a validation error reads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class StabilityBenchError(Exception):
    """A problem with the user's input (spec, arguments, paths) — shown as one line, exit code 2."""


def _field_path(loc: Sequence[int | str]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "spec"


def validation_message(exc: ValidationError, prefix: Sequence[int | str] = ()) -> str:
    """One line for a pydantic error: the first problem's field path and what is wrong with it."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = list(prefix) + [p for p in first["loc"] if not str(p).startswith("function-")]
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "is required"
    elif isinstance(first.get("input"), int | float | str | bool) and not first["type"].startswith(
        "value_error"
    ):
        message = f"{message}, got {first['input']!r}"
    extra = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{_field_path(loc)}: {message}{extra}"
