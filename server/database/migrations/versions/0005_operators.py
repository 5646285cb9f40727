"""The operator's view: operators (a token's hash, an optional client certificate's fingerprint), their dashboard
sessions, the audit log of every change made through the dashboard, and the indexes its pages read jobs by (a
machine's jobs, the newest of a kind, the newest failures).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "operators",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("token_id", sa.Text, nullable=False),
        sa.Column("token_hash", sa.Text, nullable=False),
        sa.Column("cert_fingerprint", sa.Text),
        sa.Column("cert_not_after", sa.Double),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    op.create_index("operators_by_token", "operators", ["token_id"], unique=True)
    op.create_index("operators_by_cert", "operators", ["cert_fingerprint"])
    op.create_table(
        "ui_sessions",
        sa.Column("session_hash", sa.Text, primary_key=True),
        sa.Column("operator", sa.Text, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("expires_at", sa.Double, nullable=False),
    )
    op.create_index("ui_sessions_by_expiry", "ui_sessions", ["expires_at"])
    op.create_index("ui_sessions_by_operator", "ui_sessions", ["operator"])
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Double, nullable=False),
        sa.Column("operator", sa.Text, nullable=False),
        sa.Column("via", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("detail", sa.Text),
        sa.Column("outcome", sa.Text),
        sa.Column("finished_at", sa.Double),
    )
    op.create_index("audit_log_by_time", "audit_log", ["at"])
    op.create_index("jobs_by_host", "jobs", ["host_id", "created_at"])
    op.create_index("jobs_by_kind", "jobs", ["kind", "updated_at"])
    op.create_index("jobs_by_state", "jobs", ["state", "updated_at"])


def downgrade() -> None:
    op.drop_index("jobs_by_state", "jobs")
    op.drop_index("jobs_by_kind", "jobs")
    op.drop_index("jobs_by_host", "jobs")
    op.drop_index("audit_log_by_time", "audit_log")
    op.drop_table("audit_log")
    op.drop_index("ui_sessions_by_operator", "ui_sessions")
    op.drop_index("ui_sessions_by_expiry", "ui_sessions")
    op.drop_table("ui_sessions")
    op.drop_index("operators_by_cert", "operators")
    op.drop_index("operators_by_token", "operators")
    op.drop_table("operators")
