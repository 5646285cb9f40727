"""Replication: named policies, and which disks of a machine are protected under which policy, with the replication
status the machine last reported.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "policies",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("rpo_seconds", sa.Double, nullable=False),
        sa.Column("interval_seconds", sa.Double, nullable=False),
        sa.Column("bandwidth_bps", sa.BigInteger, nullable=False),
        sa.Column("retention", sa.Integer, nullable=False),
    )
    op.create_table(
        "protection",
        sa.Column("host_id", sa.Text, primary_key=True),
        sa.Column("disks", sa.Text, nullable=False),
        sa.Column("all_disks", sa.Boolean, nullable=False),
        sa.Column("policy", sa.Text, nullable=False),
        sa.Column("paused", sa.Boolean, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("report", sa.Text),
        sa.Column("reported_at", sa.Double),
    )


def downgrade() -> None:
    op.drop_table("protection")
    op.drop_table("policies")
