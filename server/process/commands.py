"""How the process server runs a host tool (qemu-img, converting a failover's images): never through a shell,
bounded in time, the exit status returned rather than raised (the caller says what a failure means). Nothing of a
machine's filesystems is read on the host: inspection runs in a throwaway VM (server/process/appliance.py). The server
keeps its own runner: agent/host/proc.py is the agent's."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from server.errors import FailoverToolMissing
from server.process.interrupts import signals_held, take_signal

log = logging.getLogger("mobility.process")

TIMED_OUT = 124  # the exit status `timeout` uses


@dataclass(frozen=True)
class Ran:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def run_tool(argv: Sequence[str], timeout: float) -> Ran:
    """Run ``argv`` with no input; FAILOVER-TOOL-MISSING when the program is not installed. A signal that stops the
    command (server/process/interrupts.py) waits while the tool starts, and lands only while we wait for it: the tool
    is then killed and waited for before the exception goes on, so nothing it does happens after our clean-up."""
    try:
        with signals_held():
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
            )
    except FileNotFoundError as e:
        raise FailoverToolMissing(f"{argv[0]} is not installed") from e
    with proc:
        try:
            take_signal()
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            log.warning("%s did not finish within %.0f s", argv[0], timeout)
            return Ran(tuple(argv), TIMED_OUT, out or "", f"{argv[0]} timed out after {timeout:.0f} s")
        except BaseException:
            with signals_held():
                proc.kill()
                proc.wait()
            raise
    if proc.returncode != 0:
        log.info("%s exited %d", " ".join(argv[:3]), proc.returncode)
    return Ran(tuple(argv), proc.returncode, out, err)
