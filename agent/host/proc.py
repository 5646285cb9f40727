"""The one way Mobility runs a command: bounded in time, logged, and failing with the command, code and stderr.

Every command is a host program (systemctl, service, an init script, a hook) and runs with the environment the agent
was started with: the frozen agent runs on its own loader and C library (agent/host/runtime.py), and PyInstaller points
LD_LIBRARY_PATH at them for its own sake; a host program that inherited that would load our libc with the host's
loader. `host_environ` takes back what the frozen program's start-up set."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO

from agent.errors import CommandFailed

log = logging.getLogger("mobility.proc")

# What PyInstaller's bootloader sets for itself and its restart: never meant for another program.
PYINSTALLER_VARIABLES = (
    "_PYI_ARCHIVE_FILE",
    "_PYI_APPLICATION_HOME_DIR",
    "_PYI_PARENT_PROCESS_LEVEL",
    "_PYI_SPLASH_IPC",
    "_PYI_LINUX_PROCESS_NAME",
)


def host_environ(environ: Mapping[str, str] | None = None, frozen: bool | None = None) -> dict[str, str]:
    """The environment for a host program: ``environ`` (default: ours) as it was before the frozen program started.

    PyInstaller prepends its directory to LD_LIBRARY_PATH and keeps the original in LD_LIBRARY_PATH_ORIG (absent
    when there was none): restore it or drop it. Outside a frozen program nothing is changed."""
    env = dict(os.environ if environ is None else environ)
    if not (getattr(sys, "frozen", False) if frozen is None else frozen):
        return env
    original = env.pop("LD_LIBRARY_PATH_ORIG", None)
    if original is None:
        env.pop("LD_LIBRARY_PATH", None)
    else:
        env["LD_LIBRARY_PATH"] = original
    for name in PYINSTALLER_VARIABLES:
        env.pop(name, None)
    return env


Completed = subprocess.CompletedProcess[str]  # what `run` returns


def run(
    cmd: Sequence[str],
    timeout: float = 60.0,
    check: bool = True,
    cancel: threading.Event | None = None,
    *,
    env: Mapping[str, str] | None = None,
    output: IO[bytes] | None = None,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` and wait for it (at most ``timeout``). With ``cancel``, the command runs in a session of its own
    and is killed, with whatever it started, as soon as ``cancel`` is set (the agent stops: a freeze hook must not
    hold the stop past the unit's timeout). ``env``: variables added to the host's environment. ``output``: a file
    that takes stdout and stderr instead of memory (a command whose output has no bound: the caller reads its tail);
    such a command runs in a session of its own too, killed with whatever it started at its timeout. ``cwd``: where
    it runs."""
    log.info("running %s", " ".join(cmd))
    environ = {**host_environ(), **(env or {})}
    if cancel is not None or output is not None:
        return _cancellable(cmd, timeout, check, cancel or threading.Event(), environ, output, cwd)
    try:
        result = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, check=False, env=environ, cwd=cwd
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CommandFailed(f"{' '.join(cmd)}: {e}") from e
    if check and result.returncode != 0:
        raise CommandFailed(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()[-500:]}")
    return result


def _cancellable(
    cmd: Sequence[str],
    timeout: float,
    check: bool,
    cancel: threading.Event,
    environ: Mapping[str, str],
    output: IO[bytes] | None,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if output is None else output,
            stderr=subprocess.PIPE if output is None else subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env=dict(environ),
            cwd=cwd,
        )
    except OSError as e:
        raise CommandFailed(f"{' '.join(cmd)}: {e}") from e
    deadline = time.monotonic() + timeout
    while True:
        try:
            out, err = proc.communicate(timeout=max(0.01, min(0.1, deadline - time.monotonic())))
            break
        except subprocess.TimeoutExpired:
            if not cancel.is_set() and time.monotonic() < deadline:
                continue
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)  # the command and what it started: none holds the pipes open
            proc.communicate()
            why = "cancelled" if cancel.is_set() else f"timed out after {timeout:.0f} s"
            raise CommandFailed(f"{' '.join(cmd)}: {why}") from None
    if check and proc.returncode != 0:
        raise CommandFailed(f"{' '.join(cmd)} exited {proc.returncode}: {(err or '').strip()[-500:]}")
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out or "", err or "")


Child = subprocess.Popen[bytes]  # a detached program `spawn` started


def spawn(cmd: Sequence[str], output: int | None = None) -> Child:
    """Start ``cmd`` detached: its own session (a terminal's hang-up or a restart of whoever started it never reaches
    it), no inherited stdio (it logs to its own files; ``output``, an open file descriptor, takes its stdout and
    stderr), the host's environment. The caller may poll it; a process that outlives its caller is adopted by
    init."""
    log.info("starting %s", " ".join(cmd))
    try:
        return subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if output is None else output,
            stderr=subprocess.DEVNULL if output is None else output,
            start_new_session=True,
            close_fds=True,
            env=host_environ(),
        )
    except OSError as e:
        raise CommandFailed(f"{' '.join(cmd)}: {e}") from e
