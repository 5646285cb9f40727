"""Operators of the dashboard, their sessions, and the audit log of the changes they make (docs/monitoring.md).

The one owner of the tables of migration 0005. An operator logs in off loopback with a token `mobility-server operator
add NAME` printed once (``mop_<id>_<secret>``: the ID finds the row by an index, only the token's SHA-256 is kept), or
with a client certificate of the server's CA made for it (kept as its fingerprint). A login opens a session: a random
cookie whose hash is the row, ending at a fixed time; removing the operator ends its sessions at once. Everything is
in the database, so a session opened on one instance holds on every instance sharing it.

The audit log is written ahead: a change is recorded (who, from where, what, on what) before it is made, and its
outcome after. A change the server never finished (it stopped meanwhile) stays recorded as asked for, never missing.

These calls block: a serving instance runs them in a worker thread (server/ui/), never on its event loop."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, insert, select, update

from agent.shared.textsafe import printable, shown
from server.database.schema import audit_log, operators, ui_sessions
from server.database.storage import Storage
from server.errors import OperatorExists, OperatorInvalid, OperatorNotFound

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_TOKEN = re.compile(r"mop_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
MAX_TOKEN_TEXT = 128  # anything longer is not a token (bounded before it is hashed or matched)
MAX_AUDIT_TEXT = 1000
MAX_AUDIT_LISTING = 1000


def parse_name(text: str) -> str:
    """An operator's name, as the command line and the login take it (OPERATOR-INVALID otherwise)."""
    if not NAME.fullmatch(text):
        raise OperatorInvalid(f"{shown(text, 80)} is not an operator name")
    return text


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Operator:
    name: str
    created_at: float
    cert_fingerprint: str | None
    cert_not_after: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "created_at": self.created_at,
            "certificate": self.cert_fingerprint,
            "certificate_expires": self.cert_not_after,
        }


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    operator: str
    via: str
    action: str
    target: str
    detail: str | None
    outcome: str | None  # None: asked for, never finished
    finished_at: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at,
            "operator": self.operator,
            "via": self.via,
            "action": self.action,
            "target": self.target,
            "detail": self.detail,
            "outcome": self.outcome,
            "finished_at": self.finished_at,
        }


