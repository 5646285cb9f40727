"""Suite-wide rules: integration tests may never be skipped in CI (a skip hides a missing install step)."""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DISTROS = REPO / "tests" / "resources" / "distros"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if os.environ.get("CI") == "true" and report.skipped and item.get_closest_marker("integration"):
        report.outcome = "failed"
        report.longrepr = f"integration test skipped while CI=true: {report.longrepr!r}"
    return report


def require_root() -> None:
    """Integration tests that need root (loop devices, namespaces) skip outside CI, fail inside it."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
