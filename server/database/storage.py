"""The server's database, one data-access layer for SQLite (the embedded default) and PostgreSQL (fleets, several
instances): SQLAlchemy Core, with the schema versioned by Alembic (server/database/migrations/).

Enrolments and jobs are committed before the HTTP response acknowledges them, so a kill -9 loses nothing
acknowledged (SQLite runs with synchronous=FULL). Heartbeats are the hot path: each instance batches them in memory
and writes them in one transaction a second (``record_heartbeats``), never moving a machine's state backwards.
Every lookup a request makes is by primary key or an index; nothing a request does costs O(number of machines).

These calls block: a serving instance runs them in its worker threads (server/api/app.py), never on its event loop.
What a client sent is validated at the edge (agent/shared/wire.py) before it gets here; the readers still never trust a
stored document (a row written by an older server is read defensively)."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, ParamSpec, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    RowMapping,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DatabaseError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from agent.shared.replication_wire import Policy, ReplicationReport
from agent.shared.wire import HealthReport, MachineFacts, WireError
from server.database import migrations
from server.database.connection import POOL_SIZE, Database, make_engine
from server.database.schema import (
    enrol_failures,
    health_history,
    jobs,
    machines,
    policies,
    protection,
    retired_passphrases,
    tokens,
    used_nonces,
)
from server.errors import (
    CertRevoked,
    CertSuperseded,
    DatabaseCorrupt,
    DatabaseMissing,
    DatabaseSchemaNewer,
    DatabaseSchemaOld,
    DatabaseUnavailable,
    JobNotOwned,
    UnknownMachine,
)

HISTORY_SECONDS = 7 * 86400.0  # queued health reports are kept this long
FAILURE_SECONDS = 3600.0  # failed proofs are kept this long (the rate limit looks at the last minute)

P = ParamSpec("P")
R = TypeVar("R")


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
class Credential:
    """What checking a machine's client certificate needs (a narrow row: the heartbeat path reads one per call)."""

    host_id: str
    cert_serial: str
    pending_serial: str | None
    pending_public_key: str | None
    revoked_at: float | None
    heartbeat_interval: float
    target_version: str | None = None  # what its heartbeat answer names (server/releases/rollouts.py)
    target_job: str | None = None
    pinned_version: str | None = None
    protection: ProtectionRow | None = None  # what its heartbeat answer asks it to protect (replication)

    def verify(self, serial: str) -> bool:
        """Whether the certificate ``serial`` is good: True when it is the renewed one presented for the first time
        (to be promoted), False when it is the current one. CERT-REVOKED for a revoked host, CERT-SUPERSEDED for a
        certificate a renewal or re-enrolment replaced. (A removed host has no Credential: MACHINE-UNKNOWN.)"""
        if self.revoked_at is not None:
            raise CertRevoked(f"host {self.host_id} was revoked by the server's operator")
        if same_serial(serial, self.cert_serial):
            return False
        if same_serial(serial, self.pending_serial):
            return True
        raise CertSuperseded(
            f"this certificate of host {self.host_id} (serial {serial[:40]}) was replaced by a newer one"
        )


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


@dataclass(frozen=True)
class Job:
    job_id: str
    host_id: str | None
    hostname: str
    kind: str
    state: str
    error_id: str | None
    remediation: str | None
    detail: str | None
    created_at: float
    updated_at: float
    owner: str | None = None  # who may update it: "host:<id>", "token:<id>" or "passphrase"


@dataclass(frozen=True)
class Beat:
    """One heartbeat as an instance buffers it: when it was received, the version and the health report (JSON)."""

    host_id: str
    received_at: float
    agent_version: str
    health: str


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
    report = _stored_health(text)
    return report.status if report else ("unknown" if text else None)


