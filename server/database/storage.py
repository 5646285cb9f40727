"""The server's database, one data-access layer for SQLite (the embedded default) and PostgreSQL (fleets, several
instances): SQLAlchemy Core, with the schema versioned by Alembic (server/database/migrations/).

``Storage`` is the sum of the aggregates' calls and ``Tx`` of their queries inside one transaction, each aggregate in
a module of its own: the machines (machines.py), their certificates (certificates.py), heartbeats and health
history (heartbeats.py), jobs (jobs.py), enrolment's secrets, nonces and failed proofs (tokens.py), replication's
protection and policies (protection.py), the dashboard's fleet read (fleet.py), and the rollouts' rows
(rollout_rows.py; server/releases/rollouts.py decides, through ``Tx``). This module opens, migrates and closes the
database, prunes what expires, and holds the locks across instances.

Enrolments and jobs are committed before the HTTP response acknowledges them, so a kill -9 loses nothing
acknowledged (SQLite runs with synchronous=FULL). Heartbeats are the hot path: each instance batches them in memory
and writes them in one transaction a second (``record_heartbeats``), never moving a machine's state backwards.
Every lookup a request makes is by primary key or an index; nothing a request does costs O(number of machines).

These calls block: a serving instance runs them in its worker threads (server/api/app.py), never on its event loop.
What a client sent is validated at the edge (agent/shared/wire.py) before it gets here; the readers still never trust a
stored document (a row written by an older server is read defensively)."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, delete, text
from sqlalchemy.exc import DatabaseError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from server.database import migrations
from server.database.certificates import Certificates
from server.database.connection import POOL_SIZE, Database, make_engine
from server.database.fleet import Fleet
from server.database.heartbeats import HISTORY_SECONDS, Heartbeats
from server.database.jobs import JobRows, Jobs
from server.database.machines import MachineRows, Machines
from server.database.protection import Protections
from server.database.rollout_rows import RolloutRows
from server.database.schema import enrol_failures, health_history, retired_passphrases, used_nonces
from server.database.tokens import FAILURE_SECONDS, Tokens
from server.database.transactions import db_errors, driver_reason
from server.errors import (
    DatabaseCorrupt,
    DatabaseMissing,
    DatabaseSchemaNewer,
    DatabaseSchemaOld,
    DatabaseUnavailable,
)


class Tx(MachineRows, JobRows, RolloutRows):
    """The queries of one transaction (a connection inside ``Storage.transaction`` or ``Storage.reading``)."""


class Storage(Machines[Tx], Certificates[Tx], Heartbeats[Tx], Jobs[Tx], Tokens[Tx], Protections[Tx], Fleet[Tx]):
    """One database; thread-safe (a pool of connections). ``open`` checks the schema is the code's."""

    def __init__(self, db: Database, engine: Engine) -> None:
        super().__init__(db, engine, Tx)

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

    # What expires ------------------------------------------------------------------------------------------

    @db_errors
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


@contextmanager
def opening(db: Database) -> Iterator[None]:
    """Errors while opening a database, as the server's errors: unreachable, or not a database at all."""
    try:
        yield
    except (OperationalError, InterfaceError, PoolTimeout) as e:
        raise DatabaseUnavailable(f"{db}: {driver_reason(e)}") from e
    except DatabaseError as e:
        raise DatabaseCorrupt(f"{db}: {driver_reason(e)}") from e
