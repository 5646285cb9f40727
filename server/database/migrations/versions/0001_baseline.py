"""Baseline: the schema as the SQLite-only server left it (legacy version 2).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "machines",
        sa.Column("host_id", sa.Text, primary_key=True),
        sa.Column("hostname", sa.Text, nullable=False),
        sa.Column("os_tag", sa.Text, nullable=False),
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("platform", sa.Text, nullable=False),
        sa.Column("agent_version", sa.Text, nullable=False),
        sa.Column("facts", sa.Text, nullable=False),
        sa.Column("cloned_from", sa.Text),
        sa.Column("enrolled_at", sa.Double, nullable=False),
        sa.Column("cert_serial", sa.Text, nullable=False),
        sa.Column("cert_not_after", sa.Double, nullable=False),
        sa.Column("last_seen", sa.Double),
        sa.Column("heartbeat_interval", sa.Double, nullable=False),
        sa.Column("health", sa.Text),
        sa.Column("public_key", sa.Text),
        sa.Column("machine_id", sa.Text, nullable=False, server_default=""),
        sa.Column("enrol_token_id", sa.Text),
    )
    op.create_index("machines_by_machine_id", "machines", ["machine_id"])
    op.create_index("machines_by_enrol_token", "machines", ["enrol_token_id"])
    op.create_table(
        "jobs",
        sa.Column("job_id", sa.Text, primary_key=True),
        sa.Column("host_id", sa.Text),
        sa.Column("hostname", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("error_id", sa.Text),
        sa.Column("remediation", sa.Text),
        sa.Column("detail", sa.Text),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("owner", sa.Text),
    )
    op.create_table(
        "tokens",
        sa.Column("token_id", sa.Text, primary_key=True),
        sa.Column("secret", sa.Text, nullable=False),
        sa.Column("expires_at", sa.Double),
        sa.Column("uses_left", sa.Integer),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    op.create_table(
        "retired_passphrases",
        sa.Column("secret", sa.Text, nullable=False),
        sa.Column("valid_until", sa.Double, nullable=False),
    )


def downgrade() -> None:
    op.drop_index("machines_by_enrol_token", "machines")
    op.drop_index("machines_by_machine_id", "machines")
    for table in ("retired_passphrases", "tokens", "jobs", "machines"):
        op.drop_table(table)
