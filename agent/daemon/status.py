"""What the daemon records for the local commands (`status`, `health`) to read, even when it is down."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.host.paths import Paths
from agent.shared.fsutil import atomic_write


@dataclass
class DaemonStatus:
    pid: int = 0
    started: float = 0.0
    version: str = ""
    last_heartbeat_ok: float | None = None
    unreachable_since: float | None = None
    last_error: str | None = None
    rtt_ms: float | None = None
    skew_seconds: float | None = None
    backlog: int = 0
    heartbeats_sent: int = 0
    heartbeat_seconds: float | None = None  # the interval it heartbeats at (the server's answer decides)
    update_available: str | None = None
    health: dict[str, Any] = field(default_factory=dict)

    def save(self, paths: Paths) -> None:
        atomic_write(paths.daemon_status, json.dumps(asdict(self), indent=2).encode())

    @classmethod
    def load(cls, paths: Paths) -> DaemonStatus | None:
        try:
            doc = json.loads(paths.daemon_status.read_text())
            known = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}
            return cls(**known)
        except (OSError, ValueError, TypeError):
            return None


def daemon_pid(paths: Paths) -> int | None:
    """The running daemon's PID from its status file, if that process is alive and is the agent."""
    status = DaemonStatus.load(paths)
    if status is None or status.pid <= 0:
        return None
    try:
        with open(f"/proc/{status.pid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
    except OSError:
        return None
    if b"run" not in cmdline or not any(b"mobility" in part or b"agent" in part for part in cmdline):
        return None  # the PID was reused by another program
    return status.pid if os.path.exists(f"/proc/{status.pid}") else None
