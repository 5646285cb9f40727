"""The server's database: one module, SQLite in WAL mode today (PostgreSQL can follow behind the same API).

Enrolments and jobs are committed (synchronous=FULL) before the HTTP response acknowledges them, so a
kill -9 loses nothing acknowledged. Heartbeats are the hot path: the server batches them in memory and
writes them in one transaction a second (``record_heartbeats``). The schema is versioned (``PRAGMA
user_version``); opening a database brings it to the current version in one transaction.

What a client sent is validated at the edge (agent/shared/wire.py) before it gets here; the readers still never trust a
stored document (a row written by an older server is read defensively)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.shared.wire import HealthReport, MachineFacts, WireError
from server.errors import DatabaseCorrupt, DatabaseMissing, DatabaseUnavailable, JobNotOwned

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS machines (
    host_id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    os_tag TEXT NOT NULL,
    role TEXT NOT NULL,
    platform TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    facts TEXT NOT NULL,
    cloned_from TEXT,
    enrolled_at REAL NOT NULL,
    cert_serial TEXT NOT NULL,
    cert_not_after REAL NOT NULL,
    last_seen REAL,
    heartbeat_interval REAL NOT NULL,
    health TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    host_id TEXT,
    hostname TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    error_id TEXT,
    remediation TEXT,
    detail TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY,
    secret TEXT NOT NULL,
    expires_at REAL,
    uses_left INTEGER,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS retired_passphrases (
    secret TEXT NOT NULL,
    valid_until REAL NOT NULL
);
"""

