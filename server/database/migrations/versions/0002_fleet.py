"""Fleet scale: shared nonces, failure counters and health history in the database; certificate revocation.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa
from alembic import op
from cryptography.hazmat.primitives import serialization

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _key_id(pem: str | None) -> str | None:
    if not pem:
        return None
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except ValueError:
        return None
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def upgrade() -> None:
    with op.batch_alter_table("machines") as batch:
        batch.add_column(sa.Column("pending_serial", sa.Text))
        batch.add_column(sa.Column("pending_not_after", sa.Double))
        batch.add_column(sa.Column("pending_public_key", sa.Text))
        batch.add_column(sa.Column("key_id", sa.Text))
        batch.add_column(sa.Column("revoked_at", sa.Double))
    op.create_index("machines_by_key_id", "machines", ["key_id"])
    bind = op.get_bind()
    machines = sa.table(
        "machines", sa.column("host_id", sa.Text), sa.column("public_key", sa.Text), sa.column("key_id", sa.Text)
    )
    for host_id, pem in bind.execute(sa.select(machines.c.host_id, machines.c.public_key)).all():
        key_id = _key_id(pem)
        if key_id is not None:
            bind.execute(sa.update(machines).where(machines.c.host_id == host_id).values(key_id=key_id))
    op.create_index("retired_passphrases_by_valid_until", "retired_passphrases", ["valid_until"])
    op.create_table(
        "used_nonces",
        sa.Column("nonce_id", sa.Text, primary_key=True),
        sa.Column("expires_at", sa.Double, nullable=False),
    )
    op.create_index("used_nonces_by_expiry", "used_nonces", ["expires_at"])
    op.create_table(
        "enrol_failures",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("address", sa.Text, nullable=False),
        sa.Column("at", sa.Double, nullable=False),
    )
    op.create_index("enrol_failures_by_address", "enrol_failures", ["address", "at"])
    op.create_index("enrol_failures_by_time", "enrol_failures", ["at"])
    op.create_table(
        "health_history",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("host_id", sa.Text, nullable=False),
        sa.Column("reported_at", sa.Double),
        sa.Column("received_at", sa.Double, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("health", sa.Text, nullable=False),
    )
    op.create_index("health_history_by_host", "health_history", ["host_id", "received_at"])
    op.create_index("health_history_by_time", "health_history", ["received_at"])


def downgrade() -> None:
    for index, table in (
        ("health_history_by_time", "health_history"),
        ("health_history_by_host", "health_history"),
        ("enrol_failures_by_time", "enrol_failures"),
        ("enrol_failures_by_address", "enrol_failures"),
        ("used_nonces_by_expiry", "used_nonces"),
    ):
        op.drop_index(index, table)
    for table in ("health_history", "enrol_failures", "used_nonces"):
        op.drop_table(table)
    op.drop_index("retired_passphrases_by_valid_until", "retired_passphrases")
    op.drop_index("machines_by_key_id", "machines")
    with op.batch_alter_table("machines") as batch:
        for name in ("revoked_at", "key_id", "pending_public_key", "pending_not_after", "pending_serial"):
            batch.drop_column(name)
