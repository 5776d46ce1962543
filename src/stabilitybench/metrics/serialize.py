"""The one JSON serialiser of the analysis layer's typed results, and the one loader.

`to_jsonable` turns dataclasses (or anything with `__json__()`), mappings, sequences and numpy
scalars into JSON values, NaN and ±inf into null. `from_jsonable(cls, data)` rebuilds a
dataclass whose JSON shape is its fields (the evaluation's types), guided by its type hints.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel

from stabilitybench.errors import StabilityBenchError

T = TypeVar("T")


def to_jsonable(value: Any) -> Any:
    """A JSON-ready copy of `value`: NaN/±inf → None, numpy → Python, dataclasses → objects."""
    if hasattr(value, "__json__"):
        return to_jsonable(value.__json__())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, BaseModel):
        return to_jsonable(value.model_dump())
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [to_jsonable(v) for v in value.tolist()]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


def from_jsonable(cls: type[T], data: Any) -> T:
    """Rebuild a `cls` (a dataclass) from `to_jsonable(cls(...))`; unknown keys are ignored."""
    return typing.cast(T, _build(cls, data))


def _build(hint: Any, data: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if data is None else _build(options[0], data)
    if origin is list:
        (item,) = typing.get_args(hint)
        return [_build(item, v) for v in data]
    if origin is dict:
        _, item = typing.get_args(hint)
        return {k: _build(item, v) for k, v in data.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        known = {f.name for f in dataclasses.fields(hint) if f.init}
        return hint(**{k: _build(hints[k], v) for k, v in data.items() if k in known})
    if isinstance(hint, type) and issubclass(hint, BaseModel):
        return hint.model_validate(data)
    if hint is float and data is None:
        return math.nan
    return data


def load_json_as(cls: type[T], path: Path, hint: str) -> T:
    """Read `path` and rebuild a `cls`; a missing or unreadable file is a user error with `hint`."""
    import json

    if not path.exists():
        raise StabilityBenchError(f"{path} not found; {hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return from_jsonable(cls, data)
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
        raise StabilityBenchError(f"{path} could not be read ({exc}); {hint}") from None
