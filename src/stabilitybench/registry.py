"""One registry type for the three kinds of plug-in: perturbations, workloads and detectors.

Each registry names the modules that hold its built-ins; they are imported (and so register
themselves) on the first look-up, not at `import stabilitybench`. A built-in module that fails
to import (a missing optional dependency) is remembered with its reason, so that asking for one
of its entries says why it is unavailable instead of calling it unknown.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any, Generic, TypeVar

from stabilitybench.errors import StabilityBenchError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind by name, in registration order (the built-ins first)."""

    def __init__(self, what: str, builtins: Sequence[str] | Mapping[str, str]) -> None:
        self.what = what
        # name → module for registries whose built-in names are known before import (workloads);
        # otherwise the modules, in the order their entries should be listed.
        self._builtins: dict[str, str] = (
            dict(builtins) if isinstance(builtins, Mapping) else {m: m for m in builtins}
        )
        self._entries: dict[str, T] = {}
        self._failures: dict[str, str] | None = None

    def register(self, name: str, entry: T) -> T:
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove an entry (tests that register a toy one clean up with this)."""
        self._entries.pop(name, None)

    def failures(self) -> dict[str, str]:
        """Import the built-in modules once; returns, per built-in that failed, why."""
        if self._failures is None:
            self._failures = {}
            for key, module in self._builtins.items():
                try:
                    importlib.import_module(module)
                except ImportError as exc:
                    self._failures[key] = f"{module} failed to import ({type(exc).__name__}: {exc})"
        return self._failures

    def entries(self) -> dict[str, T]:
        """Every registered entry by name: the built-ins in their modules' listed order (however
        they came to be imported), then the others in the order they registered."""
        self.failures()
        modules = list(self._builtins.values())

        def rank(item: tuple[str, T]) -> int:
            module = getattr(item[1], "__module__", None)
            return modules.index(module) if module in modules else len(modules)

        return dict(sorted(self._entries.items(), key=rank))

    def names(self) -> list[str]:
        return sorted(self.entries())

    def get(self, name: Any, where: str = "") -> T:
        """The entry called `name`; a user error naming the allowed values if there is none."""
        entries = self.entries()
        if name in entries:
            return entries[name]
        prefix = f"{where}: " if where else ""
        failed = self.failures().get(name)
        if failed is not None:
            raise StabilityBenchError(f"{prefix}{self.what} {name!r} is unavailable: {failed}")
        raise StabilityBenchError(
            f"{prefix}unknown {self.what} {name!r}; allowed: {', '.join(sorted(entries))}"
        )
