"""The schema steps of servers that numbered their SQLite schema with ``PRAGMA user_version`` (before Alembic).

Kept verbatim so a database such a server made can still be upgraded: version 0 (unnumbered, the version 1 tables),
1 and 2. Version 2 is the Alembic baseline (revision 0001). Never edit these: they are history."""

from __future__ import annotations

from sqlalchemy import Connection, text

SCHEMA_V1 = """
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

# Entry N brings the schema from version N to N+1.
MIGRATIONS: tuple[str, ...] = (
    SCHEMA_V1,
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
LEGACY_VERSION = len(MIGRATIONS)


def legacy_upgrade(conn: Connection, version: int) -> None:
    """Bring a legacy SQLite database from ``version`` to version 2 (the Alembic baseline)."""
    if version == 0:
        version = 1  # made by a server that did not number its schema yet: the version 1 tables
    for n in range(version, LEGACY_VERSION):
        for statement in MIGRATIONS[n].split(";"):
            if statement.strip():
                conn.execute(text(statement))
