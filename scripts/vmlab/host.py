"""What the lab does on the host: commands (bounded, errors that name the command), file locks, and the loop devices
and mounts an image build makes, undone in reverse, or swept after a build that was killed (everything below its
directory: mounts by /proc/self/mountinfo, loop devices by their backing file)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def exit_on_sigterm() -> None:
    """For a program using the lab (a CLI, a benchmark): SIGTERM raises SystemExit, so that its clean-up runs (a
    build's mounts and loop devices undone, its VMs stopped) instead of the process ending where it stands."""

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


class VmLabError(RuntimeError):
    """A lab command failed, a VM did not boot or answer in time, or clean-up left something behind."""


def run(
    argv: Sequence[str],
    *,
    timeout: float = 120,
    stdin: str | None = None,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Every command the lab runs on the host: bounded, output captured; a failure names the command, its code and
    the end of its output."""
    full_env = {"PATH": PATH, "LANG": "C.UTF-8", **(env or {})}
    try:
        r = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False, env=full_env
        )
    except subprocess.TimeoutExpired as e:
        raise VmLabError(f"{' '.join(argv)} did not finish within {timeout:g} s") from e
    if check and r.returncode:
        out = (r.stdout[-1500:] + r.stderr[-2500:]).strip()
        raise VmLabError(f"{' '.join(argv)} exited {r.returncode}: {out}")
    return r


@contextlib.contextmanager
def locked(path: Path, shared: bool = False, wait: bool = True) -> Iterator[bool]:
    """An flock on ``path`` (made if missing) for the block; yields False when ``wait`` is off and it is taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the last descriptor of the open file releases its lock


def take_lock(path: Path, shared: bool = False, timeout: float | None = None) -> int | None:
    """An flock held until the returned descriptor is closed (by ``os.close`` or the process's end); None when
    ``timeout`` passed first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.5)


class Undo:
    """Loop devices and mounts, undone in reverse order of creation by `close()` (also after a failure halfway)."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[[], object]]] = []

    def loop(self, file: Path, offset: int = 0, size: int | None = None) -> str:
        """A new loop device over ``file`` (from ``offset``, ``size`` bytes): `losetup -f`, never a fixed number."""
        argv = ["losetup", "--find", "--show"]
        if offset:
            argv += ["--offset", str(offset)]
        if size is not None:
            argv += ["--sizelimit", str(size)]
        device = run([*argv, str(file)]).stdout.strip()
        self._undo.append((f"loop device {device}", lambda: run(["losetup", "--detach", device])))
        return device

    def mount(self, argv: Sequence[str], where: Path) -> None:
        where.mkdir(parents=True, exist_ok=True)
        run(["mount", *argv, str(where)])
        self._undo.append((f"mount {where}", lambda: unmount(where)))

    def close(self) -> None:
        errors = []
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except Exception as e:  # go on: one leftover must not leave all the others behind
                errors.append(f"{what}: {e}")
        if errors:
            raise VmLabError("clean-up incomplete: " + "; ".join(errors))


def unmount(where: Path) -> None:
    if run(["umount", str(where)], check=False).returncode:
        run(["umount", "--lazy", str(where)])  # still busy: detached now, freed when the last user goes


def mounts_below(directory: Path) -> list[Path]:
    """Mount points at or below ``directory`` in this mount namespace, deepest first."""
    base = str(directory.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        if point == base or point.startswith(base + "/"):
            found.append(Path(point))
    return sorted(set(found), key=lambda p: -len(p.parts))


def loops_below(directory: Path) -> list[str]:
    """Loop devices whose backing file is at or below ``directory`` (a deleted one too)."""
    base = str(directory.resolve())
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            name = backing.read_text().strip().removesuffix(" (deleted)")
            if name == base or name.startswith(base + "/"):
                found.append(f"/dev/{backing.parent.parent.name}")
    return sorted(found)


def sweep(directory: Path) -> list[str]:
    """Undo what a killed build left below ``directory``: unmount its mounts, detach its loop devices. The caller
    holds the lock that keeps live builders out of it. Returns what it undid."""
    undone = []
    for point in mounts_below(directory):
        unmount(point)
        undone.append(f"mount {point}")
    for device in loops_below(directory):
        run(["losetup", "--detach", device])
        undone.append(f"loop device {device}")
    return undone
