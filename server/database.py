"""Where the server's database is, and the engine that reaches it: SQLite in the data directory (the embedded
default) or PostgreSQL (``--database postgresql://USER@HOST[:PORT]/NAME``), which several instances share.

A password never goes on a command line or into a log: a URL that carries one is refused, and libpq takes it from
the environment (PGPASSWORD), a password file (PGPASSFILE, ~/.pgpass, or ``?passfile=PATH`` in the URL) or a
client certificate. ``init --database`` records the URL (without a password) in the data directory, so the other
commands find the same database without repeating it."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import NullPool

from agent.shared.fsutil import NotSmallRegularFile, atomic_write, read_small_file
from server.datadir import DataDir
from server.errors import DatabaseUrlInvalid

POOL_SIZE = 12  # > the worker threads a serving instance runs database calls in (server/app.py: 4 + 4 + 2)
MAX_URL_FILE = 4096


@dataclass(frozen=True)
class Database:
    """A parsed ``--database``: the SQLAlchemy URL (never with a password) and whether it is PostgreSQL."""

    url: URL

    @property
    def postgresql(self) -> bool:
        return self.url.get_backend_name() == "postgresql"

    @property
    def sqlite_path(self) -> Path | None:
        return Path(self.url.database) if not self.postgresql and self.url.database else None

    def __str__(self) -> str:
        return self.url.render_as_string(hide_password=True)


def parse_database(text: str) -> Database:
    """``postgresql://...``, ``sqlite:///PATH`` or a plain path of a SQLite file; DB-URL-INVALID otherwise."""
    text = text.strip()
    if "://" not in text:
        return Database(URL.create("sqlite", database=str(Path(text).absolute())))
    try:
        url = make_url(text)
    except ArgumentError as e:
        raise DatabaseUrlInvalid(f"--database: {e}") from e
    backend = url.get_backend_name()
    if backend == "postgresql":
        if url.password is not None:
            raise DatabaseUrlInvalid(
                "--database carries a password: process arguments and logs would show it; give it through "
                "PGPASSWORD, PGPASSFILE or ~/.pgpass instead"
            )
        if not url.database:
            raise DatabaseUrlInvalid(f"--database {url.render_as_string(hide_password=True)} names no database")
        return Database(url.set(drivername="postgresql+psycopg"))
    if backend == "sqlite" and url.database not in (None, "", ":memory:"):
        return Database(url.set(drivername="sqlite", database=str(Path(url.database).absolute())))
    raise DatabaseUrlInvalid(f"--database {text[:80]!r}: expected postgresql://USER@HOST/NAME or sqlite:///PATH")


def database_for(data: DataDir, given: str | None) -> Database:
    """The ``--database`` given, else the one ``init`` recorded in the data directory, else its SQLite file."""
    if given:
        return parse_database(given)
    try:
        _, raw = read_small_file(data.database_url, MAX_URL_FILE)
    except FileNotFoundError:
        return Database(URL.create("sqlite", database=str(data.database)))
    except (OSError, NotSmallRegularFile) as e:
        raise DatabaseUrlInvalid(f"{data.database_url}: {getattr(e, 'strerror', None) or e}") from e
    return parse_database(raw.decode(errors="replace"))


def record_database(data: DataDir, db: Database) -> None:
    """Remember the database ``init`` was given (never a password) for the commands run on this data directory
    later: a PostgreSQL URL, or a SQLite file other than the data directory's own (by its absolute path, so that a
    command run from another directory finds it too)."""
    if db.sqlite_path is not None:
        where = db.sqlite_path.absolute()
        if where == data.database.absolute():
            return
        db = Database(db.url.set(database=str(where)))
    atomic_write(data.database_url, (str(db) + "\n").encode(), 0o600)


def make_engine(db: Database, *, pool_size: int = POOL_SIZE) -> Engine:
    if db.postgresql:
        return create_engine(
            db.url,
            pool_size=pool_size,
            max_overflow=0,
            pool_timeout=10,
            # No ping per checkout (a round trip per request): a connection found dead makes SQLAlchemy drop the whole
            # pool, that request answers 503 DB-UNAVAILABLE (agents retry), and the next ones reconnect.
            pool_recycle=3600,
            connect_args={"connect_timeout": 10, "application_name": "mobility-server"},
        )
    engine = create_engine(
        db.url,
        poolclass=NullPool if pool_size == 0 else None,
        connect_args={"timeout": 10, "check_same_thread": False, "isolation_level": None},
        **({} if pool_size == 0 else {"pool_size": pool_size, "max_overflow": 0, "pool_timeout": 10}),
    )

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi: sqlite3.Connection, _record: Any) -> None:
        dbapi.execute("PRAGMA journal_mode=WAL")
        dbapi.execute("PRAGMA synchronous=FULL")  # an acknowledged enrolment survives a power cut
        dbapi.execute("PRAGMA busy_timeout=10000")

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        # pysqlite's own transaction handling is off (isolation_level=None): we begin here, IMMEDIATE for writes so
        # that two writers never deadlock upgrading a read lock.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")

    return engine
