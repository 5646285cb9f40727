"""The server's database: one module, SQLite in WAL mode today (PostgreSQL can follow behind the same API).

Enrolments and jobs are committed (synchronous=FULL) before the HTTP response acknowledges them, so a
kill -9 loses nothing acknowledged. Heartbeats are the hot path: the server batches them in memory and
writes them in one transaction a second (``record_heartbeats``)."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.wire import MachineFacts
from server.errors import DatabaseCorrupt

SCHEMA = """
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
    cert_not_after: float
    last_seen: float | None
    heartbeat_interval: float
    health: dict[str, Any] | None

    def online(self, now: float) -> bool:
        """Offline after 3 missed heartbeat intervals."""
        return self.last_seen is not None and now - self.last_seen <= 3 * self.heartbeat_interval


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


class Storage:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.db = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA busy_timeout=10000")
            if self.db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise DatabaseCorrupt(f"{path}: {e}") from e

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # Machines -----------------------------------------------------------------------------------------

    def machine(self, host_id: str) -> Machine | None:
        row = self.db.execute("SELECT * FROM machines WHERE host_id = ?", (host_id,)).fetchone()
        return self._machine(row) if row else None

    def machines(self) -> list[Machine]:
        return [self._machine(r) for r in self.db.execute("SELECT * FROM machines ORDER BY hostname, host_id")]

    def find_by_facts(self, facts: MachineFacts) -> Machine | None:
        """A machine enrolled with the same facts (the same machine enrolling again without its state)."""
        same = [m for m in self.machines() if facts.machine_id and m.facts.same_machine(facts)]
        return max(same, key=lambda m: m.enrolled_at, default=None)

    def upsert_machine(
        self,
        *,
        host_id: str,
        hostname: str,
        os_tag: str,
        role: str,
        platform: str,
        agent_version: str,
        facts: MachineFacts,
        cloned_from: str | None,
        now: float,
        cert_serial: str,
        cert_not_after: float,
        heartbeat_interval: float,
    ) -> None:
        with self.transaction() as db:
            db.execute(
                """INSERT INTO machines (host_id, hostname, os_tag, role, platform, agent_version, facts,
                       cloned_from, enrolled_at, cert_serial, cert_not_after, heartbeat_interval)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(host_id) DO UPDATE SET hostname=excluded.hostname, os_tag=excluded.os_tag,
                       role=excluded.role, platform=excluded.platform, agent_version=excluded.agent_version,
                       facts=excluded.facts, cert_serial=excluded.cert_serial,
                       cert_not_after=excluded.cert_not_after""",
                (
                    host_id,
                    hostname,
                    os_tag,
                    role,
                    platform,
                    agent_version,
                    json.dumps(facts.to_json()),
                    cloned_from,
                    now,
                    cert_serial,
                    cert_not_after,
                    heartbeat_interval,
                ),
            )

    def renew_certificate(self, host_id: str, serial: str, not_after: float) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE machines SET cert_serial = ?, cert_not_after = ? WHERE host_id = ?",
                (serial, not_after, host_id),
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
            _serial,
            not_after,
            last_seen,
            interval,
            health,
        ) = row
        return Machine(
            host_id,
            hostname,
            os_tag,
            role,
            platform,
            agent_version,
            MachineFacts.from_json(json.loads(facts)),
            cloned_from,
            enrolled_at,
            not_after,
            last_seen,
            interval,
            json.loads(health) if health else None,
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
    ) -> str:
        job_id = job_id or str(uuid.uuid4())
        with self.transaction() as db:
            db.execute(
                """INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(job_id) DO UPDATE SET state=excluded.state, error_id=excluded.error_id,
                       remediation=excluded.remediation, detail=excluded.detail, updated_at=excluded.updated_at,
                       host_id=COALESCE(excluded.host_id, jobs.host_id)""",
                (job_id, host_id, hostname, kind, state, error_id, remediation, detail, now, now),
            )
        return job_id

    def job(self, job_id: str) -> Job | None:
        row = self.db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return Job(*row) if row else None

    def jobs(self) -> list[Job]:
        return [Job(*r) for r in self.db.execute("SELECT * FROM jobs ORDER BY created_at, job_id")]

    # Enrolment secrets ---------------------------------------------------------------------------------

    def add_token(self, token_id: str, secret: str, expires_at: float | None, uses: int | None, now: float) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?)", (token_id, secret, expires_at, uses, now))

    def token(self, token_id: str) -> tuple[str, float | None, int | None] | None:
        row = self.db.execute(
            "SELECT secret, expires_at, uses_left FROM tokens WHERE token_id = ?", (token_id,)
        ).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def use_token(self, token_id: str) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE tokens SET uses_left = uses_left - 1 WHERE token_id = ? AND uses_left IS NOT NULL", (token_id,)
            )

    def remove_token(self, token_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM tokens WHERE token_id = ?", (token_id,))

    def retire_passphrase(self, secret: str, valid_until: float) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO retired_passphrases VALUES (?, ?)", (secret, valid_until))

    def retired_passphrases(self, now: float) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT secret FROM retired_passphrases WHERE valid_until > ?", (now,))]
