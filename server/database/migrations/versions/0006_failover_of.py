"""Failovers that registered as machines of their own: the machine each is a failover of (``failover_of``, as
``cloned_from`` names a clone's original) and the recovery point it was failed over from.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("machines") as batch:
        batch.add_column(sa.Column("failover_of", sa.Text))
        batch.add_column(sa.Column("failover_point", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("machines") as batch:
        for name in ("failover_point", "failover_of"):
            batch.drop_column(name)
