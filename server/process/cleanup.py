"""Nothing a test failover attaches or mounts outlives it: it ends by sweeping its scratch area, releasing every
mount under it and every loop device whose backing file is in it, whatever step it was at or whatever stopped it
(server/process/interrupts.py; a loop device whose ``losetup`` was stopped before it printed its name included).
Signals wait while that runs, so a second Ctrl-C cannot cut it short. A SIGKILL cannot be caught: what it leaves
is in the area named after the point, for `losetup -j` and `umount` by hand."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

from server.process.commands import run_tool
from server.process.interrupts import signals_held

log = logging.getLogger("mobility.process")

_OCTAL = re.compile(r"\\([0-7]{3})")


def mounts_under(area: Path) -> list[Path]:
    """This mount namespace's mount points at or under ``area``, deepest first."""
    where = area.resolve()
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        point = Path(_OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[4]))
        if point == where or where in point.parents:
            found.append(point)
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def loops_backed_under(area: Path) -> list[str]:
    """The loop devices (``/dev/loopN``) whose backing file is under ``area``."""
    prefix = str(area.resolve()) + "/"
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if backing.read_text().strip().startswith(prefix):
                found.append("/dev/" + backing.parent.parent.name)
    return sorted(found)


def release(area: Path) -> list[str]:
    """Unmount everything under ``area`` and detach every loop device backed by a file in it (signals held); what
    could not be released, for the caller to report."""
    left: list[str] = []
    with signals_held():
        for point in mounts_under(area):
            # Busy (a process inside it): detached from the tree at once, and let go by the kernel when unused.
            if (
                run_tool(["umount", str(point)], timeout=120).returncode != 0
                and run_tool(["umount", "--lazy", str(point)], timeout=60).returncode != 0
            ):
                left.append(f"mount {point}")
        for loop in loops_backed_under(area):
            run_tool(["partx", "--delete", loop], timeout=30)
            if run_tool(["losetup", "--detach", loop], timeout=30).returncode != 0:
                left.append(f"loop device {loop}")
    for what in left:
        log.error("test failover could not release %s (scratch area %s)", what, area)
    return left


def remove_area(area: Path) -> None:
    """Remove a scratch area once nothing is mounted under it (never delete through a mount that is left)."""
    import shutil

    if not os.path.lexists(area):
        return
    if mounts_under(area):
        log.error("not removing %s: something is still mounted under it", area)
        return
    with signals_held():
        shutil.rmtree(area, ignore_errors=True)
