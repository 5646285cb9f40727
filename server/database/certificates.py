"""The machines' certificates: what checking a client certificate needs (``Credential``, one narrow row per machine,
read for many at once on the heartbeat path), a renewal recorded as the next certificate and promoted when first
presented, and revocation."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import and_, select, update

from server.database.machines import key_id
from server.database.protection import PROTECTION_COLUMNS, ProtectionRow, protection_of, with_protection
from server.database.schema import machines
from server.database.transactions import Access, T, db_errors
from server.errors import CertRevoked, CertSuperseded, UnknownMachine


@dataclass(frozen=True)
class Credential:
    """What checking a machine's client certificate needs (a narrow row: the heartbeat path reads one per call)."""

    host_id: str
    cert_serial: str
    pending_serial: str | None
    pending_public_key: str | None
    revoked_at: float | None
    heartbeat_interval: float
    target_version: str | None = None  # what its heartbeat answer names (server/releases/rollouts.py)
    target_job: str | None = None
    pinned_version: str | None = None
    protection: ProtectionRow | None = None  # what its heartbeat answer asks it to protect (replication)

    def verify(self, serial: str) -> bool:
        """Whether the certificate ``serial`` is good: True when it is the renewed one presented for the first time
        (to be promoted), False when it is the current one. CERT-REVOKED for a revoked host, CERT-SUPERSEDED for a
        certificate a renewal or re-enrolment replaced. (A removed host has no Credential: MACHINE-UNKNOWN.)"""
        if self.revoked_at is not None:
            raise CertRevoked(f"host {self.host_id} was revoked by the server's operator")
        if same_serial(serial, self.cert_serial):
            return False
        if same_serial(serial, self.pending_serial):
            return True
        raise CertSuperseded(
            f"this certificate of host {self.host_id} (serial {serial[:40]}) was replaced by a newer one"
        )


def same_serial(a: str | None, b: str | None) -> bool:
    """Serial numbers as hex text (ours lower-case, OpenSSL's upper-case and zero-padded) compared as numbers."""
    if not a or not b:
        return False
    try:
        return int(a, 16) == int(b, 16)
    except ValueError:
        return False


class Certificates(Access[T]):
    """The machines' certificates (``Storage``'s part of them)."""

    @db_errors
    def renew_certificate(self, host_id: str, serial: str, not_after: float, public_key: str) -> None:
        """Record a renewed certificate as the next one: the current one stays valid until it is first presented."""
        with self.transaction() as tx:
            tx.conn.execute(
                update(machines)
                .where(machines.c.host_id == host_id)
                .values(pending_serial=serial, pending_not_after=not_after, pending_public_key=public_key)
            )

    def present_certificate(self, host_id: str, serial: str) -> Credential:
        """The machine a verified client certificate (CN ``host_id``, ``serial``) speaks for, if that certificate is
        still good (``Credential.check``); the renewed certificate's first use makes it the current one."""
        credential = self.credentials([host_id]).get(host_id)
        if credential is None:
            raise UnknownMachine(f"host {host_id} is not registered (or was removed)")
        if credential.verify(serial):
            self.promote(credential)
        return credential

    @db_errors
    def credentials(self, host_ids: Iterable[str]) -> dict[str, Credential]:
        """What checking a client certificate needs, for many machines in one query (by primary key): the server
        batches the heartbeats that arrive together into one of these."""
        with self.reading() as tx:
            rows = tx.conn.execute(
                select(
                    machines.c.host_id,
                    machines.c.cert_serial,
                    machines.c.pending_serial,
                    machines.c.pending_public_key,
                    machines.c.revoked_at,
                    machines.c.heartbeat_interval,
                    machines.c.target_version,
                    machines.c.target_job,
                    machines.c.pinned_version,
                    *PROTECTION_COLUMNS,
                )
                .select_from(with_protection(machines))
                .where(machines.c.host_id.in_(list(host_ids)))
            )
            return {r[0]: Credential(*r[:9], protection=protection_of(r._mapping)) for r in rows}

    @db_errors
    def promote(self, credential: Credential) -> None:
        """The renewed certificate was presented: it becomes the current one, and the one before is superseded."""
        with self.transaction() as tx:
            tx.conn.execute(
                update(machines)
                .where(
                    and_(
                        machines.c.host_id == credential.host_id,
                        machines.c.pending_serial == credential.pending_serial,
                    )
                )
                .values(
                    cert_serial=machines.c.pending_serial,
                    cert_not_after=machines.c.pending_not_after,
                    public_key=machines.c.pending_public_key,
                    key_id=key_id(credential.pending_public_key)
                    if credential.pending_public_key
                    else machines.c.key_id,
                    pending_serial=None,
                    pending_not_after=None,
                    pending_public_key=None,
                )
            )

    @db_errors
    def revoke(self, host_id: str, now: float) -> bool:
        """Refuse every certificate of ``host_id`` from now on (its record stays, marked revoked)."""
        with self.transaction() as tx:
            return bool(
                tx.conn.execute(
                    update(machines)
                    .where(and_(machines.c.host_id == host_id, machines.c.revoked_at.is_(None)))
                    .values(revoked_at=now, pending_serial=None, pending_not_after=None, pending_public_key=None)
                ).rowcount
            )