def key_id(public_pem: str) -> str:
    """sha256 (hex) of a public key's SubjectPublicKeyInfo: an index key for "a machine that holds this key"."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(public_pem.encode())
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def same_serial(a: str | None, b: str | None) -> bool:
    """Serial numbers as hex text (ours lower-case, OpenSSL's upper-case and zero-padded) compared as numbers."""
    if not a or not b:
        return False
    try:
        return int(a, 16) == int(b, 16)
    except ValueError:
        return False


def _db_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """A database that cannot be reached, is locked, full or read-only is DB-UNAVAILABLE (HTTP 503 with
    Retry-After); nothing of the failed transaction stays."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (OperationalError, InterfaceError, PoolTimeout) as e:
            raise DatabaseUnavailable(_reason(e)) from e

    return wrapper


def _reason(e: Exception) -> str:
    """The driver's first line (never the statement or its parameters, which may hold secrets)."""
    lines = str(getattr(e, "orig", None) or type(e).__name__).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


class Storage:
    """One database; thread-safe (a pool of connections). ``open`` checks the schema is the code's."""

    def __init__(self, db: Database, engine: Engine) -> None:
        self.db = db
        self.engine = engine
        self.postgresql = db.postgresql

    # Opening and migrating -------------------------------------------------------------------------------

    @classmethod
    def open(cls, db: Database, *, create: bool = False, pool_size: int = POOL_SIZE) -> Storage:
        """Open ``db``, which must hold the current schema. With ``create``, a missing SQLite file or an empty
        database gets it (a data directory whose database vanished must not silently start empty: every machine
        would be lost). An older schema is DB-SCHEMA-OLD (`mobility-server upgrade`), a newer one DB-SCHEMA-NEWER."""
        path = db.sqlite_path
        created = path is not None and not path.exists() and not path.is_symlink()
        if path is not None and not created and not path.is_file():  # a FIFO would block SQLite's first read
            raise DatabaseCorrupt(f"{path} is not a regular file")
        if created and not create:
            raise DatabaseMissing(f"{path} does not exist")
        if created and path is not None:
            path.touch(mode=0o600)  # machines, tokens and retired passphrases: the server's eyes only
        engine = make_engine(db, pool_size=pool_size)
        try:
            with opening(db), engine.connect().execution_options(write=True) as conn, conn.begin():
                if path is not None and conn.exec_driver_sql("PRAGMA quick_check").scalar_one() != "ok":
                    raise DatabaseCorrupt(f"{db}: quick_check failed")
                revision = migrations.current(conn)
                if revision is None:
                    if not create:
                        raise DatabaseMissing(f"{db} holds no Mobility tables")
                    migrations.upgrade(conn)
                elif revision != migrations.HEAD:
                    if revision != "legacy" and revision not in migrations.REVISIONS:
                        raise DatabaseSchemaNewer(f"{db} is at schema {revision}, newer than this server knows")
                    raise DatabaseSchemaOld(f"{db} is at schema {revision}; this server needs {migrations.HEAD}")
        except BaseException:
            engine.dispose()
            raise
        return cls(db, engine)

    @staticmethod
    def upgrade(db: Database) -> tuple[str | None, str]:
        """Bring ``db`` to the newest schema in one transaction (an existing SQLite file or PostgreSQL database);
        returns (from, to) revisions."""
        path = db.sqlite_path
        if path is not None and not path.exists():
            raise DatabaseMissing(f"{path} does not exist")
        if path is not None and not path.is_file():
            raise DatabaseCorrupt(f"{path} is not a regular file")
        engine = make_engine(db, pool_size=0)
        try:
            with opening(db), engine.connect().execution_options(write=True) as conn, conn.begin():
                if migrations.current(conn) is None:
                    raise DatabaseMissing(f"{db} holds no Mobility tables: run `mobility-server init` for it")
                return migrations.upgrade(conn)
        finally:
            engine.dispose()

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """One write transaction: all of it or nothing (DatabaseUnavailable when the database cannot take it)."""
        try:
            with self.engine.connect().execution_options(write=True) as conn, conn.begin():
                yield Tx(conn, self.postgresql)
        except (OperationalError, InterfaceError, PoolTimeout) as e:
            raise DatabaseUnavailable(_reason(e)) from e

    @contextmanager
    def reading(self) -> Iterator[Tx]:
        """One read-only transaction, for the server's modules that query the tables themselves
        (server/releases/rollouts.py)."""
        with self._read() as tx:
            yield tx

    @contextmanager
    def _read(self) -> Iterator[Tx]:
        try:
            with self.engine.connect() as conn, conn.begin():
                yield Tx(conn, self.postgresql)
        except (OperationalError, InterfaceError, PoolTimeout) as e:
            raise DatabaseUnavailable(_reason(e)) from e

    # Machines ---------------------------------------------------------------------------------------------

    def machine(self, host_id: str) -> Machine | None:
        with self._read() as tx:
            return tx.machine(host_id)

    def machines(self) -> list[Machine]:
        """Every machine (the operator's listing; no request calls this)."""
        with self._read() as tx:
            rows = tx.conn.execute(select(machines).order_by(machines.c.hostname, machines.c.host_id))
            return [_machine(r._mapping) for r in rows]

    def find_by_facts(self, facts: MachineFacts) -> Machine | None:
        with self._read() as tx:
            return tx.find_by_facts(facts)

    def host_enrolled_with(self, token_id: str) -> str | None:
        """The host ID of the machine that enrolled with this token (a push's single-use token), if any."""
        with self._read() as tx:
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

    @_db_errors
    def renew_certificate(self, host_id: str, serial: str, not_after: float, public_key: str) -> None:
        """Record a renewed certificate as the next one: the current one stays valid until it is first presented."""
        with self.transaction() as tx:
            tx.conn.execute(
                update(machines)
                .where(machines.c.host_id == host_id)
                .values(pending_serial=serial, pending_not_after=not_after, pending_public_key=public_key)
            )

    def present_certificate(self, host_id: str, serial: str) -> Credential:
        """The machine a verified client certificate (CN ``host_id``, ``serial``) speaks for, if that certificate is
        still good (``Credential.check``); the renewed certificate's first use makes it the current one."""
        credential = self.credentials([host_id]).get(host_id)
        if credential is None:
            raise UnknownMachine(f"host {host_id} is not registered (or was removed)")
        if credential.verify(serial):
            self.promote(credential)
        return credential

    @_db_errors
    def credentials(self, host_ids: Iterable[str]) -> dict[str, Credential]:
        """What checking a client certificate needs, for many machines in one query (by primary key): the server
        batches the heartbeats that arrive together into one of these."""
        with self._read() as tx:
            rows = tx.conn.execute(
                select(
                    machines.c.host_id,
                    machines.c.cert_serial,
                    machines.c.pending_serial,
                    machines.c.pending_public_key,
                    machines.c.revoked_at,
                    machines.c.heartbeat_interval,
                    machines.c.target_version,
                    machines.c.target_job,
                    machines.c.pinned_version,
                    *_PROTECTION_COLUMNS,
                )
                .select_from(_with_protection(machines))
                .where(machines.c.host_id.in_(list(host_ids)))
            )
            return {r[0]: Credential(*r[:9], protection=_protection(r._mapping)) for r in rows}

    @_db_errors
    def promote(self, credential: Credential) -> None:
        """The renewed certificate was presented: it becomes the current one, and the one before is superseded."""
        with self.transaction() as tx:
            tx.conn.execute(
                update(machines)
                .where(
                    and_(
                        machines.c.host_id == credential.host_id,
                        machines.c.pending_serial == credential.pending_serial,
                    )
                )
                .values(
                    cert_serial=machines.c.pending_serial,
                    cert_not_after=machines.c.pending_not_after,
                    public_key=machines.c.pending_public_key,
                    key_id=key_id(credential.pending_public_key)
                    if credential.pending_public_key
                    else machines.c.key_id,
                    pending_serial=None,
                    pending_not_after=None,
                    pending_public_key=None,
                )
            )

    @_db_errors
    def revoke(self, host_id: str, now: float) -> bool:
        """Refuse every certificate of ``host_id`` from now on (its record stays, marked revoked)."""
        with self.transaction() as tx:
            return bool(
                tx.conn.execute(
                    update(machines)
                    .where(and_(machines.c.host_id == host_id, machines.c.revoked_at.is_(None)))
                    .values(revoked_at=now, pending_serial=None, pending_not_after=None, pending_public_key=None)
                ).rowcount
            )

    @_db_errors
    def remove(self, host_id: str) -> bool:
        """Forget ``host_id`` (its certificates are then refused as unknown); its jobs and history stay."""
        with self.transaction() as tx:
            tx.conn.execute(delete(protection).where(protection.c.host_id == host_id))
            return bool(tx.conn.execute(delete(machines).where(machines.c.host_id == host_id)).rowcount)

    @_db_errors
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

    @_db_errors
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
        with self._read() as tx:
            rows = tx.conn.execute(
                select(health_history.c.reported_at, health_history.c.received_at, health_history.c.health)
                .where(health_history.c.host_id == host_id)
                .order_by(health_history.c.received_at.desc(), health_history.c.id.desc())
                .limit(limit)
            )
            return [(r[0], r[1], _stored_health(r[2])) for r in rows]

    # Jobs -------------------------------------------------------------------------------------------------

    @_db_errors
    def record_job(
        self,
        *,
        job_id: str | None,
        host_id: str | None,
        hostname: str,
        kind: str,
        state: str,
        error_id: str | None,
        remediation: str | None,
        detail: str | None,
        now: float,
        owner: str | None = None,
    ) -> str:
        """Create or update a job as the server itself (push, housekeeping): no ownership check."""
        job_id = job_id or str(uuid.uuid4())
        values = {
            "job_id": job_id,
            "host_id": host_id,
            "hostname": hostname,
            "kind": kind,
            "state": state,
            "error_id": error_id,
            "remediation": remediation,
            "detail": detail,
        }
        with self.transaction() as tx:
            tx.upsert_job(values, now, owner)
        return job_id

    @_db_errors
    def report_job(
        self,
        *,
        principals: list[str],
        job_id: str | None,
        host_id: str | None,
        hostname: str,
        kind: str,
        state: str,
        error_id: str | None,
        remediation: str | None,
        detail: str | None,
        now: float,
        then: Callable[[Tx], None] | None = None,
    ) -> str:
        """Create or update a job as a client: ``principals`` are who it proved to be ("host:<id>" over mutual TLS,
        "token:<id>" or "passphrase" by a proof; the first owns a new job). A client may update only a job one of
        them owns, or, as host H, a job owned by the token H enrolled with (the job a push created for it):
        JobNotOwned otherwise. ``then`` runs in the same transaction once the report is written (what the report
        changes elsewhere, e.g. a failed move's pin: both or neither)."""
        job_id = job_id or str(uuid.uuid4())
        values = {
            "job_id": job_id,
            "host_id": host_id,
            "hostname": hostname,
            "kind": kind,
            "state": state,
            "error_id": error_id,
            "remediation": remediation,
            "detail": detail,
        }
        with self.transaction() as tx:
            # Locked for the check and the write: two reports on one job ID cannot both pass the check.
            row = tx.conn.execute(
                select(jobs.c.owner, jobs.c.host_id).where(jobs.c.job_id == job_id).with_for_update()
            ).first()
            if row is not None and not any(tx.may_write(p, row[0], row[1]) for p in principals):
                raise JobNotOwned(f"job {job_id} belongs to another machine or secret")
            if row is None:
                inserted = tx.insert_job_if_absent(values, now, principals[0])
                if not inserted:  # another report created it meanwhile: judge against its owner
                    row = tx.conn.execute(
                        select(jobs.c.owner, jobs.c.host_id).where(jobs.c.job_id == job_id).with_for_update()
                    ).one()
                    if not any(tx.may_write(p, row[0], row[1]) for p in principals):
                        raise JobNotOwned(f"job {job_id} belongs to another machine or secret")
                else:
                    if then is not None:
                        then(tx)
                    return job_id
            tx.upsert_job(values, now, principals[0])
            if then is not None:
                then(tx)
        return job_id

    @_db_errors
    def set_job_owner(self, job_id: str, owner: str) -> None:
        """Bind a job the server created (a push) to the secret the host will prove: only it may report on it."""
        with self.transaction() as tx:
            tx.conn.execute(update(jobs).where(jobs.c.job_id == job_id).values(owner=owner))

    def job(self, job_id: str) -> Job | None:
        with self._read() as tx:
            row = tx.conn.execute(select(jobs).where(jobs.c.job_id == job_id)).first()
            return Job(**row._mapping) if row else None

    def jobs(self) -> list[Job]:
        with self._read() as tx:
            return [Job(**r._mapping) for r in tx.conn.execute(select(jobs).order_by(jobs.c.created_at, jobs.c.job_id))]

    # Enrolment secrets, nonces and the rate limit ----------------------------------------------------------

    @_db_errors
    def add_token(self, token_id: str, secret: str, expires_at: float | None, uses: int | None, now: float) -> None:
        with self.transaction() as tx:
            tx.conn.execute(
                insert(tokens).values(
                    token_id=token_id, secret=secret, expires_at=expires_at, uses_left=uses, created_at=now
                )
            )

    def token(self, token_id: str) -> tuple[str, float | None, int | None] | None:
        with self._read() as tx:
            row = tx.conn.execute(
                select(tokens.c.secret, tokens.c.expires_at, tokens.c.uses_left).where(tokens.c.token_id == token_id)
            ).first()
            return (row[0], row[1], row[2]) if row else None

    @_db_errors
    def remove_token(self, token_id: str) -> None:
        with self.transaction() as tx:
            tx.conn.execute(delete(tokens).where(tokens.c.token_id == token_id))

    @_db_errors
    def retire_passphrase(self, secret: str, valid_until: float) -> None:
        with self.transaction() as tx:
            tx.conn.execute(insert(retired_passphrases).values(secret=secret, valid_until=valid_until))

    def retired_passphrases(self, now: float) -> list[str]:
        with self._read() as tx:
            rows = tx.conn.execute(select(retired_passphrases.c.secret).where(retired_passphrases.c.valid_until > now))
            return [r[0] for r in rows]

    @_db_errors
    def use_nonce(self, nonce_id: str, expires_at: float) -> bool:
        """Mark a nonce used; False when it already was (by any instance)."""
        with self.transaction() as tx:
            return tx.insert_ignore(used_nonces, {"nonce_id": nonce_id, "expires_at": expires_at})

    @_db_errors
    def record_failure(self, address: str, now: float) -> None:
        with self.transaction() as tx:
            tx.conn.execute(insert(enrol_failures).values(address=address, at=now))

    def failures(self, address: str, since: float) -> tuple[int, float | None]:
        """How many failed proofs came from ``address`` after ``since``, and when the oldest of them did."""
        with self._read() as tx:
            count, oldest = tx.conn.execute(
                select(func.count(), func.min(enrol_failures.c.at)).where(
                    and_(enrol_failures.c.address == address, enrol_failures.c.at > since)
                )
            ).one()
            return int(count), oldest

    @_db_errors
    def prune(self, now: float) -> int:
        """Drop expired nonces, old failures and old history (by their time indexes); the rows removed."""
        with self.transaction() as tx:
            removed = 0
            for stmt in (
                delete(used_nonces).where(used_nonces.c.expires_at < now),
                delete(enrol_failures).where(enrol_failures.c.at < now - FAILURE_SECONDS),
                delete(health_history).where(health_history.c.received_at < now - HISTORY_SECONDS),
                delete(retired_passphrases).where(retired_passphrases.c.valid_until < now),
            ):
                removed += tx.conn.execute(stmt).rowcount
            return removed

    # Replication: protection, policies, the status machines report ---------------------------------------------

    @_db_errors
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
            stmt = _insert(self.postgresql)(protection).values(**values)
            tx.conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[protection.c.host_id],
                    set_={k: stmt.excluded[k] for k in ("disks", "all_disks", "policy", "paused", "updated_at")},
                )
            )

    @_db_errors
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

    @_db_errors
    def unprotect(self, host_id: str) -> bool:
        with self.transaction() as tx:
            return bool(tx.conn.execute(delete(protection).where(protection.c.host_id == host_id)).rowcount)

    def protection(self, host_id: str) -> ProtectionRow | None:
        with self._read() as tx:
            row = tx.conn.execute(
                select(*_PROTECTION_COLUMNS)
                .select_from(_with_policy(protection))
                .where(protection.c.host_id == host_id)
            ).first()
            return _protection(row._mapping) if row else None

    def protections(self) -> list[ProtectionRow]:
        """Every protected machine (the operator's listing; no request calls this)."""
        with self._read() as tx:
            rows = tx.conn.execute(
                select(*_PROTECTION_COLUMNS).select_from(_with_policy(protection)).order_by(protection.c.host_id)
            )
            return [p for p in (_protection(r._mapping) for r in rows) if p is not None]

    @_db_errors
    def set_policy(self, policy: Policy) -> None:
        values = {
            "name": policy.name,
            "rpo_seconds": policy.rpo_seconds,
            "interval_seconds": policy.interval_seconds,
            "bandwidth_bps": policy.bandwidth_bps,
            "retention": policy.retention,
        }
        with self.transaction() as tx:
            stmt = _insert(self.postgresql)(policies).values(**values)
            tx.conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[policies.c.name], set_={k: stmt.excluded[k] for k in values if k != "name"}
                )
            )

    def policy(self, name: str) -> Policy | None:
        """A policy by name; ``default`` exists without being created."""
        with self._read() as tx:
            row = tx.conn.execute(select(policies).where(policies.c.name == name)).first()
        if row is None:
            return Policy() if name == "default" else None
        return _policy(row._mapping)

    def policies(self) -> list[Policy]:
        with self._read() as tx:
            stored = [_policy(r._mapping) for r in tx.conn.execute(select(policies).order_by(policies.c.name))]
        return stored if any(p.name == "default" for p in stored) else [Policy(), *stored]

    @_db_errors
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

    # The operator's view (server/ui/): the fleet snapshot's one read, and the pages' bounded reads ---------------

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
            *_PROTECTION_COLUMNS,
        ).select_from(_with_protection(machines))
        with self._read() as tx:
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
                    policy = policies[key] = _row_policy(mapping)
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

    def jobs_for(self, host_id: str, limit: int = 50) -> list[Job]:
        """A machine's newest jobs (by the jobs_by_host index)."""
        with self._read() as tx:
            rows = tx.conn.execute(
                select(jobs).where(jobs.c.host_id == host_id).order_by(jobs.c.created_at.desc()).limit(limit)
            )
            return [Job(**r._mapping) for r in rows]

    def recent_jobs(self, *, kind: str | None = None, states: Iterable[str] = (), limit: int = 20) -> list[Job]:
        """The newest jobs of a kind, or in any of ``states``, newest change first: one index range each (the
        dashboard's test failovers and recent errors), never a scan of every job."""
        with self._read() as tx:
            found: list[Job] = []
            if kind is not None:
                query = select(jobs).where(jobs.c.kind == kind).order_by(jobs.c.updated_at.desc()).limit(limit)
                found += [Job(**r._mapping) for r in tx.conn.execute(query)]
            for state in states:
                query = select(jobs).where(jobs.c.state == state).order_by(jobs.c.updated_at.desc()).limit(limit)
                found += [Job(**r._mapping) for r in tx.conn.execute(query)]
        unique = {j.job_id: j for j in found}
        return sorted(unique.values(), key=lambda j: (j.updated_at, j.job_id), reverse=True)[:limit]

    # Locks across instances --------------------------------------------------------------------------------

    @contextmanager
    def advisory_lock(self, name: str, timeout: float) -> Iterator[bool]:
        """Hold a PostgreSQL advisory lock named ``name`` on a connection of its own (yields False if it could not
        be had within ``timeout``). Only for PostgreSQL; call it from a worker thread, never the event loop."""
        if not self.postgresql:
            raise TypeError("advisory locks are PostgreSQL's")
        lock = zlib.crc32(f"mobility:{name}".encode())
        with self.engine.connect() as conn:
            conn.exec_driver_sql(f"SET lock_timeout = '{int(timeout * 1000)}ms'")
            try:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": lock})
            except OperationalError:
                conn.rollback()
                yield False
                return
            try:
                yield True
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": lock})
                conn.commit()


