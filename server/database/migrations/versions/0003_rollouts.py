"""Self-update: rollouts in waves, a machine's target version, its upgrade job and its pin.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("machines") as batch:
        batch.add_column(sa.Column("target_version", sa.Text))
        batch.add_column(sa.Column("target_job", sa.Text))
        batch.add_column(sa.Column("pinned_version", sa.Text))
        batch.add_column(sa.Column("pin_reason", sa.Text))
    op.create_table(
        "rollouts",
        sa.Column("rollout_id", sa.Text, primary_key=True),
        sa.Column("to_version", sa.Text, nullable=False),
        sa.Column("selection", sa.Text, nullable=False),
        sa.Column("wave_size", sa.Integer, nullable=False),
        sa.Column("waves", sa.Integer, nullable=False),
        sa.Column("current_wave", sa.Integer, nullable=False),
        sa.Column("max_failures", sa.Integer, nullable=False),
        sa.Column("wave_timeout", sa.Double, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    op.create_index("rollouts_by_state", "rollouts", ["state"])
    op.create_index("rollouts_by_created", "rollouts", ["created_at"])
    op.create_table(
        "rollout_machines",
        sa.Column("rollout_id", sa.Text, primary_key=True),
        sa.Column("host_id", sa.Text, primary_key=True),
        sa.Column("wave", sa.Integer, nullable=False),
        sa.Column("from_version", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("job_id", sa.Text),
        sa.Column("error_id", sa.Text),
        sa.Column("detail", sa.Text),
        sa.Column("offered_at", sa.Double),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    op.create_index("rollout_machines_by_wave", "rollout_machines", ["rollout_id", "wave"])


def downgrade() -> None:
    op.drop_index("rollout_machines_by_wave", "rollout_machines")
    op.drop_table("rollout_machines")
    op.drop_index("rollouts_by_created", "rollouts")
    op.drop_index("rollouts_by_state", "rollouts")
    op.drop_table("rollouts")
    with op.batch_alter_table("machines") as batch:
        for name in ("pin_reason", "pinned_version", "target_job", "target_version"):
            batch.drop_column(name)
