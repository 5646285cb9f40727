"""Measuring what the health checks judge: the daemon process (psutil), disks, the certificate."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import psutil
from cryptography import x509

from agent.daemon.health.self_checks import DiskSample, ProcessSample
from agent.host.paths import Paths


def process_sample(proc: psutil.Process, cpu_percent: float | None = None) -> ProcessSample | None:
    """``cpu_percent`` since the previous call on the same ``proc`` unless given (the daemon keeps its own)."""
    try:
        with proc.oneshot():
            return ProcessSample(
                rss_bytes=proc.memory_info().rss,
                cpu_percent=proc.cpu_percent(None) if cpu_percent is None else cpu_percent,
                threads=proc.num_threads(),
                open_files=proc.num_fds(),
                machine_memory_bytes=psutil.virtual_memory().total,
            )
    except psutil.Error:
        return None


def _free(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # removed meanwhile
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def disk_sample(paths: Paths) -> DiskSample | None:
    if not paths.state_dir.is_dir():
        return None
    return DiskSample(
        free_bytes=min(_free(paths.state_dir), _free(paths.log_dir)),
        used_bytes=_size(paths.state_dir) + _size(paths.log_dir),
    )


def cert_not_after(paths: Paths) -> float | None:
    try:
        return x509.load_pem_x509_certificate(paths.client_cert.read_bytes()).not_valid_after_utc.timestamp()
    except (OSError, ValueError):
        return None


def cert_lifetime(paths: Paths) -> tuple[float, float] | None:
    """(not_before, not_after) of the client certificate."""
    try:
        cert = x509.load_pem_x509_certificate(paths.client_cert.read_bytes())
    except (OSError, ValueError):
        return None
    return cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
