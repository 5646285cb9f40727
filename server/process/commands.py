"""How the process server runs the host's tools (losetup, partx, blkid, mount, fsck) for a test failover: never
through a shell, bounded in time, the exit status returned rather than raised (a failing fsck is a finding of the
test, not an error of the command). The server keeps its own runner: agent/proc.py is the agent's."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from server.errors import FailoverToolMissing

log = logging.getLogger("mobility.process")

TIMED_OUT = 124  # the exit status `timeout` uses


@dataclass(frozen=True)
class Ran:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def run_tool(argv: Sequence[str], timeout: float) -> Ran:
    """Run ``argv`` with no input; FAILOVER-TOOL-MISSING when the program is not installed."""
    try:
        r = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError as e:
        raise FailoverToolMissing(f"{argv[0]} is not installed") from e
    except subprocess.TimeoutExpired as e:
        log.warning("%s did not finish within %.0f s", argv[0], timeout)
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return Ran(tuple(argv), TIMED_OUT, out, f"{argv[0]} timed out after {timeout:.0f} s")
    if r.returncode != 0:
        log.info("%s exited %d", " ".join(argv[:3]), r.returncode)
    return Ran(tuple(argv), r.returncode, r.stdout, r.stderr)