class Tx:
    """The queries of one transaction (a connection inside ``Storage.transaction``)."""

    def __init__(self, conn: Connection, postgresql: bool) -> None:
        self.conn = conn
        self.postgresql = postgresql

    def lock(self, *names: str) -> None:
        """Serialise transactions that decide about the same names (PostgreSQL advisory transaction locks, taken in
        one order; SQLite's write transactions are serial already)."""
        if self.postgresql:
            for name in sorted(set(names)):
                self.conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": zlib.crc32(name.encode())})

    def machine(self, host_id: str) -> Machine | None:
        row = self.conn.execute(select(machines).where(machines.c.host_id == host_id)).first()
        return _machine(row._mapping) if row else None

    def all_machines(self) -> list[Machine]:
        """Every machine, by host ID (an operator's command: a rollout's selection, never a request)."""
        return [_machine(r._mapping) for r in self.conn.execute(select(machines).order_by(machines.c.host_id))]

    def machine_with_key(self, key: str) -> Machine | None:
        row = self.conn.execute(
            select(machines).where(machines.c.key_id == key).order_by(machines.c.enrolled_at.desc()).limit(1)
        ).first()
        return _machine(row._mapping) if row else None

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
        return next((m for m in (_machine(r._mapping) for r in rows) if m.facts.same_machine(facts)), None)

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
        stmt = _insert(self.postgresql)(machines).values(**values)
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

    def may_write(self, principal: str, owner: str | None, host_id: str | None) -> bool:
        if owner is None:  # a job written before jobs had owners: only its own host
            return host_id is not None and principal == f"host:{host_id}"
        if owner == principal:
            return True
        if owner.startswith("token:") and principal.startswith("host:"):
            enrolled = self.conn.execute(
                select(1).where(
                    and_(
                        machines.c.host_id == principal.removeprefix("host:"),
                        machines.c.enrol_token_id == owner.removeprefix("token:"),
                    )
                )
            ).first()
            return enrolled is not None
        return False

    def insert_job_if_absent(self, values: dict[str, Any], now: float, owner: str | None) -> bool:
        return self.insert_ignore(jobs, {**values, "created_at": now, "updated_at": now, "owner": owner})

    def upsert_job(self, values: dict[str, Any], now: float, owner: str | None) -> None:
        stmt = _insert(self.postgresql)(jobs).values(**values, created_at=now, updated_at=now, owner=owner)
        self.conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[jobs.c.job_id],
                set_={
                    "state": stmt.excluded.state,
                    "error_id": stmt.excluded.error_id,
                    "remediation": stmt.excluded.remediation,
                    "detail": stmt.excluded.detail,
                    "updated_at": stmt.excluded.updated_at,
                    "host_id": func.coalesce(stmt.excluded.host_id, jobs.c.host_id),
                    "owner": func.coalesce(jobs.c.owner, stmt.excluded.owner),
                },
            )
        )

    def insert_ignore(self, table: Any, values: dict[str, Any]) -> bool:
        """Insert unless the primary key exists; whether it was inserted."""
        key = next(iter(table.primary_key.columns))
        stmt = _insert(self.postgresql)(table).values(**values).on_conflict_do_nothing().returning(key)
        return self.conn.execute(stmt).first() is not None


