"""Scratch areas: where a test failover (or a failover's marking) keeps what it makes, one directory each under one
scratch root, and the sweep that removes what a killed one left.

An area is locked by its owner for its whole life (an flock on ``.owner.lock`` in it, taken while the root's own
lock is held, so no sweep ever sees an area without its lock); a VM left running with ``--keep`` holds that lock
too. The sweep, at the start of every run, removes each area whose lock it can take: its owner is gone, whatever
ended it (kill -9 included: a descriptor's lock dies with its process). An area kept on purpose (``--keep``) says so
in a file and is left to the operator. The VMs of a dead area are gone already: they die with their owner
(server/process/recovery_vm.py)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from server.process.interrupts import signals_held

log = logging.getLogger("mobility.process")

_OCTAL = re.compile(r"\\([0-7]{3})")
_AREA = re.compile(r"[0-9a-f-]{1,36}-[0-9a-f]{8}")
LOCK = ".owner.lock"
KEPT = "KEPT"


@dataclass
class Area:
    path: Path
    lock_fd: int
    keep: bool


def _locked(path: Path, *, wait: bool) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def _root(scratch: Path) -> Iterator[None]:
    scratch.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = _locked(scratch / ".lock", wait=True)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def sweep(scratch: Path) -> list[Path]:
    """Remove the areas under ``scratch`` whose owner is gone (and that were not kept); the ones removed."""
    removed = []
    with _root(scratch):
        for entry in os.scandir(scratch):
            if not _AREA.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
                continue
            area = Path(entry.path)
            if (area / KEPT).exists():
                continue
            fd = _locked(area / LOCK, wait=False)
            if fd is None:
                continue  # its owner (or its kept VM) is alive
            try:
                if _remove(area):
                    removed.append(area)
            finally:
                os.close(fd)
    for area in removed:
        log.info("removed the scratch area %s: its test failover was gone", area)
    return removed


@contextlib.contextmanager
def area(scratch: Path, name: str, *, keep: bool = False) -> Iterator[Area]:
    """A new area under ``scratch`` (after a sweep), locked for the block and removed after it unless ``keep``."""
    sweep(scratch)
    with _root(scratch):
        path = scratch / f"{name}-{uuid.uuid4().hex[:8]}"
        path.mkdir(mode=0o700)
        fd = _locked(path / LOCK, wait=False)
        if fd is None:
            raise OSError(f"could not lock the new scratch area {path}")
        if keep:
            (path / KEPT).write_text("kept by --keep: remove this directory when done with it\n")
    try:
        yield Area(path, fd, keep)
    finally:
        try:
            if not keep:
                _remove(path)
        finally:
            os.close(fd)


def mounts_under(area: Path) -> list[Path]:
    """This mount namespace's mount points at or under ``area`` (the server makes none: an area is never removed
    through one all the same)."""
    where = area.resolve()
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        point = Path(_OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[4]))
        if point == where or where in point.parents:
            found.append(point)
    return found


def _remove(area: Path) -> bool:
    if not os.path.lexists(area):
        return True
    if mounts_under(area):
        log.error("not removing %s: something is mounted under it", area)
        return False
    with signals_held():
        shutil.rmtree(area, ignore_errors=True)
    return not os.path.lexists(area)
