"""The operator's view of the fleet (server/ui/): every machine as the dashboard's snapshot reads it, in one query
of narrow columns."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from sqlalchemy import func, select

from agent.shared.replication_wire import Policy
from server.database.machines import stored_health
from server.database.protection import PROTECTION_COLUMNS, row_policy, with_protection
from server.database.schema import machines, protection
from server.database.transactions import Access, T


class FleetRow(NamedTuple):
    """One machine as the dashboard's fleet snapshot reads it (``Storage.fleet``): no keys, certificates or facts.
    A tuple, not a dataclass: ten thousand of them are made for every snapshot."""

    host_id: str
    hostname: str
    os_tag: str
    agent_version: str
    last_seen: float | None
    heartbeat_interval: float
    revoked_at: float | None
    pinned_version: str | None
    cloned_from: str | None
    health: str | None  # the status of its last report (healthy, warning, critical, unknown); None: none stored
    policy: Policy | None  # None: it protects nothing
    paused: bool = False
    reported_at: float | None = None
    report_json: str | None = None  # its last replication report as stored (parsed by the snapshot)

    def online(self, now: float) -> bool:
        """As ``Machine.online``: offline after 3 missed heartbeat intervals."""
        return self.last_seen is not None and now - self.last_seen <= 3 * self.heartbeat_interval


# The head of a health report as the server stores it (json.dumps of HealthReport.to_json: "status" comes first).
_STATUS_HEAD = re.compile(r'\{"status": "(healthy|warning|critical|unknown)"')


def _health_status(text: Any) -> str | None:
    report = stored_health(text)
    return report.status if report else ("unknown" if text else None)


class Fleet(Access[T]):
    """The fleet snapshot's one read (``Storage``'s part of it)."""

    def fleet(self) -> list[FleetRow]:
        """Every machine as the dashboard's fleet snapshot reads it, in one query of narrow columns: the health status
        from the head of its stored report (the rest is never read; a report not in the server's own shape is read
        whole), the protection with its last replication report as stored (JSON, parsed by the snapshot, which
        parses only the reports that changed). O(fleet): a periodic job calls this (server/ui/), never a request."""
        status_head = func.substr(machines.c.health, 1, 40)
        query = select(
            machines.c.host_id,
            machines.c.hostname,
            machines.c.os_tag,
            machines.c.agent_version,
            machines.c.last_seen,
            machines.c.heartbeat_interval,
            machines.c.revoked_at,
            machines.c.pinned_version,
            machines.c.cloned_from,
            status_head,
            protection.c.reported_at,
            *PROTECTION_COLUMNS,
        ).select_from(with_protection(machines))
        with self.reading() as tx:
            rows = tx.conn.execute(query).all()
            odd = [r[0] for r in rows if r[9] is not None and not _STATUS_HEAD.match(r[9])]
            full: dict[str, str | None] = {}
            for i in range(0, len(odd), 500):  # reports not in the server's own shape: read whole, a batch at a time
                batch = odd[i : i + 500]
                full.update(
                    (h, _health_status(t))
                    for h, t in tx.conn.execute(
                        select(machines.c.host_id, machines.c.health).where(machines.c.host_id.in_(batch))
                    )
                )
        out = []
        policies: dict[tuple[Any, ...], Policy] = {}  # one Policy per distinct row: a fleet has a few
        for r in rows:
            head = r[9]
            m = _STATUS_HEAD.match(head) if head is not None else None
            mapping = r._mapping
            policy = None
            if mapping["p_host_id"] is not None:
                key = (mapping["p_policy"], mapping["p_rpo"], mapping["p_interval"], mapping["p_bandwidth"],
                       mapping["p_retention"])  # fmt: skip
                policy = policies.get(key)
                if policy is None:
                    policy = policies[key] = row_policy(mapping)
            raw = mapping["p_report"]
            out.append(
                FleetRow(
                    *r[:9],
                    m.group(1) if m else full.get(r[0]),
                    policy,
                    bool(mapping["p_paused"]),
                    r[10],
                    raw if isinstance(raw, str) else None,
                )
            )
        return out
