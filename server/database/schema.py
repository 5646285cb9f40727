"""The server's tables as they are at the newest migration (server/database/migrations/), for SQLAlchemy Core queries.

Migrations never import this module: each revision spells out its own change, so a later edit here cannot rewrite
history. ``tests/server/database/test_storage.py`` checks that a database migrated to the head matches these tables."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Double, Index, Integer, MetaData, Table, Text

metadata = MetaData()

machines = Table(
    "machines",
    metadata,
    Column("host_id", Text, primary_key=True),
    Column("hostname", Text, nullable=False),
    Column("os_tag", Text, nullable=False),
    Column("role", Text, nullable=False),
    Column("platform", Text, nullable=False),
    Column("agent_version", Text, nullable=False),
    Column("facts", Text, nullable=False),
    Column("cloned_from", Text),
    Column("failover_of", Text),  # a failed-over machine registered as itself: the machine it is a failover of
    Column("failover_point", Text),  # and the point it was failed over from
    Column("enrolled_at", Double, nullable=False),
    Column("cert_serial", Text, nullable=False),
    Column("cert_not_after", Double, nullable=False),
    Column("last_seen", Double),
    Column("heartbeat_interval", Double, nullable=False),
    Column("health", Text),
    Column("public_key", Text),
    Column("machine_id", Text, nullable=False, server_default=""),
    Column("enrol_token_id", Text),
    # A renewal issues the next certificate; the current one stays valid until the next one is first presented
    # (its answer may have been lost), then it is superseded.
    Column("pending_serial", Text),
    Column("pending_not_after", Double),
    Column("pending_public_key", Text),
    Column("key_id", Text),  # sha256 of the current key (SubjectPublicKeyInfo DER): an enrolment retried with it
    Column("revoked_at", Double),  # `mobility-server machines revoke`: every certificate of the host is refused
    # Self-update (server/releases/rollouts.py): the version the machine is told to run (a rollout's wave, a pin), the
    # upgrade job it reports that move under, and a pin that keeps it at a version until an operator unpins it.
    Column("target_version", Text),
    Column("target_job", Text),
    Column("pinned_version", Text),
    Column("pin_reason", Text),
    Index("machines_by_machine_id", "machine_id"),
    Index("machines_by_enrol_token", "enrol_token_id"),
    Index("machines_by_key_id", "key_id"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("job_id", Text, primary_key=True),
    Column("host_id", Text),
    Column("hostname", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("error_id", Text),
    Column("remediation", Text),
    Column("detail", Text),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("owner", Text),
    # What the dashboard reads (server/ui/): a machine's jobs, the newest of a kind (test failovers), the newest
    # failures; each a range of an index, never a scan.
    Index("jobs_by_host", "host_id", "created_at"),
    Index("jobs_by_kind", "kind", "updated_at"),
    Index("jobs_by_state", "state", "updated_at"),
)

tokens = Table(
    "tokens",
    metadata,
    Column("token_id", Text, primary_key=True),
    Column("secret", Text, nullable=False),
    Column("expires_at", Double),
    Column("uses_left", Integer),
    Column("created_at", Double, nullable=False),
)

retired_passphrases = Table(
    "retired_passphrases",
    metadata,
    Column("secret", Text, nullable=False),
    Column("valid_until", Double, nullable=False),
    Index("retired_passphrases_by_valid_until", "valid_until"),
)

# A nonce is signed by the server (any instance can check it); its single use is this table's primary key.
used_nonces = Table(
    "used_nonces",
    metadata,
    Column("nonce_id", Text, primary_key=True),
    Column("expires_at", Double, nullable=False),
    Index("used_nonces_by_expiry", "expires_at"),
)

# Failed or malformed proofs per source address, shared by every instance (the rate limit).
enrol_failures = Table(
    "enrol_failures",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("address", Text, nullable=False),
    Column("at", Double, nullable=False),
    Index("enrol_failures_by_address", "address", "at"),
    Index("enrol_failures_by_time", "at"),
)

# Reports a daemon queued while the server was unreachable: history, never the machine's current state.
health_history = Table(
    "health_history",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("host_id", Text, nullable=False),
    Column("reported_at", Double),
    Column("received_at", Double, nullable=False),
    Column("status", Text, nullable=False),
    Column("health", Text, nullable=False),
    Index("health_history_by_host", "host_id", "received_at"),
    Index("health_history_by_time", "received_at"),
)

# A rollout of a version to machines in waves (server/releases/rollouts.py); its machines, one row each, with their
# wave.
rollouts = Table(
    "rollouts",
    metadata,
    Column("rollout_id", Text, primary_key=True),
    Column("to_version", Text, nullable=False),
    Column("selection", Text, nullable=False),
    Column("wave_size", Integer, nullable=False),
    Column("waves", Integer, nullable=False),
    Column("current_wave", Integer, nullable=False),
    Column("max_failures", Integer, nullable=False),
    Column("wave_timeout", Double, nullable=False),
    Column("state", Text, nullable=False),
    Column("reason", Text),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Index("rollouts_by_state", "state"),
    Index("rollouts_by_created", "created_at"),
)

rollout_machines = Table(
    "rollout_machines",
    metadata,
    Column("rollout_id", Text, primary_key=True),
    Column("host_id", Text, primary_key=True),
    Column("wave", Integer, nullable=False),
    Column("from_version", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("job_id", Text),
    Column("error_id", Text),
    Column("detail", Text),
    Column("offered_at", Double),
    Column("updated_at", Double, nullable=False),
    Index("rollout_machines_by_wave", "rollout_id", "wave"),
)

# Replication (server/process/, docs/replication.md): named policies, and per machine the disks it protects under
# one of them, with the replication status its last heartbeat reported (JSON, agent/shared/replication_wire.py).
policies = Table(
    "policies",
    metadata,
    Column("name", Text, primary_key=True),
    Column("rpo_seconds", Double, nullable=False),
    Column("interval_seconds", Double, nullable=False),
    Column("bandwidth_bps", BigInteger, nullable=False),
    Column("retention", Integer, nullable=False),
)

protection = Table(
    "protection",
    metadata,
    Column("host_id", Text, primary_key=True),
    Column("disks", Text, nullable=False),  # one /dev path a line
    Column("all_disks", Boolean, nullable=False),
    Column("policy", Text, nullable=False),
    Column("paused", Boolean, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("report", Text),
    Column("reported_at", Double),
)

# The operator's view (server/database/operators.py, server/ui/): who may use the dashboard off loopback (a token, kept
# only as its hash; a client certificate, by its fingerprint), their sessions (the session cookie's hash), and the audit
# log of every change made through the dashboard, with the operator's name.
operators = Table(
    "operators",
    metadata,
    Column("name", Text, primary_key=True),
    Column("token_id", Text, nullable=False),
    Column("token_hash", Text, nullable=False),
    Column("cert_fingerprint", Text),
    Column("cert_not_after", Double),
    Column("created_at", Double, nullable=False),
    Index("operators_by_token", "token_id", unique=True),
    Index("operators_by_cert", "cert_fingerprint"),
)

ui_sessions = Table(
    "ui_sessions",
    metadata,
    Column("session_hash", Text, primary_key=True),
    Column("operator", Text, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("expires_at", Double, nullable=False),
    Index("ui_sessions_by_expiry", "expires_at"),
    Index("ui_sessions_by_operator", "operator"),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Double, nullable=False),
    Column("operator", Text, nullable=False),
    Column("via", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("target", Text, nullable=False),
    Column("detail", Text),
    Column("outcome", Text),  # None: asked for and not finished (yet, or ever: the server stopped meanwhile)
    Column("finished_at", Double),
    Index("audit_log_by_time", "at"),
)
