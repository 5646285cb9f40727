"""How late the event loop wakes up: a task asks to wake every ``PERIOD`` seconds and records how much later than
asked it did. A handler that blocks the loop (a database call, hashing, a file write on it) shows up here as a stall;
the server logs the figures of each interval (``serve --stats-interval``) and of its whole run when it stops."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

log = logging.getLogger("mobility.server.loop")

PERIOD = 0.02
BUCKET_MS = 1.0
_BUCKETS = 10_000  # up to 10 s, 1 ms each; anything later counts in the last


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * _BUCKETS)
    samples: int = 0
    worst_ms: float = 0.0
    sum_ms: float = 0.0  # /metrics exports the histogram (server/api/metrics.py), whose sum Prometheus needs

    def record(self, late_ms: float) -> None:
        self.counts[min(int(max(late_ms, 0.0) / BUCKET_MS), _BUCKETS - 1)] += 1
        self.samples += 1
        self.sum_ms += max(late_ms, 0.0)
        self.worst_ms = max(self.worst_ms, late_ms)

    def percentile(self, q: float) -> float:
        """The ``q`` quantile of the recorded delays in ms (bucket upper bound); 0 before any sample."""
        if not self.samples:
            return 0.0
        rank = q * self.samples
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return (i + 1) * BUCKET_MS
        return _BUCKETS * BUCKET_MS

    def summary(self) -> str:
        return (
            f"p50 {self.percentile(0.5):.0f} ms, p99 {self.percentile(0.99):.0f} ms, "
            f"max {self.worst_ms:.0f} ms over {self.samples} wake-ups"
        )


@dataclass
class StallMonitor:
    total: Histogram = field(default_factory=Histogram)
    window: Histogram = field(default_factory=Histogram)

    def record(self, late_ms: float) -> None:
        self.total.record(late_ms)
        self.window.record(late_ms)

    def percentile(self, q: float) -> float:
        return self.total.percentile(q)

    @property
    def worst_ms(self) -> float:
        return self.total.worst_ms

    def summary(self) -> str:
        """The whole run so far."""
        return f"event loop stalls: {self.total.summary()}"

    def take_window(self, seconds: float) -> str:
        """The interval since the last call, then a fresh interval."""
        text = f"event loop stalls in the last {seconds:g} s: {self.window.summary()}"
        self.window = Histogram()
        return text

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(PERIOD)
            self.record((loop.time() - start - PERIOD) * 1000)
