"""The machines: what an enrolment records (a new machine, or new key and facts for one that proved its key), what
the server knows of each (``Machine``), how the fleet is looked up (by host ID, key, machine-id facts, the token it
enrolled with), removal, and the version each is told to run (a rollout's target, a pin; decided by
server/releases/rollouts.py). The certificates are server/database/certificates.py, the heartbeats heartbeats.py."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import RowMapping, and_, delete, func, or_, select, update

from agent.shared.wire import HealthReport, MachineFacts, WireError
from server.database.schema import machines, protection, tokens
from server.database.transactions import Access, TxBase, db_errors, dialect_insert


@dataclass(frozen=True)
class Machine:
    host_id: str
    hostname: str
    os_tag: str
    role: str
    platform: str
    agent_version: str
    facts: MachineFacts
    cloned_from: str | None
    enrolled_at: float
    cert_serial: str
    cert_not_after: float
    last_seen: float | None
    heartbeat_interval: float
    health: HealthReport | None
    public_key: str | None = None  # PEM of the current certificate's key: re-enrolment as this host must prove it
    enrol_token_id: str | None = None  # the enrolment token it used, if any (a push job's token)
    pending_serial: str | None = None  # issued by a renewal, not presented yet
    pending_public_key: str | None = None
    revoked_at: float | None = None
    target_version: str | None = None  # the version it is told to run (a rollout's wave, a pin); None: its own
    target_job: str | None = None  # the upgrade job it reports that move under
    pinned_version: str | None = None  # kept at this version (an operator's pin, or a rollback's) until unpinned
    pin_reason: str | None = None
    failover_of: str | None = None  # a failed-over machine registered as itself: the machine it is a failover of
    failover_point: str | None = None  # and the point it was failed over from

    def online(self, now: float) -> bool:
        """Offline after 3 missed heartbeat intervals."""
        return self.last_seen is not None and now - self.last_seen <= 3 * self.heartbeat_interval

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def proof_keys(self) -> list[str]:
        """The keys that prove this host in a re-enrolment: the current one, and a renewed one not used yet."""
        return [k for k in (self.public_key, self.pending_public_key) if k]


@dataclass(frozen=True)
class NewMachine:
    """What an enrolment records: a new machine, or new key and facts for one that proved its key."""

    host_id: str
    hostname: str
    os_tag: str
    role: str
    platform: str
    agent_version: str
    facts: MachineFacts
    cloned_from: str | None
    cert_serial: str
    cert_not_after: float
    public_key: str
    enrol_token_id: str | None
    heartbeat_interval: float
    failover_of: str | None = None
    failover_point: str | None = None


def key_id(public_pem: str) -> str:
    """sha256 (hex) of a public key's SubjectPublicKeyInfo: an index key for "a machine that holds this key"."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(public_pem.encode())
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