class Operators:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    # Operators (the command line) ---------------------------------------------------------------------------------

    def add(
        self,
        name: str,
        now: float,
        *,
        cert_fingerprint: str | None = None,
        cert_not_after: float | None = None,
    ) -> str:
        """A new operator; returns its token (shown once: only its hash is kept). OPERATOR-EXISTS for a taken name."""
        name = parse_name(name)
        token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        token = f"mop_{token_id}_{secret}"
        with self.storage.transaction() as tx:
            tx.lock(f"operator:{name}")
            if tx.conn.execute(select(operators.c.name).where(operators.c.name == name)).first() is not None:
                raise OperatorExists(f"an operator {name} exists")
            tx.conn.execute(
                insert(operators).values(
                    name=name,
                    token_id=token_id,
                    token_hash=_digest(token),
                    cert_fingerprint=cert_fingerprint,
                    cert_not_after=cert_not_after,
                    created_at=now,
                )
            )
        return token

    def remove(self, name: str) -> None:
        """Remove the operator: its token, certificate and every session of it stop working at once."""
        with self.storage.transaction() as tx:
            tx.conn.execute(delete(ui_sessions).where(ui_sessions.c.operator == name))
            if not tx.conn.execute(delete(operators).where(operators.c.name == name)).rowcount:
                raise OperatorNotFound(f"no operator {shown(name, 80)}")

    def listing(self) -> list[Operator]:
        with self.storage.reading() as tx:
            rows = tx.conn.execute(
                select(
                    operators.c.name, operators.c.created_at, operators.c.cert_fingerprint, operators.c.cert_not_after
                ).order_by(operators.c.name)
            )
            return [Operator(*r) for r in rows]

    # Logins and sessions (the dashboard) ------------------------------------------------------------------------

    def by_token(self, token: str) -> str | None:
        """The operator whose token this is, or None (compared in constant time, by its hash)."""
        m = _TOKEN.fullmatch(token[:MAX_TOKEN_TEXT])
        if m is None:
            return None
        with self.storage.reading() as tx:
            row = tx.conn.execute(
                select(operators.c.name, operators.c.token_hash).where(operators.c.token_id == m.group(1))
            ).first()
        if row is None or not hmac.compare_digest(str(row[1]), _digest(token)):
            return None
        return str(row[0])

    def by_certificate(self, fingerprint: str, now: float) -> str | None:
        """The operator a client certificate (``sha256:<hex>`` of its DER) was made for, while it is valid."""
        with self.storage.reading() as tx:
            row = tx.conn.execute(
                select(operators.c.name, operators.c.cert_not_after).where(operators.c.cert_fingerprint == fingerprint)
            ).first()
        if row is None or (row[1] is not None and row[1] < now):
            return None
        return str(row[0])

    def open_session(self, name: str, now: float, lifetime: float) -> str:
        """A new session of ``name`` ending ``lifetime`` seconds from now; returns the cookie's value."""
        secret = secrets.token_urlsafe(32)
        with self.storage.transaction() as tx:
            tx.conn.execute(
                insert(ui_sessions).values(
                    session_hash=_digest(secret), operator=name, created_at=now, expires_at=now + lifetime
                )
            )
        return secret

    def session(self, secret: str, now: float) -> tuple[str, float] | None:
        """The operator of a session and when it ends, if it has not ended and its operator still exists."""
        if not secret or len(secret) > MAX_TOKEN_TEXT:
            return None
        with self.storage.reading() as tx:
            row = tx.conn.execute(
                select(ui_sessions.c.operator, ui_sessions.c.expires_at)
                .select_from(ui_sessions.join(operators, operators.c.name == ui_sessions.c.operator))
                .where(and_(ui_sessions.c.session_hash == _digest(secret), ui_sessions.c.expires_at > now))
            ).first()
        return (str(row[0]), float(row[1])) if row else None

    def close_session(self, secret: str) -> None:
        if secret and len(secret) <= MAX_TOKEN_TEXT:
            with self.storage.transaction() as tx:
                tx.conn.execute(delete(ui_sessions).where(ui_sessions.c.session_hash == _digest(secret)))

    def prune(self, now: float) -> int:
        """Forget ended sessions (by their expiry index)."""
        with self.storage.transaction() as tx:
            return int(tx.conn.execute(delete(ui_sessions).where(ui_sessions.c.expires_at <= now)).rowcount)

    # The audit log ----------------------------------------------------------------------------------------------

    def audit(self, operator: str, via: str, action: str, target: str, detail: str | None, now: float) -> int:
        """Record a change before it is made; returns the entry to ``finish``."""
        values = {
            "at": now,
            "operator": printable(operator, 100),
            "via": printable(via, 200),
            "action": printable(action, 100),
            "target": printable(target, 300),
            "detail": printable(detail, MAX_AUDIT_TEXT) if detail else None,
        }
        with self.storage.transaction() as tx:
            return int(tx.conn.execute(insert(audit_log).values(**values).returning(audit_log.c.id)).scalar_one())

    def finish(self, entry: int, outcome: str, now: float) -> None:
        """Record how a change ended: ``done``, or the error ID and message that stopped it."""
        with self.storage.transaction() as tx:
            tx.conn.execute(
                update(audit_log)
                .where(audit_log.c.id == entry)
                .values(outcome=printable(outcome, MAX_AUDIT_TEXT), finished_at=now)
            )

    def audit_log(self, limit: int = 100) -> list[AuditEntry]:
        """The newest entries first (by the time index)."""
        limit = max(1, min(limit, MAX_AUDIT_LISTING))
        with self.storage.reading() as tx:
            rows = tx.conn.execute(
                select(audit_log).order_by(audit_log.c.at.desc(), audit_log.c.id.desc()).limit(limit)
            )
            return [AuditEntry(**r._mapping) for r in rows]
