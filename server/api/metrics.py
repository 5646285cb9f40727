"""What one serving instance measures of itself, for /metrics (docs/monitoring.md): requests by route, method and
status, the heartbeat's latency, enrolments by outcome, the event loop's stalls (server/api/stalls.py) and connections.

Counted on the event loop by a middleware (a few microseconds a request) into prometheus_client's metrics, in a
registry of the instance's own (tests run several servers in one process). The fleet's figures (machines, disks,
points, the store, rollouts) are not here: they come from the database, through the dashboard's snapshot
(server/ui/snapshot.py). Routes are labelled by their pattern (``/v1/repo/targets/{name}``), never by the path a
client sent, so a client cannot grow the label set; a path that matched no route counts as ``unmatched``."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from agent.shared import wire
from server.api.stalls import BUCKET_MS, StallMonitor

if TYPE_CHECKING:
    from server.api.edge import Connections

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

HEARTBEAT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STALL_BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
MAX_OUTCOMES = 100  # enrolment outcomes are error IDs (a fixed set); past this many, counted as "other"

# The *_created series of every counter only double the output: Prometheus sees resets from the counters themselves.
disable_created_metrics()  # type: ignore[no-untyped-call]


class ServerMetrics:
    """One instance's own figures."""

    def __init__(self, stalls: StallMonitor, connections: Connections | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "mobility_http_requests",
            "HTTP requests answered, by route pattern (the dashboard's prefixed `ui `), method and status code.",
            ["route", "method", "code"],
            registry=self.registry,
        )
        self.heartbeat = Histogram(
            "mobility_heartbeat_seconds",
            "Time to answer a heartbeat, from its arrival to its answer (this instance).",
            buckets=HEARTBEAT_BUCKETS,
            registry=self.registry,
        )
        self.enrolments = Counter(
            "mobility_enrolments",
            "Enrolments by outcome: enrolled, or the error ID that refused them.",
            ["outcome"],
            registry=self.registry,
        )
        self.registry.register(_Instance(stalls, connections))
        self._outcomes: set[str] = set()

    def enrolment(self, outcome: str) -> None:
        if outcome not in self._outcomes and len(self._outcomes) >= MAX_OUTCOMES:
            outcome = "other"
        self._outcomes.add(outcome)
        self.enrolments.labels(outcome).inc()

    def heartbeat_latencies(self) -> tuple[list[float], float]:
        """The heartbeat histogram's cumulative bucket counts (in HEARTBEAT_BUCKETS order, then +Inf) and its count:
        the dashboard's charts take differences of these between two samples."""
        counts: list[float] = []
        total = 0.0
        for metric in self.heartbeat.collect():
            for sample in metric.samples:
                if sample.name.endswith("_bucket"):
                    counts.append(sample.value)
                elif sample.name.endswith("_count"):
                    total = sample.value
        return counts, total

    def exposition(self) -> bytes:
        """This instance's figures in the Prometheus text format."""
        return generate_latest(self.registry)

    async def observe(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The API's outermost middleware: sees the status the error middleware made of any failure."""
        start = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            route = request.match_info.route.resource
            pattern = route.canonical if route is not None else "unmatched"
            self.requests.labels(pattern, request.method if request.method in _METHODS else "other", str(status)).inc()
            if pattern == _HEARTBEAT and status == 200:
                self.heartbeat.observe(time.perf_counter() - start)


_METHODS = frozenset({"GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"})
_HEARTBEAT = wire.HEARTBEAT_PATH


class _Instance:
    """The event loop's stalls and the connections, read when /metrics is asked for."""

    def __init__(self, stalls: StallMonitor, connections: Connections | None) -> None:
        self.stalls = stalls
        self.connections = connections

    def collect(self) -> Iterator[Metric]:
        total = self.stalls.total
        buckets: list[tuple[str, float]] = []
        seen = 0
        edges = iter(STALL_BUCKETS_MS)
        edge = next(edges, None)
        for i, n in enumerate(total.counts):
            upper = (i + 1) * BUCKET_MS
            while edge is not None and upper > edge:
                buckets.append((f"{edge / 1000:g}", seen))
                edge = next(edges, None)
            seen += n
        while edge is not None:
            buckets.append((f"{edge / 1000:g}", seen))
            edge = next(edges, None)
        buckets.append(("+Inf", total.samples))
        stall = HistogramMetricFamily(
            "mobility_event_loop_lateness_seconds",
            "How late the event loop woke from a 20 ms sleep: a handler that blocks the loop shows here.",
        )
        stall.add_metric([], buckets, total.sum_ms / 1000)
        yield stall
        yield GaugeMetricFamily(
            "mobility_event_loop_lateness_max_seconds", "The latest the event loop ever woke.", total.worst_ms / 1000
        )
        if self.connections is not None:
            c = self.connections
            yield GaugeMetricFamily("mobility_connections_open", "Open API connections.", len(c.open))
            yield CounterMetricFamily(
                "mobility_connections_refused", "API connections refused at the connection limit.", c.refused
            )
            yield CounterMetricFamily(
                "mobility_connections_timed_out",
                "API connections closed for a request that came too slowly.",
                c.timed_out,
            )
