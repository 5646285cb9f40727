"""The one way Mobility runs a command: bounded in time, logged, and failing with the command, code and stderr."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence

from agent.errors import CommandFailed

log = logging.getLogger("mobility.proc")


def run(cmd: Sequence[str], timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    log.info("running %s", " ".join(cmd))
    try:
        result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CommandFailed(f"{' '.join(cmd)}: {e}") from e
    if check and result.returncode != 0:
        raise CommandFailed(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()[-500:]}")
    return result
