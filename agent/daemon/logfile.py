"""The daemon's own log file, /var/log/mobility/agent.log, rotated by size."""

from __future__ import annotations

import io
import logging.handlers
import os


class AgentLog(logging.handlers.RotatingFileHandler):
    """agent.log, opened without following a link planted at its name (rotation renames names, never targets)."""

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)  # the handler closes it