def _insert(pg: bool) -> Any:
    return postgresql.insert if pg else sqlite.insert


@contextmanager
def opening(db: Database) -> Iterator[None]:
    """Errors while opening a database, as the server's errors: unreachable, or not a database at all."""
    try:
        yield
    except (OperationalError, InterfaceError, PoolTimeout) as e:
        raise DatabaseUnavailable(f"{db}: {_reason(e)}") from e
    except DatabaseError as e:
        raise DatabaseCorrupt(f"{db}: {_reason(e)}") from e


def _machine(row: RowMapping) -> Machine:
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
        health=_stored_health(row["health"]),
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


def _stored_health(text: Any) -> HealthReport | None:
    if not text:
        return None
    try:
        return HealthReport.stored(json.loads(text))
    except (TypeError, ValueError, RecursionError, WireError):
        return None


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


_PROTECTION_COLUMNS = (
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


def _with_policy(table: Any) -> Any:
    return table.outerjoin(policies, policies.c.name == protection.c.policy)


def _with_protection(table: Any) -> Any:
    return _with_policy(table.outerjoin(protection, protection.c.host_id == machines.c.host_id))


def _policy(row: RowMapping) -> Policy:
    return Policy(
        str(row["name"]),
        float(row["rpo_seconds"]),
        float(row["interval_seconds"]),
        int(row["bandwidth_bps"]),
        int(row["retention"]),
    )


def _row_policy(row: RowMapping) -> Policy:
    """The policy columns of a row of ``_PROTECTION_COLUMNS`` (a policy row that is gone: the defaults)."""
    name = str(row["p_policy"])
    if row["p_rpo"] is None:
        return Policy() if name == "default" else Policy(name)
    return Policy(name, float(row["p_rpo"]), float(row["p_interval"]), int(row["p_bandwidth"]), int(row["p_retention"]))


def _protection(row: RowMapping) -> ProtectionRow | None:
    """The protection columns of a row (``_PROTECTION_COLUMNS``), None when the machine protects nothing. A policy
    row that is gone reads as the defaults under its name."""
    if row["p_host_id"] is None:
        return None
    policy = _row_policy(row)
    return ProtectionRow(
        host_id=str(row["p_host_id"]),
        disks=tuple(d for d in str(row["p_disks"]).split("\n") if d),
        all_disks=bool(row["p_all_disks"]),
        policy=policy,
        paused=bool(row["p_paused"]),
        updated_at=float(row["p_updated_at"]),
        report=_stored_report(row["p_report"]),
    )


def stored_report(text: Any) -> ReplicationReport | None:
    """A replication report as stored, or None when it is not one (a reader never crashes on it)."""
    return _stored_report(text)


def _stored_report(text: Any) -> ReplicationReport | None:
    if not text:
        return None
    try:
        return ReplicationReport.from_json(json.loads(text))
    except (TypeError, ValueError, RecursionError, WireError):
        return None
