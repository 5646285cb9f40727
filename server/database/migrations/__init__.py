"""Versioned schema migrations (Alembic, configured here in code: no alembic.ini at run time).

``upgrade`` brings a database to the newest revision in one transaction. A SQLite database made before the server
used Alembic (``PRAGMA user_version`` 0-2, see ``legacy.py``) is first brought to version 2, recorded as the
baseline revision, then upgraded like any other. Opening a database only reads its revision: Alembic itself is
imported when there is something to migrate (every command would otherwise pay for loading it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Connection, inspect, text

from server.database.migrations.legacy import LEGACY_VERSION, legacy_upgrade

HERE = Path(__file__).resolve().parent
BASELINE = "0001"
HEAD = "0006"  # the newest revision in versions/ (tests/server/database/test_storage.py checks it is Alembic's head)
REVISIONS = ("0001", "0002", "0003", "0004", "0005", "0006")  # every revision this server knows, oldest first


def _config(conn: Connection | None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["connection"] = conn
    return cfg


def alembic_revisions() -> tuple[list[str], str | None]:
    """Alembic's own view of versions/: every revision (oldest first) and the head."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_config(None))
    return [r.revision for r in reversed(list(script.walk_revisions()))], script.get_current_head()


def current(conn: Connection) -> str | None:
    """The revision the database is at; ``"legacy"`` for a pre-Alembic SQLite database; None for an empty one."""
    found = inspect(conn)
    if found.has_table("alembic_version"):
        revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        if revision is not None:
            return str(revision)
    if found.has_table("machines"):
        return "legacy"
    return None


def upgrade(conn: Connection) -> tuple[str | None, str]:
    """Bring the database to the head inside the caller's transaction; returns (from, to)."""
    from alembic import command

    before = current(conn)
    cfg = _config(conn)
    if before == "legacy":
        version = int(conn.exec_driver_sql("PRAGMA user_version").scalar_one())
        legacy_upgrade(conn, version)
        command.stamp(cfg, BASELINE)
        conn.exec_driver_sql(f"PRAGMA user_version = {LEGACY_VERSION + 1}")  # no longer the legacy numbering
    command.upgrade(cfg, "head")
    return before, HEAD
