"""The local replication commands: `mobility point` (ask the running daemon for a recovery point now and wait for
it) and the replication part of `mobility status` (from the file the daemon writes; works while it is down)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from typing import Any

from agent.daemon.status import daemon_pid
from agent.errors import DaemonNotRunning, PointFailed
from agent.host.paths import Paths
from agent.replication.state import forget_request, leave_request, load_status, take_answer
from agent.shared import timefmt


def request_point(paths: Paths, timeout: float = 300.0) -> dict[str, Any]:
    """Cut a point now: a request file for the daemon, SIGUSR2 to wake it, then its result (PointFailed if none)."""
    pid = daemon_pid(paths)
    if pid is None:
        raise DaemonNotRunning("the agent's daemon is not running: no point can be cut")
    request = str(uuid.uuid4())
    leave_request(paths, request)
    try:
        os.kill(pid, signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while (result := take_answer(paths, request)) is None:
            if time.monotonic() >= deadline:
                raise PointFailed(f"the daemon did not cut a point within {timeout:.0f} s")
            time.sleep(0.1)
    finally:
        forget_request(paths, request)
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
        point, freeze = doc.get("last_point_id") or "-", doc.get("freeze_ms")
        lines.append(f"  last point: {timefmt.shown(last)} ({point}, freeze {freeze} ms)")
    plan = doc.get("next_point")
    if isinstance(plan, dict):
        line = (
            f"  next point: expected freeze {plan.get('expected_freeze_ms', 0):.0f} ms; writes change "
            f"{_size(plan.get('dirty_bps'))}/s, replication sends {_size(plan.get('send_bps'))}/s"
        )
        if plan.get("postponed"):
            line += f"; POSTPONED: {plan['postponed']}"
        lines.append(line)
    return lines


def local_replication(paths: Paths) -> dict[str, Any] | None:
    return load_status(paths)
