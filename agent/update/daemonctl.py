"""Restart the daemon and watch it through what supervises it on this machine: systemd, a SysV init script, or
nothing (a daemon started by hand or by a supervisor we do not know, and every daemon of a root given with --root).
The upgrade watcher (agent/update/watcher.py) uses one of these; each says whether the daemon runs and how many times it
exited since the watcher started counting.

- systemd restarts a crashed daemon itself (``Restart=on-failure``); its exits are counted from the unit's own
  start and exit timestamps, so a daemon that crashes between two looks is still counted.
- SysV and no supervisor: nobody restarts a crashed daemon, so while it watches, the watcher does (as an init system
  would, after ``RESTART_DELAY``), and counts each exit it sees.
- Without a supervisor the daemon is asked to start again from ``current`` with SIGUSR1: it executes the launcher of
  the version ``current`` names, with the same PID (whoever started it keeps its child); one that does not comply in
  time is killed and started anew, detached.

Each also says what the new version printed (``output``), for the upgrade job's detail when it is rolled back: the
unit's journal under systemd; without an init system the daemons the watcher starts write their stdout and stderr to
/var/log/mobility/daemon.out (emptied at each start, so it holds the last start's words; a daemon asked to start
again in place keeps writing to it, so only what follows the request is the new version's); the SysV script sends
them to agent.log, whose tail the job carries anyway.

A supervisor never raises out of ``look``: systemd that does not answer in time (a busy PID 1) is "unknown, look
again", not the end of the watcher."""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.daemon.status import DaemonStatus
from agent.errors import CommandFailed
from agent.host.distros import Init
from agent.host.paths import Paths
from agent.host.proc import Child, run, spawn
from agent.lifecycle.services import live_systemd

log = logging.getLogger("mobility.daemonctl")

UNIT = "mobility.service"
INIT_SCRIPT = "/etc/init.d/mobility"
PIDFILE = "/var/run/mobility.pid"
RESTART_DELAY = 2.0  # seconds a dead daemon stays down before the watcher starts it (systemd's RestartSec is 5)
REEXEC_WAIT = 15.0  # seconds a daemon asked to start again has to do it before it is killed


OUTPUT_LINES = 20  # of the new version's own output, for the job's detail
OUTPUT_BYTES = 4096


@dataclass(frozen=True)
class Seen:
    running: bool | None  # None: the supervisor could not tell this time (look again)
    pid: int | None
    exits: int  # since ``mark``


class Supervisor(Protocol):
    kind: str

    def mark(self) -> None:
        """Count exits from now on."""

    def restart(self) -> None:
        """Start the daemon again from ``current`` (or start it, if it is not running)."""

    def look(self) -> Seen:
        """Whether the daemon runs now, and the exits since ``mark``; restarts a daemon that died (SysV, none)."""

    def output(self, since: float) -> list[str]:
        """The last lines the daemon printed since ``since`` (wall clock) to its stdout and stderr, where kept."""


def supervisor_for(paths: Paths, init: Init, daemon_argv: list[str]) -> Supervisor:
    """The supervisor of this machine's daemon. ``daemon_argv`` starts a daemon from ``current`` when nothing else
    would (no init system, or a root given with --root: never the running host's units)."""
    if paths.root == paths.root.parent:
        if init is Init.SYSTEMD and live_systemd(paths):
            return SystemdSupervisor()
        if init is Init.SYSV and Path(INIT_SCRIPT).exists():
            return SysvSupervisor(paths)
    return NoSupervisor(paths, daemon_argv)


