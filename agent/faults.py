"""Fault points: named places where the test suite injects a failure (a kill at a bootstrap step, real memory growth
in the daemon) to prove that the product survives it. A fault point does nothing unless an injector is installed.

Nothing in the product installs one, and a release build cannot: the only installer is the test suite's
tests/faults/, loaded by a sitecustomize that only the suite puts on PYTHONPATH; the frozen programs contain neither
(packaging/build.py excludes them) and their interpreter reads no PYTHONPATH (tests/integration/test_packaging_build.py
proves both). Like FoundationDB's BUGGIFY, which only simulation builds compile in. docs/architecture.md, "Fault
injection", lists the points."""

from __future__ import annotations

from collections.abc import Callable, Mapping

Injector = Callable[[str, Mapping[str, object]], None]

_installed: list[Injector] = []  # empty in the product: then a fault point is one truth test


def fault_point(name: str, **context: object) -> None:
    """A place a test may make fail; ``context`` tells the injector where exactly (e.g. the step number)."""
    for injector in _installed:
        injector(name, context)


def set_injector(injector: Injector | None) -> None:
    """Install (or remove) the test suite's injector: called by tests/faults/ only."""
    _installed[:] = [injector] if injector is not None else []