class MachineRows(TxBase):
    """The machines' queries inside one transaction."""

    def machine(self, host_id: str) -> Machine | None:
        row = self.conn.execute(select(machines).where(machines.c.host_id == host_id)).first()
        return machine_of(row._mapping) if row else None

    def all_machines(self) -> list[Machine]:
        """Every machine, by host ID (an operator's command: a rollout's selection, never a request)."""
        return [machine_of(r._mapping) for r in self.conn.execute(select(machines).order_by(machines.c.host_id))]

    def machine_with_key(self, key: str) -> Machine | None:
        row = self.conn.execute(
            select(machines).where(machines.c.key_id == key).order_by(machines.c.enrolled_at.desc()).limit(1)
        ).first()
        return machine_of(row._mapping) if row else None

    def find_by_facts(self, facts: MachineFacts) -> Machine | None:
        """The machine enrolled with the same facts (by the machine-id index, not a scan): an original before a clone
        of it, then the newest."""
        if not facts.machine_id:
            return None
        rows = self.conn.execute(
            select(machines)
            .where(machines.c.machine_id == facts.machine_id)
            .order_by(machines.c.cloned_from.is_(None).desc(), machines.c.enrolled_at.desc(), machines.c.host_id)
            .limit(50)
        )
        return next((m for m in (machine_of(r._mapping) for r in rows) if m.facts.same_machine(facts)), None)

    def enrol_machine(self, m: NewMachine, now: float, *, take_use: bool = True) -> bool:
        """Record the machine (new, or new key and facts for one that proved its key); with ``take_use``, one use of
        its token (False, and nothing recorded, when none is left). An enrolment asked for again takes none."""
        if m.enrol_token_id is not None and take_use:
            taken = self.conn.execute(
                update(tokens)
                .where(
                    and_(
                        tokens.c.token_id == m.enrol_token_id,
                        tokens.c.uses_left.is_not(None),
                        tokens.c.uses_left > 0,
                    )
                )
                .values(uses_left=tokens.c.uses_left - 1)
            ).rowcount
            unlimited = self.conn.execute(
                select(1).where(and_(tokens.c.token_id == m.enrol_token_id, tokens.c.uses_left.is_(None)))
            ).first()
            if not taken and not unlimited:
                return False
        values = {
            "host_id": m.host_id,
            "hostname": m.hostname,
            "os_tag": m.os_tag,
            "role": m.role,
            "platform": m.platform,
            "agent_version": m.agent_version,
            "facts": json.dumps(m.facts.to_json()),
            "cloned_from": m.cloned_from,
            "failover_of": m.failover_of,
            "failover_point": m.failover_point,
            "enrolled_at": now,
            "cert_serial": m.cert_serial,
            "cert_not_after": m.cert_not_after,
            "heartbeat_interval": m.heartbeat_interval,
            "public_key": m.public_key,
            "key_id": key_id(m.public_key),
            "machine_id": m.facts.machine_id,
            "enrol_token_id": m.enrol_token_id,
        }
        stmt = dialect_insert(self.postgresql)(machines).values(**values)
        changed = (
            "hostname",
            "os_tag",
            "role",
            "platform",
            "agent_version",
            "facts",
            "cert_serial",
            "cert_not_after",
            "public_key",
            "key_id",
            "machine_id",
        )
        self.conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[machines.c.host_id],
                set_={
                    **{c: stmt.excluded[c] for c in changed},
                    "enrol_token_id": func.coalesce(stmt.excluded.enrol_token_id, machines.c.enrol_token_id),
                    "pending_serial": None,
                    "pending_not_after": None,
                    "pending_public_key": None,
                },
            )
        )
        return True

    # The version a machine is told to run (server/releases/rollouts.py decides; these write what it decided) --------

    def set_target(self, host_id: str, version: str, job_id: str) -> None:
        """Tell the machine to move to ``version``, reporting the move under ``job_id`` (a rollout's offer)."""
        self.conn.execute(
            update(machines).where(machines.c.host_id == host_id).values(target_version=version, target_job=job_id)
        )

    def withdraw_target(self, host_id: str, job_id: str | None) -> None:
        """Tell the machine its own version again, if it still has the target of ``job_id``."""
        self.conn.execute(
            update(machines)
            .where(and_(machines.c.host_id == host_id, machines.c.target_job == job_id))
            .values(target_version=None, target_job=None)
        )

    def pin(self, host_id: str, version: str, reason: str, job_id: str | None) -> None:
        """Keep the machine at ``version`` (its target too: ``job_id`` names the move when it runs another)."""
        self.conn.execute(
            update(machines)
            .where(machines.c.host_id == host_id)
            .values(pinned_version=version, pin_reason=reason, target_version=version, target_job=job_id)
        )

    def unpin(self, host_id: str) -> None:
        """The machine follows rollouts again, told its own version until one offers it another."""
        self.conn.execute(
            update(machines)
            .where(machines.c.host_id == host_id)
            .values(pinned_version=None, pin_reason=None, target_version=None, target_job=None)
        )

    def pin_unpinned(self, host_id: str, job_id: str | None, version: str, reason: str) -> None:
        """Pin the machine at ``version`` unless it is pinned already or was told another move since ``job_id``
        (its target is that job's or none)."""
        self.conn.execute(
            update(machines)
            .where(
                and_(
                    machines.c.host_id == host_id,
                    or_(machines.c.target_job == job_id, machines.c.target_job.is_(None)),
                    machines.c.pinned_version.is_(None),
                )
            )
            .values(pinned_version=version, pin_reason=reason, target_version=version, target_job=None)
        )

    def repin(self, host_id: str, job_id: str, version: str, reason: str) -> None:
        """Pin the machine at ``version`` instead, if its target is still the move of ``job_id``."""
        self.conn.execute(
            update(machines)
            .where(and_(machines.c.host_id == host_id, machines.c.target_job == job_id))
            .values(pinned_version=version, pin_reason=reason, target_version=version, target_job=None)
        )


