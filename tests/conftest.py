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


@pytest.fixture(scope="session")
def server_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised configuration server's data directory, shared by the session (not serving)."""
    from tests.integration.serverproc import init_server

    data = tmp_path_factory.mktemp("cs") / "data"
    init_server(data)
    return data


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory, server_data: Path) -> Path:
    """One `packaging/build` for the run (PyInstaller output cached by a hash of the sources), published into
    ``server_data``'s repository."""
    import subprocess

    require_root()
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run(
        [str(REPO / "packaging" / "build"), "--out", str(out), "--publish", str(server_data)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out
