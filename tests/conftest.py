"""Suite-wide rules: integration tests may never be skipped in CI (a skip hides a missing install step); every Python
the suite starts carries its fault injector and error record (tests/faults/); the catalogue check of the error IDs
the suite saw runs last, when the whole suite ran."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Generator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DISTROS = REPO / "tests" / "resources" / "distros"
RECORD_CHECK = "tests/test_errors_catalogue.py::test_every_catalogued_error_was_raised_by_the_suite"


def pytest_configure(config: pytest.Config) -> None:
    from tests import faults

    if faults.RECORD not in os.environ:
        os.environ[faults.RECORD] = tempfile.mkdtemp(prefix="mobility-error-record-")
        # as /tmp: the process of a test that runs as another user records its own file
        os.chmod(os.environ[faults.RECORD], 0o1777)  # noqa: S103
    python_path = [str(faults.SITE), str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(python_path))
    faults.record_errors(Path(os.environ[faults.RECORD]))
    config.stash[_DESELECTED] = 0


_DESELECTED = pytest.StashKey[int]()
WHOLE_SUITE = pytest.StashKey[bool]()


def pytest_deselected(items: list[pytest.Item]) -> None:
    if items:
        config = items[0].config
        config.stash[_DESELECTED] = config.stash.get(_DESELECTED, 0) + len(items)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The record check last: it reads what every other test (and every process they started) recorded."""
    last = [i for i in items if i.nodeid == RECORD_CHECK]
    items[:] = [i for i in items if i.nodeid != RECORD_CHECK] + last


def pytest_collection_finish(session: pytest.Session) -> None:
    files = {str(Path(str(item.path)).relative_to(REPO)) for item in session.items}
    every = {str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")}
    session.config.stash[WHOLE_SUITE] = files == every and session.config.stash.get(_DESELECTED, 0) == 0


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


@pytest.fixture(scope="session", autouse=True)
def _postgres_cluster() -> Generator[None, None, None]:
    """The shared PostgreSQL cluster (tests/postgres.py) is started on first use; stopped by PID at the end."""
    from tests.postgres import stop_shared_cluster

    try:
        yield
    finally:
        stop_shared_cluster()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty database URL on each engine: a SQLite file, and a database in the shared PostgreSQL cluster."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mobility.db'}"
    require_root()
    from tests.postgres import shared_cluster

    return shared_cluster().new_database()


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
