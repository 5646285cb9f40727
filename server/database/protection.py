"""Replication's rows: which machines are protected (which disks, under which policy, paused or not), the policies,
and the status each machine last reported (written with the heartbeats, an older report never over a newer one)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import RowMapping, and_, bindparam, delete, or_, select, update

from agent.shared.replication_wire import Policy, ReplicationReport
from agent.shared.wire import WireError
from server.database.schema import machines, policies, protection
from server.database.transactions import Access, T, db_errors, dialect_insert


@dataclass(frozen=True)
class ProtectionRow:
    """A protected machine: which disks (or all), its policy, whether paused, and the status it last reported."""

    host_id: str
    disks: tuple[str, ...]
    all_disks: bool
    policy: Policy
    paused: bool
    updated_at: float
    report: ReplicationReport | None = None

    def covers(self, disk: str) -> bool:
        return self.all_disks or disk in self.disks


# A machine's protection and its policy as columns of another query (a machine's credentials, the fleet).
PROTECTION_COLUMNS = (
    protection.c.host_id.label("p_host_id"),
    protection.c.disks.label("p_disks"),
    protection.c.all_disks.label("p_all_disks"),
    protection.c.policy.label("p_policy"),
    protection.c.paused.label("p_paused"),
    protection.c.updated_at.label("p_updated_at"),
    protection.c.report.label("p_report"),
    policies.c.rpo_seconds.label("p_rpo"),
    policies.c.interval_seconds.label("p_interval"),
    policies.c.bandwidth_bps.label("p_bandwidth"),
    policies.c.retention.label("p_retention"),
)


def with_policy(table: Any) -> Any:
    """``table`` (protection, or a join holding it) joined to the policy its rows name."""
    return table.outerjoin(policies, policies.c.name == protection.c.policy)


def with_protection(table: Any) -> Any:
    """``table`` (machines, or a join holding it) joined to each machine's protection and its policy."""
    return with_policy(table.outerjoin(protection, protection.c.host_id == machines.c.host_id))


def _policy(row: RowMapping) -> Policy:
    return Policy(
        str(row["name"]),
        float(row["rpo_seconds"]),
        float(row["interval_seconds"]),
        int(row["bandwidth_bps"]),
        int(row["retention"]),
    )


def row_policy(row: RowMapping) -> Policy:
    """The policy columns of a row of ``PROTECTION_COLUMNS`` (a policy row that is gone: the defaults)."""
    name = str(row["p_policy"])
    if row["p_rpo"] is None:
        return Policy() if name == "default" else Policy(name)
    return Policy(name, float(row["p_rpo"]), float(row["p_interval"]), int(row["p_bandwidth"]), int(row["p_retention"]))


def protection_of(row: RowMapping) -> ProtectionRow | None:
    """The protection columns of a row (``PROTECTION_COLUMNS``), None when the machine protects nothing. A policy
    row that is gone reads as the defaults under its name."""
    if row["p_host_id"] is None:
        return None
    policy = row_policy(row)
    return ProtectionRow(
        host_id=str(row["p_host_id"]),
        disks=tuple(d for d in str(row["p_disks"]).split("\n") if d),
        all_disks=bool(row["p_all_disks"]),
        policy=policy,
        paused=bool(row["p_paused"]),
        updated_at=float(row["p_updated_at"]),
        report=stored_report(row["p_report"]),
    )


def stored_report(text: Any) -> ReplicationReport | None:
    """A replication report as stored, or None when it is not one (a reader never crashes on it)."""
    if not text:
        return None
    try:
        return ReplicationReport.from_json(json.loads(text))
    except (TypeError, ValueError, RecursionError, WireError):
        return None