# Each entry brings the schema from version N to N+1 (index N). Never edit a released entry: add one.
MIGRATIONS: tuple[str, ...] = (
    _SCHEMA_V1,
    # 2: machine identity is proven by key (public_key), facts are looked up by index, a machine remembers the
    # token it enrolled with, and a job remembers who may write it (owner).
    """
    ALTER TABLE machines ADD COLUMN public_key TEXT;
    ALTER TABLE machines ADD COLUMN machine_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE machines ADD COLUMN enrol_token_id TEXT;
    UPDATE machines SET machine_id = COALESCE(json_extract(facts, '$.machine_id'), '');
    CREATE INDEX IF NOT EXISTS machines_by_machine_id ON machines (machine_id);
    CREATE INDEX IF NOT EXISTS machines_by_enrol_token ON machines (enrol_token_id);
    ALTER TABLE jobs ADD COLUMN owner TEXT;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

_MACHINE_COLUMNS = (
    "host_id, hostname, os_tag, role, platform, agent_version, facts, cloned_from, enrolled_at, cert_serial, "
    "cert_not_after, last_seen, heartbeat_interval, health, public_key, enrol_token_id"
)
_JOB_COLUMNS = "job_id, host_id, hostname, kind, state, error_id, remediation, detail, created_at, updated_at, owner"
# Queries built once from the constant column lists above (never from input).
_SELECT_MACHINES = f"SELECT {_MACHINE_COLUMNS} FROM machines"  # noqa: S608
_SELECT_JOBS = f"SELECT {_JOB_COLUMNS} FROM jobs"  # noqa: S608
_UPSERT_JOB = f"""INSERT INTO jobs ({_JOB_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT(job_id) DO UPDATE SET state=excluded.state, error_id=excluded.error_id,
        remediation=excluded.remediation, detail=excluded.detail, updated_at=excluded.updated_at,
        host_id=COALESCE(excluded.host_id, jobs.host_id), owner=COALESCE(jobs.owner, excluded.owner)"""  # noqa: S608


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

    def online(self, now: float) -> bool:
        """Offline after 3 missed heartbeat intervals."""
        return self.last_seen is not None and now - self.last_seen <= 3 * self.heartbeat_interval


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


class Storage:
    def __init__(self, path: Path, *, create: bool = False) -> None:
        """Open the database at ``path``; it must exist unless ``create`` (a data directory whose database
        vanished must not silently start empty: every machine would be lost)."""
        self.path = path
        created = not path.exists()
        if created and not create:
            raise DatabaseMissing(f"{path} does not exist")
        try:
            self.db = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
            if created:
                path.chmod(0o600)  # machines, tokens and retired passphrases: the server's eyes only
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA busy_timeout=10000")
            if self.db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            self._migrate()
        except sqlite3.OperationalError as e:
            raise DatabaseUnavailable(f"{path}: {e}") from e
        except sqlite3.DatabaseError as e:
            raise DatabaseCorrupt(f"{path}: {e}") from e

    def _migrate(self) -> None:
        with self.transaction() as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version == 0 and db.execute("SELECT 1 FROM sqlite_master WHERE name = 'machines'").fetchone():
                version = 1  # made by a server that did not number its schema yet: version 1
            for n in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[n].split(";"):
                    if statement.strip():
                        db.execute(statement)
            if version < SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; a full disk or a locked database is DatabaseUnavailable (HTTP 503), and
        nothing of the transaction stays."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise DatabaseUnavailable(f"{self.path}: {e}") from e
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException as e:
            # SQLite may already have rolled back by itself (SQLITE_FULL does): then there is nothing to undo.
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            if isinstance(e, sqlite3.OperationalError):
                raise DatabaseUnavailable(f"{self.path}: {e}") from e
            raise

    # Machines -----------------------------------------------------------------------------------------

    def machine(self, host_id: str) -> Machine | None:
        row = self.db.execute(_SELECT_MACHINES + " WHERE host_id = ?", (host_id,)).fetchone()
        return self._machine(row) if row else None

    def machines(self) -> list[Machine]:
        return [self._machine(r) for r in self.db.execute(_SELECT_MACHINES + " ORDER BY hostname, host_id")]

    def find_by_facts(self, facts: MachineFacts) -> Machine | None:
        """The newest machine enrolled with the same facts (by the machine-id index, not a scan)."""
        if not facts.machine_id:
            return None
        rows = self.db.execute(
            _SELECT_MACHINES + " WHERE machine_id = ? ORDER BY enrolled_at DESC LIMIT 50",
            (facts.machine_id,),
        )
        return next((m for m in map(self._machine, rows) if m.facts.same_machine(facts)), None)

    def enrol_machine(self, m: NewMachine, now: float) -> bool:
        """Take one use of the machine's token (if any) and record the machine, in one transaction. False (and
        nothing written) when the token has no use left by then: concurrent enrolments cannot overdraw it."""
        with self.transaction() as db:
            if m.enrol_token_id is not None:
                taken = db.execute(
                    "UPDATE tokens SET uses_left = uses_left - 1 WHERE token_id = ? AND uses_left IS NOT NULL "
                    "AND uses_left > 0",
                    (m.enrol_token_id,),
                ).rowcount
                unlimited = db.execute(
                    "SELECT 1 FROM tokens WHERE token_id = ? AND uses_left IS NULL", (m.enrol_token_id,)
                ).fetchone()
                if not taken and not unlimited:
                    return False
            db.execute(
                """INSERT INTO machines (host_id, hostname, os_tag, role, platform, agent_version, facts,
                       cloned_from, enrolled_at, cert_serial, cert_not_after, heartbeat_interval, public_key,
                       machine_id, enrol_token_id)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(host_id) DO UPDATE SET hostname=excluded.hostname, os_tag=excluded.os_tag,
                       role=excluded.role, platform=excluded.platform, agent_version=excluded.agent_version,
                       facts=excluded.facts, cert_serial=excluded.cert_serial,
                       cert_not_after=excluded.cert_not_after, public_key=excluded.public_key,
                       machine_id=excluded.machine_id,
                       enrol_token_id=COALESCE(excluded.enrol_token_id, machines.enrol_token_id)""",
                (
                    m.host_id,
                    m.hostname,
                    m.os_tag,
                    m.role,
                    m.platform,
                    m.agent_version,
                    json.dumps(m.facts.to_json()),
                    m.cloned_from,
                    now,
                    m.cert_serial,
                    m.cert_not_after,
                    m.heartbeat_interval,
                    m.public_key,
                    m.facts.machine_id,
                    m.enrol_token_id,
                ),
            )
        return True

    def renew_certificate(self, host_id: str, serial: str, not_after: float, public_key: str) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE machines SET cert_serial = ?, cert_not_after = ?, public_key = ? WHERE host_id = ?",
                (serial, not_after, public_key, host_id),
            )

    def record_heartbeats(self, beats: Iterable[tuple[str, float, str, str]]) -> None:
        """(host_id, time, agent_version, health JSON) for many machines in one transaction."""
        with self.transaction() as db:
            db.executemany(
                "UPDATE machines SET last_seen = ?, agent_version = ?, health = ? WHERE host_id = ?",
                [(t, version, health, host_id) for host_id, t, version, health in beats],
            )

    @staticmethod
    def _machine(row: tuple[Any, ...]) -> Machine:
        (
            host_id,
            hostname,
            os_tag,
            role,
            platform,
            agent_version,
            facts,
            cloned_from,
            enrolled_at,
            serial,
            not_after,
            last_seen,
            interval,
            health,
            public_key,
            enrol_token_id,
        ) = row
        return Machine(
            host_id,
            hostname,
            os_tag,
            role,
            platform,
            agent_version,
            _stored_facts(facts),
            cloned_from,
            enrolled_at,
            serial,
            not_after,
            last_seen,
            interval,
            _stored_health(health),
            public_key,
            enrol_token_id,
        )

    # Jobs ---------------------------------------------------------------------------------------------

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
        with self.transaction() as db:
            self._upsert_job(db, job_id, host_id, hostname, kind, state, error_id, remediation, detail, now, owner)
        return job_id

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
    ) -> str:
        """Create or update a job as a client: ``principals`` are who it proved to be ("host:<id>" over mutual TLS,
        "token:<id>" or "passphrase" by a proof; the first owns a new job). A client may update only a job one of
        them owns, or, as host H, a job owned by the token H enrolled with (the job a push created for it):
        JobNotOwned otherwise."""
        job_id = job_id or str(uuid.uuid4())
        with self.transaction() as db:
            row = db.execute("SELECT owner, host_id FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is not None and not any(self._may_write(db, p, row[0], row[1]) for p in principals):
                raise JobNotOwned(f"job {job_id} belongs to another machine or secret")
            owner = principals[0]
            self._upsert_job(db, job_id, host_id, hostname, kind, state, error_id, remediation, detail, now, owner)
        return job_id

    @staticmethod
    def _may_write(db: sqlite3.Connection, principal: str, owner: str | None, host_id: str | None) -> bool:
        if owner is None:  # a job written before jobs had owners: only its own host
            return host_id is not None and principal == f"host:{host_id}"
        if owner == principal:
            return True
        if owner.startswith("token:") and principal.startswith("host:"):
            enrolled = db.execute(
                "SELECT 1 FROM machines WHERE host_id = ? AND enrol_token_id = ?",
                (principal.removeprefix("host:"), owner.removeprefix("token:")),
            ).fetchone()
            return enrolled is not None
        return False

    @staticmethod
    def _upsert_job(
        db: sqlite3.Connection,
        job_id: str,
        host_id: str | None,
        hostname: str,
        kind: str,
        state: str,
        error_id: str | None,
        remediation: str | None,
        detail: str | None,
        now: float,
        owner: str | None,
    ) -> None:
        db.execute(
            _UPSERT_JOB,
            (job_id, host_id, hostname, kind, state, error_id, remediation, detail, now, now, owner),
        )

    def set_job_owner(self, job_id: str, owner: str) -> None:
        """Bind a job the server created (a push) to the secret the host will prove: only it may report on it."""
        with self.transaction() as db:
            db.execute("UPDATE jobs SET owner = ? WHERE job_id = ?", (owner, job_id))

    def job(self, job_id: str) -> Job | None:
        row = self.db.execute(_SELECT_JOBS + " WHERE job_id = ?", (job_id,)).fetchone()
        return Job(*row) if row else None

    def jobs(self) -> list[Job]:
        return [Job(*r) for r in self.db.execute(_SELECT_JOBS + " ORDER BY created_at, job_id")]

    # Enrolment secrets ---------------------------------------------------------------------------------

    def add_token(self, token_id: str, secret: str, expires_at: float | None, uses: int | None, now: float) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?)", (token_id, secret, expires_at, uses, now))

    def token(self, token_id: str) -> tuple[str, float | None, int | None] | None:
        row = self.db.execute(
            "SELECT secret, expires_at, uses_left FROM tokens WHERE token_id = ?", (token_id,)
        ).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def remove_token(self, token_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM tokens WHERE token_id = ?", (token_id,))

    def retire_passphrase(self, secret: str, valid_until: float) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO retired_passphrases VALUES (?, ?)", (secret, valid_until))

    def retired_passphrases(self, now: float) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT secret FROM retired_passphrases WHERE valid_until > ?", (now,))]


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
