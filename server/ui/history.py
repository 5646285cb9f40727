"""The samples behind the dashboard's charts: kept in memory, bounded, per serving instance.

Why memory and not the database: a chart's past is an operational trend, not a record. Writing a sample per disk
per heartbeat would add a fleet's worth of rows to the heartbeat's hot path and a retention job, for figures that
lose nothing important when a restart forgets them (the current state is always in the database, and long-term
history is Prometheus' job: docs/monitoring.md). The samples are taken from the fleet snapshot, which every instance
reads from the shared database, so any instance's charts show the whole fleet, whichever instance received the
heartbeats.

Bounds: the fleet's series keep ``FLEET_SAMPLES`` samples (an hour at the default 10 s refresh); each protected disk
keeps ``DISK_SAMPLES`` samples, one per report it sent (an hour at the agents' 30 s heartbeat), for at most
``MAX_DISKS`` disks (16 bytes a sample: 40 MiB at most; a disk past that bound has no chart and its page says so).
A disk that leaves the snapshot (unprotected, its machine removed) loses its samples."""

from __future__ import annotations

import math
import threading
from array import array
from collections.abc import Sequence

from server.ui.snapshot import Snapshot

FLEET_SAMPLES = 360
DISK_SAMPLES = 120
MAX_DISKS = 20_000
FLEET_COLUMNS = (
    "heartbeats_per_second",
    "heartbeat_p50_ms",
    "heartbeat_p99_ms",
    "max_lag_seconds",
    "throughput_bps",
    "breaches",
    "online",
)


class Ring:
    """A fixed number of samples: a time and ``columns`` figures each (NaN where there was none), oldest first."""

    def __init__(self, capacity: int, columns: int) -> None:
        self.capacity = capacity
        self.times = array("d", bytes(8 * capacity))
        self.values = [array("f", bytes(4 * capacity)) for _ in range(columns)]
        self.count = 0
        self.next = 0

    def append(self, t: float, figures: Sequence[float | None]) -> None:
        self.times[self.next] = t
        for column, value in zip(self.values, figures, strict=True):
            column[self.next] = math.nan if value is None or not math.isfinite(value) else value
        self.next = (self.next + 1) % self.capacity
        self.count = min(self.count + 1, self.capacity)

    def columns(self) -> list[list[float | None]]:
        """[times, column 1, ...] oldest first, as uPlot takes them (None where a figure was missing)."""
        start = (self.next - self.count) % self.capacity
        order = [(start + i) % self.capacity for i in range(self.count)]
        out: list[list[float | None]] = [[round(self.times[i], 3) for i in order]]
        for column in self.values:
            out.append([None if math.isnan(column[i]) else round(float(column[i]), 3) for i in order])
        return out


def quantile(bounds: Sequence[float], counts: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile of a histogram's observations (``counts`` per bucket, not cumulative; the last bucket is
    +Inf), interpolated inside its bucket as Prometheus' histogram_quantile does. None without observations."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    low = 0.0
    for i, n in enumerate(counts):
        high = bounds[i] if i < len(bounds) else bounds[-1]
        if seen + n >= rank and n > 0:
            return low + (high - low) * (rank - seen) / n
        seen += n
        low = high
    return bounds[-1]


class History:
    def __init__(self, bounds: Sequence[float]) -> None:
        self.lock = threading.Lock()  # sampled in one worker thread, read in others (``disk``, ``fleet_columns``)
        self.bounds = tuple(bounds)
        self.fleet = Ring(FLEET_SAMPLES, len(FLEET_COLUMNS))
        self.disks: dict[tuple[str, str], tuple[Ring, float | None]] = {}  # (host, disk) -> samples, last report time
        self.untracked = 0  # disks past MAX_DISKS, without a chart
        self._heartbeats: tuple[float, list[float]] | None = None  # the heartbeat histogram at the last sample

    def sample(self, snap: Snapshot, heartbeat_buckets: list[float], t: float) -> None:
        """One sample of the fleet from a new snapshot, and of every disk that reported since its last sample.
        ``heartbeat_buckets``: this instance's heartbeat histogram (cumulative counts, +Inf last)."""
        rate = p50 = p99 = None
        if self._heartbeats is not None and len(self._heartbeats[1]) == len(heartbeat_buckets):
            then, before = self._heartbeats
            cumulative = [max(0.0, now - was) for now, was in zip(heartbeat_buckets, before, strict=True)]
            per_bucket = [c - (cumulative[i - 1] if i else 0.0) for i, c in enumerate(cumulative)]
            if t > then and cumulative:
                rate = cumulative[-1] / (t - then)
            p50 = quantile(self.bounds, per_bucket, 0.5)
            p99 = quantile(self.bounds, per_bucket, 0.99)
        self._heartbeats = (t, list(heartbeat_buckets))
        lags = [d.lag_now for d in snap.disks if d.lag_now is not None]
        self.fleet.append(
            t,
            (
                rate,
                p50 * 1000 if p50 is not None else None,
                p99 * 1000 if p99 is not None else None,
                max(lags) if lags else None,
                sum(d.throughput for d in snap.disks if not d.stale),
                snap.breaches,
                snap.counts.get("state", {}).get("online", 0),
            ),
        )
        present: set[tuple[str, str]] = set()
        self.untracked = 0
        for d in snap.disks:
            key = (d.host_id, d.disk)
            present.add(key)
            held = self.disks.get(key)
            if held is None:
                if len(self.disks) >= MAX_DISKS:
                    self.untracked += 1
                    continue
                held = (Ring(DISK_SAMPLES, 3), None)
            ring, last = held
            if d.reported_at is not None and d.reported_at != last:
                ring.append(d.reported_at, (d.lag, d.throughput, float(d.bytes_left)))
                held = (ring, d.reported_at)
            self.disks[key] = held
        for gone in set(self.disks) - present:
            del self.disks[gone]

    def disk(self, host_id: str, disk: str) -> list[list[float | None]] | None:
        """[times, lag seconds, throughput bytes/s, bytes left] of a disk, oldest first; None when not charted."""
        with self.lock:
            held = self.disks.get((host_id, disk))
            return held[0].columns() if held else None

    def fleet_columns(self) -> list[list[float | None]]:
        """[times, then each of FLEET_COLUMNS], oldest first."""
        with self.lock:
            return self.fleet.columns()