class Protections(Access[T]):
    """Protection, policies and the status machines report (``Storage``'s part of them)."""

    @db_errors
    def protect(
        self, host_id: str, disks: Iterable[str], all_disks: bool, policy: str, paused: bool, now: float
    ) -> None:
        """Protect ``disks`` (or all) of a machine under ``policy``; the status it last reported stays."""
        values = {
            "host_id": host_id,
            "disks": "\n".join(disks),
            "all_disks": all_disks,
            "policy": policy,
            "paused": paused,
            "updated_at": now,
        }
        with self.transaction() as tx:
            stmt = dialect_insert(self.postgresql)(protection).values(**values)
            tx.conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[protection.c.host_id],
                    set_={k: stmt.excluded[k] for k in ("disks", "all_disks", "policy", "paused", "updated_at")},
                )
            )

    @db_errors
    def change_protection(
        self, host_id: str, now: float, *, paused: bool | None = None, policy: str | None = None
    ) -> bool:
        """Pause, resume or re-policy a protected machine, its disks as they are (one statement: nothing another
        command changed meanwhile is undone); False when it protects nothing."""
        values: dict[str, Any] = {"updated_at": now}
        if paused is not None:
            values["paused"] = paused
        if policy is not None:
            values["policy"] = policy
        with self.transaction() as tx:
            changed = tx.conn.execute(update(protection).where(protection.c.host_id == host_id).values(**values))
            return bool(changed.rowcount)

    @db_errors
    def unprotect(self, host_id: str) -> bool:
        with self.transaction() as tx:
            return bool(tx.conn.execute(delete(protection).where(protection.c.host_id == host_id)).rowcount)

    def protection(self, host_id: str) -> ProtectionRow | None:
        with self.reading() as tx:
            row = tx.conn.execute(
                select(*PROTECTION_COLUMNS).select_from(with_policy(protection)).where(protection.c.host_id == host_id)
            ).first()
            return protection_of(row._mapping) if row else None

    def protections(self) -> list[ProtectionRow]:
        """Every protected machine (the operator's listing; no request calls this)."""
        with self.reading() as tx:
            rows = tx.conn.execute(
                select(*PROTECTION_COLUMNS).select_from(with_policy(protection)).order_by(protection.c.host_id)
            )
            return [p for p in (protection_of(r._mapping) for r in rows) if p is not None]

    @db_errors
    def set_policy(self, policy: Policy) -> None:
        values = {
            "name": policy.name,
            "rpo_seconds": policy.rpo_seconds,
            "interval_seconds": policy.interval_seconds,
            "bandwidth_bps": policy.bandwidth_bps,
            "retention": policy.retention,
        }
        with self.transaction() as tx:
            stmt = dialect_insert(self.postgresql)(policies).values(**values)
            tx.conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[policies.c.name], set_={k: stmt.excluded[k] for k in values if k != "name"}
                )
            )

    def policy(self, name: str) -> Policy | None:
        """A policy by name; ``default`` exists without being created."""
        with self.reading() as tx:
            row = tx.conn.execute(select(policies).where(policies.c.name == name)).first()
        if row is None:
            return Policy() if name == "default" else None
        return _policy(row._mapping)

    def policies(self) -> list[Policy]:
        with self.reading() as tx:
            stored = [_policy(r._mapping) for r in tx.conn.execute(select(policies).order_by(policies.c.name))]
        return stored if any(p.name == "default" for p in stored) else [Policy(), *stored]

    @db_errors
    def record_replication(self, reports: Iterable[tuple[str, float, str]]) -> None:
        """(host ID, received at, replication report JSON) of many machines in one transaction (each instance
        flushes them with its heartbeats); an older report never replaces a newer one."""
        rows = [{"h": h, "t": t, "r": r} for h, t, r in sorted(reports)]
        if not rows:
            return
        stmt = (
            update(protection)
            .where(
                and_(
                    protection.c.host_id == bindparam("h"),
                    or_(protection.c.reported_at.is_(None), protection.c.reported_at <= bindparam("t")),
                )
            )
            .values(report=bindparam("r"), reported_at=bindparam("t"))
        )
        with self.transaction() as tx:
            tx.conn.execute(stmt, rows)
