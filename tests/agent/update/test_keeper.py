"""The watcher's keeper where no init system restarts a watcher (real processes): a watcher killed in the middle of
an upgrade is started again; one that ends its run, or whose upgrade is over, is not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.host.paths import Paths
from agent.update.state import Outcome, Phase, UpgradeRecord, save_record
from scripts.polling import wait_for
from tests.conftest import REPO

JOB = "11111111-1111-4111-8111-111111111111"

WATCHER = """
import sys, time
from pathlib import Path
from agent.host.paths import Paths
from agent.update.keeper import kept
root, marker, how = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
again = [sys.executable, "-c", f"open({marker!r}, 'w').write('taken over')"]
with kept(Paths(root), again, poll=0.05) as keeper:
    print(keeper, flush=True)
    if how == "return":
        time.sleep(0.5)
    elif how == "raise":
        raise RuntimeError("an error the watcher did not survive")
    else:
        time.sleep(60)
print("ended", flush=True)
"""


def watcher(root: Path, marker: Path, how: str) -> tuple[subprocess.Popen[str], int]:
    """The watcher and its keeper's PID."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WATCHER, str(root), str(marker), how], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def gone(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie not yet reaped by init counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True


def record(root: Path, phase: Phase) -> None:
    outcome = Outcome("UPDATE-CRASHED", "rolled back") if phase.terminal else None
    save_record(Paths(root), UpgradeRecord("0.1.0", "0.1.1", JOB, phase, time.time(), outcome=outcome, reported=True))


@pytest.mark.parametrize("how", ["kill", "raise"])
def test_a_watcher_that_dies_in_the_middle_of_an_upgrade_is_started_again(tmp_path: Path, how: str) -> None:
    record(tmp_path, Phase.WATCHING)
    marker = tmp_path / "taken-over"
    proc, _keeper = watcher(tmp_path, marker, how)
    if how == "kill":
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    wait_for("the keeper to start the watcher again", marker.exists, 20)


def test_a_watcher_that_ends_its_run_stops_its_keeper(tmp_path: Path) -> None:
    """A run that returns (committed, rolled back, postponed for a repository that answers 503): its keeper goes
    with it, so a postponed download is not tried again at once (the daemon tries later)."""
    record(tmp_path, Phase.FETCHING)
    marker = tmp_path / "taken-over"
    proc, keeper = watcher(tmp_path, marker, "return")
    assert proc.wait(timeout=10) == 0
    assert gone(keeper)  # stopped before the watcher ended
    assert not marker.exists()


def test_nothing_is_taken_over_once_the_upgrade_is_over(tmp_path: Path) -> None:
    record(tmp_path, Phase.ROLLED_BACK)  # ended and reported
    marker = tmp_path / "taken-over"
    proc, keeper = watcher(tmp_path, marker, "kill")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    wait_for("the keeper to end", lambda: gone(keeper), 20)  # it looked, found nothing to take over, and ended
    assert not marker.exists()
