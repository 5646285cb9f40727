"""Prometheus metrics of the daemon's health checks, on 127.0.0.1 when `metrics_port` is set."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

_STATUS = {"PASS": 0, "WARN": 1, "FAIL": 2, "UNKNOWN": 3}


class Metrics:
    def __init__(self, port: int) -> None:
        self.registry = CollectorRegistry()
        self.check = Gauge(
            "mobility_health_check_status",
            "Health check status: 0 pass, 1 warn, 2 fail, 3 unknown",
            ["check"],
            registry=self.registry,
        )
        self.health = Gauge(
            "mobility_health", "Overall health: 0 healthy, 1 warning, 2 critical, 3 unknown", registry=self.registry
        )
        self.rss = Gauge("mobility_resident_memory_bytes", "Resident memory of the daemon", registry=self.registry)
        self.backlog = Gauge("mobility_report_backlog", "Health reports waiting for the server", registry=self.registry)
        self.heartbeats = Counter("mobility_heartbeats", "Heartbeats the server acknowledged", registry=self.registry)
        self._sent = 0
        self.server, _thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)

    def update(self, report: dict[str, Any], rss_bytes: int, backlog: int, heartbeats_sent: int) -> None:
        for check in report.get("checks", []):
            self.check.labels(check["id"]).set(_STATUS.get(check["status"], 3))
        self.health.set({"healthy": 0, "warning": 1, "critical": 2}.get(report.get("status", ""), 3))
        self.rss.set(rss_bytes)
        self.backlog.set(backlog)
        if heartbeats_sent > self._sent:
            self.heartbeats.inc(heartbeats_sent - self._sent)
            self._sent = heartbeats_sent

    def close(self) -> None:
        self.server.shutdown()
