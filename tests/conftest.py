"""Suite-wide rules: integration tests may never be skipped in CI (a skip hides a missing install step); every Python
the suite starts carries its fault injector and error record (tests/faults/); the catalogue check of the error IDs
the suite saw runs last, when the whole suite ran (with parallel workers: in the controlling process, after every
worker finished); the longest test files start first and a `solo` test runs alone (tests/workers.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from tests import workers

REPO = Path(__file__).resolve().parent.parent
DISTROS = REPO / "tests" / "resources" / "distros"
RECORD_CHECK = "tests/test_errors_catalogue.py::test_every_catalogued_error_was_raised_by_the_suite"


def pytest_configure(config: pytest.Config) -> None:
    from tests import faults

    owned = []  # what this process made for the run (the first one; workers inherit): removed at its end
    if faults.RECORD not in os.environ:
        os.environ[faults.RECORD] = tempfile.mkdtemp(prefix="mobility-error-record-")
        # as /tmp: the process of a test that runs as another user records its own file
        os.chmod(os.environ[faults.RECORD], 0o1777)  # noqa: S103
        owned.append(Path(os.environ[faults.RECORD]))
    if workers.RUN not in os.environ:
        owned.append(workers.run_dir())  # before the workers start: they inherit it
    config.stash[_OWNED] = owned
    python_path = [str(faults.SITE), str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(python_path))
    faults.record_errors(Path(os.environ[faults.RECORD]))
    config.stash[_DESELECTED] = 0
    config.stash[_WORKERS_WHOLE] = []


def pytest_unconfigure(config: pytest.Config) -> None:
    for made in config.stash.get(_OWNED, []):
        shutil.rmtree(made, ignore_errors=True)


_DESELECTED = pytest.StashKey[int]()
WHOLE_SUITE = pytest.StashKey[bool]()
_WORKERS_WHOLE = pytest.StashKey[list[bool]]()
_OWNED = pytest.StashKey[list[Path]]()
# The test files that take longest (a minute or more each), started first so that no worker is left with one of
# them at the end while the others idle; the rest keep their order.
LONGEST_FIRST = (
    "tests/integration/test_vm_protection.py",
    "tests/integration/test_vm_templates.py",
    "tests/integration/test_vm_failover.py",
    "tests/integration/test_failover_inspection.py",
    "tests/integration/test_demo.py",
    "tests/integration/test_replication.py",
    "tests/integration/test_updates.py",
    "tests/integration/test_bootstrap.py",
    "tests/integration/test_template_boot.py",
    "tests/integration/test_push.py",
    "tests/security/test_server_commands.py",
    "tests/security/test_api.py",
    "tests/integration/test_server.py",
    "tests/security/test_bundle_archives.py",
    "tests/integration/test_packaging_build.py",
    "tests/security/test_replication.py",
)


def pytest_deselected(items: list[pytest.Item]) -> None:
    if items:
        config = items[0].config
        config.stash[_DESELECTED] = config.stash.get(_DESELECTED, 0) + len(items)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first; the record check last: it reads what every other test (and every process they
    started) recorded."""
    rank = {name: n for n, name in enumerate(LONGEST_FIRST)}
    last = [i for i in items if i.nodeid == RECORD_CHECK]
    rest = [i for i in items if i.nodeid != RECORD_CHECK]
    items[:] = sorted(rest, key=lambda i: rank.get(i.nodeid.split("::")[0], len(rank))) + last


def pytest_collection_finish(session: pytest.Session) -> None:
    files = {str(Path(str(item.path)).relative_to(REPO)) for item in session.items}
    every = {str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")}
    whole = files == every and session.config.stash.get(_DESELECTED, 0) == 0
    session.config.stash[WHOLE_SUITE] = whole
    if hasattr(session.config, "workeroutput"):  # a worker: tells the controlling process
        session.config.workeroutput["whole_suite"] = whole


def in_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    """Among parallel workers, a `solo` test runs alone (tests/workers.py)."""
    if not in_worker(item.config):
        return (yield)
    with workers.turn(solo=item.get_closest_marker("solo") is not None):
        return (yield)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """The controlling process of a parallel run: whether this worker collected the whole suite (a worker that
    crashed sent nothing: not whole)."""
    output = getattr(node, "workeroutput", None) or {}
    node.config.stash[_WORKERS_WHOLE].append(bool(output.get("whole_suite")) and error is None)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With parallel workers the record check runs here, once every worker finished (in each worker the test
    itself skips): every catalogued error ID was raised by some process of the run."""
    config = session.config
    whole = config.stash.get(_WORKERS_WHOLE, [])
    if in_worker(config) or not whole or not all(whole) or os.geteuid() != 0:
        return
    from tests import faults
    from tests.test_errors_catalogue import missing_from_record

    missing = missing_from_record(Path(os.environ[faults.RECORD]))
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if missing:
        if reporter is not None:
            reporter.write_sep("=", "FAILED: the error catalogue's record check", red=True)
            reporter.write_line(f"{RECORD_CHECK}: no test raised {', '.join(missing)}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif reporter is not None:
        reporter.write_line(f"{RECORD_CHECK}: every catalogued error ID was raised (checked after all workers)")


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
def dist() -> Path:
    """One `packaging/build` for the run, shared by its workers (its PyInstaller output is also cached under build/
    by a hash of the sources), published into the run's ``server_data``."""
    require_root()

    def build(out: Path) -> None:
        from tests.integration.serverproc import init_server

        data = _published_data()
        shutil.rmtree(data.parent, ignore_errors=True)
        data.parent.mkdir()
        init_server(data, f"sqlite:///{data / 'mobility.db'}")  # SQLite, its own file: outlives any worker
        packaging_build("--out", str(out), "--publish", str(data))

    return workers.once("dist", build)


@pytest.fixture(scope="session")
def server_data(dist: Path) -> Path:
    """An initialised configuration server's data directory (not serving) into which the run's bundles were
    published by `packaging/build --publish`."""
    return _published_data()


def _published_data() -> Path:
    return workers.run_dir() / "published" / "data"


def packaging_build(*args: str) -> None:
    """`packaging/build` with ``args`` (the suite's venv is set up already: its Python runs build.py directly)."""
    cmd = [sys.executable, str(REPO / "packaging" / "build.py"), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
