"""The pure parts of failover: image names, and how a signal stops a failover command (tests/security/
test_replication.py runs the commands themselves, with real loop devices, mounts and signals)."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from server.errors import FailoverInterrupted
from server.process.commands import run_tool
from server.process.failover import image_names
from server.process.interrupts import interruptible, signals_held, take_signal


def test_every_disk_of_a_point_gets_an_image_of_its_own() -> None:
    assert image_names(["/dev/sdb", "/dev/disk/by-id/nvme-x"]) == {
        "/dev/sdb": "sdb.img",
        "/dev/disk/by-id/nvme-x": "disk_by-id_nvme-x.img",
    }
    shared = image_names(["/dev/a_b", "/dev/a/b", "/dev/sdc"])
    assert shared["/dev/sdc"] == "sdc.img" and shared["/dev/a_b"] != shared["/dev/a/b"]
    assert all(shared[d].startswith("a_b-") and shared[d].endswith(".img") for d in ("/dev/a_b", "/dev/a/b"))
    # A disk named to meet another's hashed name still gets a file of its own.
    hashed = shared["/dev/a/b"].removesuffix(".img")
    crafted = image_names(["/dev/a_b", "/dev/a/b", f"/dev/{hashed}"])
    assert len(set(crafted.values())) == 3


def test_a_signal_stops_the_command_where_it_lands_or_after_a_held_part() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(FailoverInterrupted, match="failover was stopped by SIGTERM"), interruptible("failover"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    done = []
    with pytest.raises(FailoverInterrupted, match="SIGINT"), interruptible("test-failover"):
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append("held part finished")
        take_signal()
        done.append("not reached")
    assert done == ["held part finished"]
    with pytest.raises(FailoverInterrupted, match="SIGHUP"), interruptible("test-failover"):
        with signals_held():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.05)
        done.append("raised at the end instead")
    assert done[-1] == "raised at the end instead"
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_tool_running_when_the_signal_lands_is_killed_and_waited_for() -> None:
    before = {p.pid for p in psutil.Process().children()}  # a worker may run the suite's PostgreSQL as its child
    started = time.monotonic()
    with pytest.raises(FailoverInterrupted), interruptible("test-failover"):
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
        try:
            run_tool(["sleep", "30"], timeout=60)
        finally:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
    assert time.monotonic() - started < 10
    left = [p.cmdline() for p in psutil.Process().children() if p.pid not in before]
    assert left == []  # the sleep is gone, not left running