M = TypeVar("M", bound=MachineRows)


class Machines(Access[M]):
    """The machines (``Storage``'s part of them)."""

    def machine(self, host_id: str) -> Machine | None:
        with self.reading() as tx:
            return tx.machine(host_id)

    def machines(self) -> list[Machine]:
        """Every machine (the operator's listing; no request calls this)."""
        with self.reading() as tx:
            rows = tx.conn.execute(select(machines).order_by(machines.c.hostname, machines.c.host_id))
            return [machine_of(r._mapping) for r in rows]

    def find_by_facts(self, facts: MachineFacts) -> Machine | None:
        with self.reading() as tx:
            return tx.find_by_facts(facts)

    def host_enrolled_with(self, token_id: str) -> str | None:
        """The host ID of the machine that enrolled with this token (a push's single-use token), if any."""
        with self.reading() as tx:
            row = tx.conn.execute(
                select(machines.c.host_id)
                .where(machines.c.enrol_token_id == token_id)
                .order_by(machines.c.enrolled_at.desc())
                .limit(1)
            ).first()
            return str(row[0]) if row else None

    def enrol_machine(self, m: NewMachine, now: float) -> bool:
        """Take one use of the machine's token (if any) and record the machine, in one transaction. False (and
        nothing written) when the token has no use left by then: concurrent enrolments cannot overdraw it."""
        with self.transaction() as tx:
            return tx.enrol_machine(m, now)

    @db_errors
    def remove(self, host_id: str) -> bool:
        """Forget ``host_id`` (its certificates are then refused as unknown); its jobs and history stay."""
        with self.transaction() as tx:
            tx.conn.execute(delete(protection).where(protection.c.host_id == host_id))
            return bool(tx.conn.execute(delete(machines).where(machines.c.host_id == host_id)).rowcount)


def machine_of(row: RowMapping) -> Machine:
    """A row of the machines table as a ``Machine`` (its facts and health read defensively)."""
    return Machine(
        host_id=row["host_id"],
        hostname=row["hostname"],
        os_tag=row["os_tag"],
        role=row["role"],
        platform=row["platform"],
        agent_version=row["agent_version"],
        facts=_stored_facts(row["facts"]),
        cloned_from=row["cloned_from"],
        enrolled_at=row["enrolled_at"],
        cert_serial=row["cert_serial"],
        cert_not_after=row["cert_not_after"],
        last_seen=row["last_seen"],
        heartbeat_interval=row["heartbeat_interval"],
        health=stored_health(row["health"]),
        public_key=row["public_key"],
        enrol_token_id=row["enrol_token_id"],
        pending_serial=row["pending_serial"],
        pending_public_key=row["pending_public_key"],
        revoked_at=row["revoked_at"],
        target_version=row["target_version"],
        target_job=row["target_job"],
        pinned_version=row["pinned_version"],
        pin_reason=row["pin_reason"],
        failover_of=row["failover_of"],
        failover_point=row["failover_point"],
    )


def _stored_facts(text: Any) -> MachineFacts:
    try:
        return MachineFacts.from_json(json.loads(text))
    except (TypeError, ValueError, RecursionError):
        return MachineFacts()


def stored_health(text: Any) -> HealthReport | None:
    """A health report as stored, or None when it is not one (a reader never crashes on it)."""
    if not text:
        return None
    try:
        return HealthReport.stored(json.loads(text))
    except (TypeError, ValueError, RecursionError, WireError):
        return None
