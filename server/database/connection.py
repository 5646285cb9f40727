"""Where the server's database is, and the engine that reaches it: SQLite in the data directory (the embedded
default) or PostgreSQL (``--database postgresql://USER@HOST[:PORT]/NAME``), which several instances share.

A password never goes on a command line or into a log: a URL that carries one is refused, and libpq takes it from
the environment (PGPASSWORD), a password file (PGPASSFILE, ~/.pgpass, or ``?passfile=PATH`` in the URL) or a
client certificate. ``init --database`` records the URL (without a password) in the data directory, so the other
commands find the same database without repeating it."""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import NullPool

from agent.shared.fsutil import NotSmallRegularFile, atomic_write, read_small_file
from agent.shared.textsafe import printable
from server.datadir import DataDir
from server.errors import DatabaseUrlInvalid

POOL_SIZE = 12  # >= the threads a serving instance runs database calls in (server/api/app.py: 4 + 4 + 2; server/ui/: 2)
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
        """The URL as init prints it, DATA/database.url records it and the log shows it: a password never (parsing
        refuses one; a secret in the query is masked all the same)."""
        url = self.url
        if any(k.lower() in _LIBPQ_SECRETS for k in url.query):
            url = url.set(query={k: ("***" if k.lower() in _LIBPQ_SECRETS else v) for k, v in url.query.items()})
        return url.render_as_string(hide_password=True)


# libpq's connection parameters (PostgreSQL 16), which a URL's query may carry; the secrets among them never go in a
# URL (process arguments, DATA/database.url and the log would show them).
_LIBPQ_SECRETS = frozenset({"password", "sslpassword"})
_LIBPQ_PARAMETERS = _LIBPQ_SECRETS | frozenset(
    {
        "host", "hostaddr", "port", "dbname", "user", "passfile", "require_auth", "channel_binding",
        "connect_timeout", "client_encoding", "options", "application_name", "fallback_application_name",
        "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout",
        "gssencmode", "sslmode", "requiressl", "sslcompression", "sslcert", "sslkey", "sslcertmode", "sslrootcert",
        "sslcrl", "sslcrldir", "sslsni", "requirepeer", "ssl_min_protocol_version", "ssl_max_protocol_version",
        "krbsrvname", "gsslib", "gssdelegation", "service", "target_session_attrs", "load_balance_hosts",
    }
)  # fmt: skip
# A libpq "key=value ..." connection string (or a URL with a lost "//"): never a SQLite file named after it.
_CONNINFO = re.compile(r"(?:^|[\s?&;])([A-Za-z_]+)\s*=")
_SCHEME_ONLY = re.compile(r"^(?:postgres(?:ql)?|sqlite)(?:\+\w+)?:", re.IGNORECASE)


def parse_database(text: str, where: str = "--database") -> Database:
    """``postgresql://...``, ``sqlite:///PATH`` or a plain path of a SQLite file; DB-URL-INVALID otherwise. No
    message shows the text as given: it may hold a password (the URL is shown only once parsed, without one)."""
    text = text.strip()
    if "://" not in text:
        found = {m.group(1).lower() for m in _CONNINFO.finditer(text)}
        if found & _LIBPQ_PARAMETERS or _SCHEME_ONLY.match(text):
            raise DatabaseUrlInvalid(
                f"{where} looks like a libpq connection string (key=value) or a URL without '//', not a URL or a "
                "SQLite path; give postgresql://USER@HOST[:PORT]/NAME"
            )
        if not text:
            raise DatabaseUrlInvalid(f"{where} is empty")
        return Database(URL.create("sqlite", database=str(Path(text).absolute())))
    try:
        url = make_url(text)
        port = url.port  # the port is parsed lazily by some versions: a bad one raises here
    except (ArgumentError, ValueError, TypeError) as e:
        # SQLAlchemy's messages quote parts of the text (a port that is not a number, a host): never shown.
        raise DatabaseUrlInvalid(
            f"{where} is not a well-formed URL (check the port, and brackets around an IPv6 address)"
        ) from e
    backend = url.get_backend_name()
    if url.password is not None:
        raise DatabaseUrlInvalid(
            f"{where} carries a password: process arguments and logs would show it; give it through PGPASSWORD, "
            "PGPASSFILE or ~/.pgpass instead"
        )
    secret = sorted(k for k in url.query if k.lower() in _LIBPQ_SECRETS)
    if secret:
        raise DatabaseUrlInvalid(
            f"{where} carries {secret[0]}= in its query: process arguments and logs would show it; give it through "
            "PGPASSWORD, PGPASSFILE or ~/.pgpass instead"
        )
    shown_url = _without_query(url)
    if port is not None and not 1 <= port <= 65535:
        raise DatabaseUrlInvalid(f"{where} {shown_url}: the port must be from 1 to 65535")
    if backend in ("postgresql", "postgres"):
        unknown = sorted(k for k in url.query if k not in _LIBPQ_PARAMETERS)
        if unknown:
            raise DatabaseUrlInvalid(
                f"{where} {shown_url}: {printable(unknown[0], 40)!r} is not a libpq connection parameter"
            )
        if not url.database:
            raise DatabaseUrlInvalid(f"{where} {shown_url} names no database")
        return Database(url.set(drivername="postgresql+psycopg"))
    if backend == "sqlite" and url.database not in (None, "", ":memory:"):
        if url.query or url.host or url.username:
            raise DatabaseUrlInvalid(f"{where}: a SQLite URL is sqlite:///PATH, with no host, user or parameters")
        return Database(url.set(drivername="sqlite", database=str(Path(url.database).absolute())))
    raise DatabaseUrlInvalid(f"{where} {shown_url}: expected postgresql://USER@HOST/NAME or sqlite:///PATH")


def _without_query(url: URL) -> str:
    """The URL as an error may show it: no password, no query (whose values are not ours to print)."""
    return url.set(query={}).render_as_string(hide_password=True)


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
    return parse_database(raw.decode(errors="replace"), str(data.database_url))


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
