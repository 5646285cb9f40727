"""Heartbeats, the hot path: each serving instance batches them in memory and writes them in one transaction a
second (``record_heartbeats``), never moving a machine's state backwards; and the reports daemons queued during an
outage, kept as history."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import insert, select, text

from agent.shared.wire import HealthReport
from server.database.machines import stored_health
from server.database.schema import health_history
from server.database.transactions import Access, T, db_errors

HISTORY_SECONDS = 7 * 86400.0  # queued health reports are kept this long


@dataclass(frozen=True)
class Beat:
    """One heartbeat as an instance buffers it: when it was received, the version and the health report (JSON)."""

    host_id: str
    received_at: float
    agent_version: str
    health: str


class Heartbeats(Access[T]):
    """Heartbeats and health history (``Storage``'s part of them)."""

    @db_errors
    def record_heartbeats(self, beats: Iterable[Beat]) -> None:
        """Many machines' heartbeats in one transaction. A beat older than the stored one changes nothing: several
        instances flush independently, and a machine's state never goes back in time."""
        rows = [
            {"h": b.host_id, "t": b.received_at, "v": b.agent_version, "health": b.health}
            for b in sorted(beats, key=lambda b: b.host_id)  # one lock order for every writer: no deadlocks
        ]
        if not rows:
            return
        stmt = text(
            "UPDATE machines SET last_seen = :t, agent_version = :v, health = :health "
            "WHERE host_id = :h AND (last_seen IS NULL OR last_seen <= :t)"
        )
        with self.transaction() as tx:
            tx.conn.execute(stmt, rows)

    @db_errors
    def record_history(self, reports: Iterable[tuple[str, float | None, float, HealthReport]]) -> None:
        """Reports daemons queued during an outage, (host ID, measured, received, report) in one transaction: kept
        as history, never as a machine's current state."""
        rows = [
            {
                "host_id": host_id,
                "reported_at": reported_at,
                "received_at": received_at,
                "status": health.status,
                "health": json.dumps(health.to_json()),
            }
            for host_id, reported_at, received_at, health in reports
        ]
        if rows:
            with self.transaction() as tx:
                tx.conn.execute(insert(health_history), rows)

    def history(self, host_id: str, limit: int = 100) -> list[tuple[float | None, float, HealthReport | None]]:
        """The newest queued reports of a machine: (when the agent measured it, when it arrived, the report)."""
        with self.reading() as tx:
            rows = tx.conn.execute(
                select(health_history.c.reported_at, health_history.c.received_at, health_history.c.health)
                .where(health_history.c.host_id == host_id)
                .order_by(health_history.c.received_at.desc(), health_history.c.id.desc())
                .limit(limit)
            )
            return [(r[0], r[1], stored_health(r[2])) for r in rows]
