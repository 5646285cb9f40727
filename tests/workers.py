"""What the suite's parallel workers (pytest-xdist, started by ./run-tests) share: one directory per run, things made
once per run in it (the frozen build, the update tests' releases), and the lock that runs a `solo` test alone.

The directory is named by ``MOBILITY_TEST_RUN``, which the first pytest process of a run sets (tests/conftest.py) and
the workers inherit. Everything here also works, uncontended, in a run without workers."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

RUN = "MOBILITY_TEST_RUN"


def run_dir() -> Path:
    """This run's shared directory (made on first use when no run set one: a lone `python -m pytest` in a worker)."""
    if not os.environ.get(RUN):
        os.environ[RUN] = tempfile.mkdtemp(prefix="mobility-test-run-")
    return Path(os.environ[RUN])


@contextmanager
def locked(path: Path, shared: bool = False) -> Iterator[None]:
    """An flock on ``path`` (made if missing) for the block: exclusive, or shared with other shared holders."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor of the open file releases its lock


def once(name: str, make: Callable[[Path], None]) -> Path:
    """``run_dir()/name``, made by ``make`` by the first worker that asks, while the others wait; a make that failed
    leaves nothing behind, so the next one that asks tries again (and reports its own failure)."""
    where = run_dir() / name
    done = run_dir() / f"{name}.done"
    with locked(run_dir() / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(where, ignore_errors=True)
            where.mkdir()
            try:
                make(where)
            except BaseException:
                shutil.rmtree(where, ignore_errors=True)
                raise
            done.touch()
    return where


@contextmanager
def turn(solo: bool) -> Iterator[None]:
    """A readers-writer lock over the run's tests: a `solo` test (one that measures time or load, which other tests
    running beside it would distort) waits until no other test runs and keeps the others waiting while it runs;
    other tests run beside each other. The gate is held by a solo test while it waits, so a stream of other tests
    cannot starve it."""
    gate, tests = run_dir() / "gate.lock", run_dir() / "tests.lock"
    if solo:
        with locked(gate), locked(tests):
            yield
        return
    with locked(gate):
        pass  # a waiting solo test goes first
    with locked(tests, shared=True):
        yield
