"""The local replication commands: `mobility point` (ask the running daemon for a recovery point now and wait for
it) and the replication part of `mobility status` (from the file the daemon writes; works while it is down)."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from typing import Any

from agent.fsutil import atomic_write
from agent.paths import Paths
from agent.replication.engine import load_status, requests_dir
from agent.replication.errors import DaemonNotRunning, PointFailed
from agent.status import daemon_pid


def request_point(paths: Paths, timeout: float = 300.0) -> dict[str, Any]:
    """Cut a point now: a request file for the daemon, SIGUSR1 to wake it, then its result (PointFailed if none)."""
    pid = daemon_pid(paths)
    if pid is None:
        raise DaemonNotRunning("the agent's daemon is not running: no point can be cut")
    folder = requests_dir(paths)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    request = str(uuid.uuid4())
    atomic_write(folder / f"{request}.req", b"{}\n", 0o600)
    result_path = folder / f"{request}.json"
    try:
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                result: dict[str, Any] = json.loads(result_path.read_text())
                break
            except (OSError, ValueError):
                time.sleep(0.1)
        else:
            raise PointFailed(f"the daemon did not cut a point within {timeout:.0f} s")
    finally:
        (folder / f"{request}.req").unlink(missing_ok=True)
        result_path.unlink(missing_ok=True)
    if not result.get("ok"):
        raise PointFailed(f"{result.get('error')}: {result.get('message')}")
    return result


def _size(n: object) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _seconds(s: object) -> str:
    if not isinstance(s, (int, float)):
        return "-"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def status_lines(doc: dict[str, Any] | None) -> list[str]:
    """`mobility status`'s replication lines: one per protected disk (state, left, lag, throughput, ETA)."""
    if not doc or not doc.get("disks"):
        return ["replication:    no disk protected"]
    lines = ["replication:"]
    for d in doc["disks"]:
        line = (
            f"  {d.get('disk')}: {d.get('state')}, {_size(d.get('bytes_left'))} left, "
            f"lag {_seconds(d.get('lag_seconds'))}, {_size(d.get('throughput_bps'))}/s, "
            f"ETA {_seconds(d.get('eta_seconds'))}"
        )
        if d.get("error"):
            line += f" [{d['error']}: {d.get('detail') or ''}]"
        elif d.get("detail") and d.get("state") != "CONTINUOUS":
            line += f" ({d['detail']})"
        lines.append(line)
    last = doc.get("last_point")
    if isinstance(last, (int, float)):
        stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(last))
        lines.append(f"  last point: {stamp} ({doc.get('last_point_id') or '-'}, freeze {doc.get('freeze_ms')} ms)")
    return lines


def local_replication(paths: Paths) -> dict[str, Any] | None:
    return load_status(paths)
