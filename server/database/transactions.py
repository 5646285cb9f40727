"""What every part of the data-access layer stands on: a transaction on the pool (``Access``), the queries every
aggregate's rows share inside one (``TxBase``: locks, insert-unless-present), and the driver's errors as the
server's.

Each aggregate (server/database/machines.py, certificates.py, heartbeats.py, jobs.py, tokens.py, protection.py,
fleet.py, rollout_rows.py) adds its queries inside a transaction to ``TxBase`` and its calls that open one to
``Access``; ``Storage`` and ``Tx`` (server/database/storage.py) are the sum of them. ``Access`` is generic in the
transaction it hands out, so that an aggregate's calls see the whole ``Tx`` they run in (a job's report that pins a
machine in the same transaction, server/api/app.py) while the aggregate knows only its own rows."""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, ParamSpec, TypeVar

from sqlalchemy import Connection, Engine, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from server.database.connection import Database
from server.errors import DatabaseUnavailable

P = ParamSpec("P")
R = TypeVar("R")


class TxBase:
    """The queries of one transaction (a connection inside ``Access.transaction`` or ``Access.reading``) that
    every aggregate's rows use."""

    def __init__(self, conn: Connection, postgresql: bool) -> None:
        self.conn = conn
        self.postgresql = postgresql

    def lock(self, *names: str) -> None:
        """Serialise transactions that decide about the same names (PostgreSQL advisory transaction locks, taken in
        one order; SQLite's write transactions are serial already)."""
        if self.postgresql:
            for name in sorted(set(names)):
                self.conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": zlib.crc32(name.encode())})

    def insert_ignore(self, table: Any, values: dict[str, Any]) -> bool:
        """Insert unless the primary key exists; whether it was inserted."""
        key = next(iter(table.primary_key.columns))
        stmt = dialect_insert(self.postgresql)(table).values(**values).on_conflict_do_nothing().returning(key)
        return self.conn.execute(stmt).first() is not None


T = TypeVar("T", bound=TxBase)


class Access(Generic[T]):
    """One database; thread-safe (a pool of connections). ``T``: the transaction it hands out (``Tx``)."""

    def __init__(self, db: Database, engine: Engine, tx_type: type[T]) -> None:
        self.db = db
        self.engine = engine
        self.postgresql = db.postgresql
        self.tx_type = tx_type

    @contextmanager
    def transaction(self) -> Iterator[T]:
        """One write transaction: all of it or nothing (DatabaseUnavailable when the database cannot take it)."""
        try:
            with self.engine.connect().execution_options(write=True) as conn, conn.begin():
                yield self.tx_type(conn, self.postgresql)
        except (OperationalError, InterfaceError, PoolTimeout) as e:
            raise DatabaseUnavailable(driver_reason(e)) from e

    @contextmanager
    def reading(self) -> Iterator[T]:
        """One read-only transaction."""
        try:
            with self.engine.connect() as conn, conn.begin():
                yield self.tx_type(conn, self.postgresql)
        except (OperationalError, InterfaceError, PoolTimeout) as e:
            raise DatabaseUnavailable(driver_reason(e)) from e


def db_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """A database that cannot be reached, is locked, full or read-only is DB-UNAVAILABLE (HTTP 503 with
    Retry-After); nothing of the failed transaction stays."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (OperationalError, InterfaceError, PoolTimeout) as e:
            raise DatabaseUnavailable(driver_reason(e)) from e

    return wrapper


def driver_reason(e: Exception) -> str:
    """The driver's first line (never the statement or its parameters, which may hold secrets)."""
    lines = str(getattr(e, "orig", None) or type(e).__name__).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


def dialect_insert(pg: bool) -> Any:
    """The engine's INSERT, which has ON CONFLICT (an upsert, an insert unless present) on both."""
    return postgresql.insert if pg else sqlite.insert
