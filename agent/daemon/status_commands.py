"""The local commands that read the agent's state (status, health): they work while the daemon is down."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import psutil

from agent import __version__
from agent.daemon.config import load_config
from agent.daemon.health import ServerSample, health_checks, overall
from agent.daemon.health.sample import cert_not_after, disk_sample, process_sample
from agent.daemon.health.self_checks import Health
from agent.daemon.status import DaemonStatus, daemon_pid
from agent.host.paths import Paths
from agent.lifecycle.check_report import Report, run_checks
from agent.lifecycle.failover import load_failover
from agent.lifecycle.freeze import provider_status
from agent.lifecycle.identity import load_registration
from agent.lifecycle.installed import load_install_record
from agent.lifecycle.lastjob import load_last_job
from agent.update.state import load_record, load_target


def local_health(paths: Paths, now: float | None = None) -> tuple[Health, Report]:
    """All health checks, measured now: the daemon process by its PID, the rest from disk and its last record."""
    now = time.time() if now is None else now
    config = load_config(paths)
    status = DaemonStatus.load(paths) or DaemonStatus()
    pid = daemon_pid(paths)
    process = None
    if pid is not None:
        proc = psutil.Process(pid)
        with contextlib.suppress(psutil.Error):
            process = process_sample(proc, cpu_percent=proc.cpu_percent(interval=0.2))
    server = ServerSample(
        status.last_heartbeat_ok, status.unreachable_since, status.rtt_ms, status.skew_seconds, status.last_error
    )
    from agent.replication.state import load_status

    report = run_checks(
        health_checks(
            config,
            now,
            process,
            server,
            disk_sample(paths),
            cert_not_after(paths),
            provider_status(paths),
            load_status(paths),
        )
    )
    return overall(report), report


def local_status(paths: Paths) -> dict[str, Any]:
    reg = load_registration(paths)
    status = DaemonStatus.load(paths)
    installed = load_install_record(paths)
    last_job = load_last_job(paths)
    freeze = provider_status(paths)
    target, upgrade = load_target(paths), load_record(paths)
    failover = load_failover(paths)
    return {
        "version": (installed.version if installed else None) or __version__,
        "installed": installed is not None,
        "host_id": reg.host_id if reg else None,
        "role": (reg.role if reg else None) or (installed.role if installed else None),
        "platform": (reg.platform if reg else None) or (installed.platform if installed else None),
        "server": reg.server if reg else None,
        "registration": ("registered" if reg and paths.client_cert.exists() else "not registered"),
        "cloned_from": reg.cloned_from if reg else None,
        "failover_of": reg.failover_of if reg else None,
        "failover": failover.to_json() if failover else None,
        "daemon": "running" if daemon_pid(paths) else "not running",
        "last_heartbeat": status.last_heartbeat_ok if status else None,
        "server_unreachable_since": status.unreachable_since if status else None,
        "backlog": status.backlog if status else 0,
        "update_available": status.update_available if status else None,
        "health": (status.health or {}).get("status") if status else None,
        "last_job": last_job.to_json() if last_job else None,
        "freeze_provider": freeze.to_json(),
        "target": target.to_json() if target else None,
        "upgrade": upgrade.to_json() if upgrade else None,
    }
