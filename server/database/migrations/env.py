"""Alembic's environment: always online, on the connection server/database/migrations/__init__.py hands over (inside the
caller's transaction, so an upgrade is all or nothing)."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