def _alive(pid: int | None) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    if pid is None or pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def _is_daemon(pid: int, paths: Paths) -> bool:
    """Whether ``pid`` is this root's daemon (`mobility run`, with a --root that leads to this root), not a process
    that reused the PID, nor the daemon of another root on the same host."""
    try:
        cmdline = [part.decode(errors="replace") for part in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    if "run" not in cmdline or not any("mobility" in part or "agent" in part for part in cmdline):
        return False
    root = "/"
    if "--root" in cmdline[:-1]:
        root = os.path.realpath(os.path.join(cwd, cmdline[cmdline.index("--root") + 1]))
    return root == str(paths.root)


class SystemdSupervisor:
    kind = "systemd"

    def __init__(self) -> None:
        self._mark_us: int | None = None
        self._exits: set[int] = set()

    def mark(self) -> None:
        self._mark_us = time.monotonic_ns() // 1000  # CLOCK_MONOTONIC, as systemd's *TimestampMonotonic
        self._exits.clear()

    def restart(self) -> None:
        run(["systemctl", "daemon-reload"], check=False)
        run(["systemctl", "reset-failed", UNIT], check=False)  # a unit that hit its start limit starts again
        run(["systemctl", "restart", "--no-block", UNIT], timeout=60)

    def look(self) -> Seen:
        try:
            props = self._show()
        except CommandFailed as e:  # systemd busy: nothing is concluded from a look it did not answer
            log.warning("systemd did not say how mobility.service is (%s): looking again", e.message)
            return Seen(None, None, len(self._exits))
        pid = int(props.get("MainPID", "0") or 0)
        state = props.get("ActiveState", "")
        start = int(props.get("ExecMainStartTimestampMonotonic", "0") or 0)
        end = int(props.get("ExecMainExitTimestampMonotonic", "0") or 0)
        if self._mark_us is not None and start >= self._mark_us and end >= start > 0:
            self._exits.add(end)
        running = pid > 0 and state in ("active", "activating", "reloading")
        return Seen(running, pid or None, len(self._exits))

    @staticmethod
    def _show() -> dict[str, str]:
        names = "MainPID,ActiveState,ExecMainStartTimestampMonotonic,ExecMainExitTimestampMonotonic"
        r = run(["systemctl", "show", UNIT, "-p", names], check=False, timeout=30)
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    def output(self, since: float) -> list[str]:
        try:
            r = run(
                ["journalctl", "-u", UNIT, "--since", f"@{int(since)}", "-o", "cat", "--no-pager",
                 "-n", str(OUTPUT_LINES)],
                check=False,
                timeout=15,
            )  # fmt: skip
        except CommandFailed:
            return []
        return _last_lines(r.stdout)


class _Tended(abc.ABC):
    """SysV and none: the watcher restarts a dead daemon and counts each exit it sees."""

    def __init__(self) -> None:
        self._pid: int | None = None
        self._exits = 0
        self._down_since: float | None = None

    def mark(self) -> None:
        self._exits = 0

    def output(self, since: float) -> list[str]:
        return []

    @abc.abstractmethod
    def _current_pid(self) -> int | None:
        """The running daemon's PID, if one runs."""

    @abc.abstractmethod
    def _start(self) -> int | None:
        """Start the daemon; its PID when known (so that an exit before the next look is still counted)."""

    def look(self) -> Seen:
        pid = self._current_pid()
        if _alive(pid):
            self._pid, self._down_since = pid, None
            return Seen(True, pid, self._exits)
        if self._pid is not None:  # the one we saw running is gone
            self._exits += 1
            self._pid = None
            log.warning("the daemon exited (%d since the watcher started counting)", self._exits)
        now = time.monotonic()
        self._down_since = self._down_since if self._down_since is not None else now
        if now - self._down_since >= RESTART_DELAY:
            self._down_since = None
            try:
                self._pid = self._start()
            except CommandFailed as e:  # tried again after the next delay
                log.warning("could not start the daemon: %s", e.message)
        return Seen(False, None, self._exits)


class SysvSupervisor(_Tended):
    kind = "sysv"

    def __init__(self, paths: Paths) -> None:
        super().__init__()
        self.paths = paths

    def _current_pid(self) -> int | None:
        try:
            return int(self.paths(PIDFILE).read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def restart(self) -> None:
        run([INIT_SCRIPT, "restart"], timeout=60)
        self._pid = self._current_pid()  # the new daemon's: counted even if it exits before the next look

    def _start(self) -> int | None:
        run([INIT_SCRIPT, "start"], timeout=60, check=False)
        return self._current_pid()


class NoSupervisor(_Tended):
    kind = "none"

    def __init__(self, paths: Paths, daemon_argv: list[str]) -> None:
        super().__init__()
        self.paths = paths
        self.argv = daemon_argv
        self._children: list[Child] = []
        self._output_from = 0  # where daemon.out holds the words of the daemon this supervisor (re)started

    def _current_pid(self) -> int | None:
        for child in self._children:
            child.poll()  # reap what we started, so that it does not linger as a zombie
        status = DaemonStatus.load(self.paths)
        pid = status.pid if status is not None else None
        if pid and _alive(pid) and _is_daemon(pid, self.paths):
            return pid
        live = [c.pid for c in self._children if c.returncode is None]
        return live[-1] if live else None

    def restart(self) -> None:
        pid = self._current_pid()
        if pid is None:
            self._pid = self._start()
            return
        # The started daemon writes its status anew: a record newer than the one it had before the signal (not one
        # "started about now": a daemon that started a moment ago would pass for its own re-execution).
        before = DaemonStatus.load(self.paths)
        then = before.started if before is not None and before.pid == pid else None
        # A daemon asked to start again in place keeps its stdout: daemon.out, if a watcher started it before. What
        # that file holds now is the previous version's; the new version's words come after it. (A watcher that
        # takes over reads all of it: the words it would otherwise lose are the new version's.)
        try:
            self._output_from = os.stat(self.paths.daemon_output).st_size
        except OSError:
            self._output_from = 0
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + REEXEC_WAIT
        while time.monotonic() < deadline:
            time.sleep(0.2)
            status = DaemonStatus.load(self.paths)
            again = status is not None and status.pid == pid and (then is None or status.started > then)
            if not _alive(pid) or again:
                self._pid = pid  # a new version that crashed at once is counted by the next look
                return
        log.warning("the daemon (pid %d) did not start again within %.0f s: killing it", pid, REEXEC_WAIT)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(50):
            if not _alive(pid):
                break
            time.sleep(0.1)
        self._pid = self._start()

    def _start(self) -> int:
        self._children = [c for c in self._children if c.poll() is None]
        out = _open_output(self.paths)
        self._output_from = 0  # emptied: all it will hold is this start's
        try:
            child = spawn(self.argv, output=out)
        finally:
            if out is not None:
                os.close(out)
        self._children.append(child)
        return child.pid

    def output(self, since: float) -> list[str]:
        try:
            fd = os.open(self.paths.daemon_output, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return []
        with os.fdopen(fd, "rb") as f:
            if os.fstat(f.fileno()).st_mtime < since:
                return []  # an earlier start's words
            end = f.seek(0, 2)
            start = self._output_from if self._output_from <= end else 0  # emptied by another watcher's start
            at = f.seek(max(start, end - OUTPUT_BYTES))
            text = f.read(OUTPUT_BYTES).decode("utf-8", "replace")
            if at > start:  # a line cut at the start is dropped: half a secret would not be recognised to be redacted
                text = text.partition("\n")[2]
            return _last_lines(text)


def _open_output(paths: Paths) -> int | None:
    """/var/log/mobility/daemon.out, emptied, for a daemon about to start (None: it cannot be written)."""
    try:
        paths.log_dir.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(paths.daemon_output, flags, 0o640)
    except OSError as e:
        log.warning("the daemon's output goes nowhere: %s: %s", paths.daemon_output, e.strerror)
        return None


def _last_lines(text: str, count: int = OUTPUT_LINES) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][-count:]
