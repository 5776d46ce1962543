"""The workload registry: a built-in module that fails to import says which and why."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from stabilitybench.errors import StabilityBenchError
from stabilitybench.workloads import base


@pytest.fixture
def broken_builtin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(
        base.REGISTRY._builtins, "broken", "stabilitybench.workloads._no_such_module"
    )
    monkeypatch.setattr(base.REGISTRY, "_failures", None)  # import the built-ins again
    yield


def test_a_workload_module_that_fails_to_import_is_named_with_the_reason(
    broken_builtin: None,
) -> None:
    with pytest.raises(StabilityBenchError) as info:
        base.build_workload({"name": "w", "kind": "broken"})
    message = str(info.value)
    assert "workload 'w': kind 'broken' is unavailable" in message
    assert "stabilitybench.workloads._no_such_module failed to import" in message
    assert "ModuleNotFoundError" in message
    assert "toy" in base.workload_kinds()  # the modules that import still register


def test_an_unknown_kind_lists_the_allowed_ones() -> None:
    with pytest.raises(StabilityBenchError, match=r"unknown kind 'nope'; allowed: .*toy"):
        base.build_workload({"name": "w", "kind": "nope"})
