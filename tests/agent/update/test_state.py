"""The upgrade's locks, as other processes see them: one updater at a time, recovery points (shared holds) against a
version switch (exclusive), and UPDATE-BUSY when the wait runs out."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.errors import UpdateBusy
from agent.host.paths import Paths
from agent.update.state import update_lock, updater_running, version_hold, version_switch

_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_SH if sys.argv[2] == "shared" else fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


@contextmanager
def held_elsewhere(lock: Path, how: str) -> Iterator[None]:
    """``lock`` held by another process (as a running updater or a recovery point would) until the block ends."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(lock), how], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path)


def test_a_second_updater_is_refused_at_once_with_update_busy(paths: Paths) -> None:
    assert not updater_running(paths)
    with held_elsewhere(paths.update_lock, "exclusive"):
        assert updater_running(paths)
        started = time.monotonic()
        with pytest.raises(UpdateBusy) as e, update_lock(paths):
            pass
        assert time.monotonic() - started < 1.0  # never waits: the other updater does the work
        assert e.value.id == "UPDATE-BUSY"
    assert not updater_running(paths)  # released the moment its holder ended
    with update_lock(paths):
        pass


def test_a_switch_waits_for_a_recovery_point_then_gives_up_with_update_busy(paths: Paths) -> None:
    with held_elsewhere(paths.switch_lock, "shared"):
        with version_hold(paths):  # another recovery point may run beside it
            pass
        started = time.monotonic()
        with pytest.raises(UpdateBusy, match="a recovery point is being cut"), version_switch(paths, wait=0.5):
            pass
        assert time.monotonic() - started >= 0.5
    with version_switch(paths, wait=0.0):
        pass


def test_a_recovery_point_does_not_start_while_a_version_switch_runs(paths: Paths) -> None:
    with (
        held_elsewhere(paths.switch_lock, "exclusive"),
        pytest.raises(UpdateBusy, match="switching versions"),
        version_hold(paths, wait=0.3),
    ):
        pass
    with version_hold(paths):
        pass
