"""Fixtures for the metrics tests: rliable's bootstrap library as the reference implementation."""

from __future__ import annotations

from types import ModuleType

import pytest


@pytest.fixture(scope="session")
def rly() -> ModuleType:
    """`rliable.library`, importable even where arch 7.x meets pandas 3.

    arch 7.x decorates a plotting method with pandas' private `deprecate_kwarg`, whose signature
    gained a leading `klass` argument in pandas 3, so `import arch` fails there (and rliable pins
    arch < 8). The shim supplies the warning class for that one import-time call.
    """
    try:
        from rliable import library
    except (
        TypeError,
        AttributeError,
    ):  # AttributeError: an earlier failed import left arch half-built
        import sys

        import pandas.util._decorators as decorators

        # a failed import (here, or earlier by another library) leaves half-built modules
        for name in [m for m in sys.modules if m.split(".")[0] in ("arch", "rliable")]:
            del sys.modules[name]

        original = decorators.deprecate_kwarg

        def compat(
            old_arg_name: str, new_arg_name: str | None, *args: object, **kwargs: object
        ) -> object:
            return original(FutureWarning, old_arg_name, new_arg_name, *args, **kwargs)  # type: ignore[arg-type]

        decorators.deprecate_kwarg = compat  # type: ignore[assignment]
        try:
            from rliable import library
        finally:
            decorators.deprecate_kwarg = original
    return library
