"""The agent's typed configuration: defaults in code, one loader, /etc/mobility/mobility.conf to override."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from typing import Any

from agent.errors import ConfigInvalid
from agent.host.paths import Paths
from agent.shared.fsutil import NotSmallRegularFile, read_small_file


@dataclass(frozen=True)
class AgentConfig:
    """Every knob of the daemon. /etc/mobility/mobility.conf is a JSON object of any of these fields."""

    memory_budget_mib: float = 64.0
    memory_warn_ratio: float = 0.8  # shed caches and slow optional work from here
    heartbeat_seconds: float = 30.0  # the server's answer overrides it
    health_seconds: float = 60.0
    update_check_seconds: float = 3600.0
    update_window_seconds: float = 600.0  # a new version must reach the server and report healthy within this
    update_settle_seconds: float = 60.0  # ... and stay healthy, without a restart, this long before it is kept
    cpu_warn_percent: float = 50.0
    threads_warn: int = 32
    open_files_warn: int = 256
    disk_free_warn_mib: float = 200.0
    disk_free_fail_mib: float = 50.0
    state_size_warn_mib: float = 100.0
    clock_skew_warn_seconds: float = 60.0
    clock_skew_fail_seconds: float = 300.0
    cert_warn_days: float = 30.0
    cert_fail_days: float = 7.0
    server_unreachable_fail_seconds: float = 600.0
    backlog_max: int = 120  # health reports kept while the server is unreachable
    metrics_port: int | None = None  # Prometheus metrics on 127.0.0.1:PORT when set
    replication_trace_buffer_kb: int = 4096  # per CPU, in the kernel: the trace buffer a write burst must fit in
    replication_backoff_cpu_percent: float = 80.0  # replication slows down while the rest uses this much CPU


def parse_config(text: str, source: str) -> AgentConfig:
    """Pure: the config a JSON document describes; unknown keys and wrong types are errors."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigInvalid(f"{source}: not JSON ({e})") from e
    if not isinstance(doc, dict):
        raise ConfigInvalid(f"{source}: must be a JSON object")
    known = {f.name: f for f in fields(AgentConfig)}
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise ConfigInvalid(f"{source}: unknown settings {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for key, value in doc.items():
        default = getattr(AgentConfig, key)
        if key == "metrics_port":
            ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        if not ok:
            raise ConfigInvalid(f"{source}: {key} = {value!r} is not valid (default {default!r})")
        values[key] = value
    return replace(AgentConfig(), **values)


MAX_CONFIG_BYTES = 64 * 1024  # a few settings: a few hundred bytes


def load_config(paths: Paths) -> AgentConfig:
    path = paths.resolve("/etc/mobility/mobility.conf")
    try:
        _, data = read_small_file(path, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        return AgentConfig()
    except OSError as e:
        raise ConfigInvalid(f"{path}: {e.strerror}") from e
    except NotSmallRegularFile as e:
        raise ConfigInvalid(str(e)) from e
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise ConfigInvalid(f"{path}: not UTF-8 text") from e
    return parse_config(text, str(path))
