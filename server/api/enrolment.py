"""Enrolment: check the proof of the passphrase or token, decide the machine's identity, issue its certificate.

Who a machine is never rests on what it reports about itself. Facts (machine-id, DMI UUID, MACs) only tell a clone
from its original; taking over an existing host ID needs a signature by that host's current key (the key never
leaves the machine). A request that names a host ID, or whose facts match a known machine, without that proof
becomes a new machine marked ``cloned_from`` the one it resembles, never the original. A failed-over machine (a
recovery point of a host, booted) that names its point and proves that host's key becomes a new machine marked
``failover_of`` it; the same claim without the proof is an unproven name, a clone as above."""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import secrets
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.faults import fault_point
from agent.host.distros import BY_TAG
from agent.shared.textsafe import printable
from agent.shared.wire import EnrolRequest, RenewRequest, WireError, enrol_proof, job_proof, key_proof_message
from server.api import pki
from server.api.nonces import NonceSigner
from server.database.machines import Machine, NewMachine, key_id
from server.database.storage import Storage, Tx
from server.errors import (
    BadProof,
    BadRequest,
    CsrInvalid,
    HostMismatch,
    NonceInvalid,
    RateLimited,
    TokenExpired,
    TokenUsedUp,
)

log = logging.getLogger("mobility.server.enrolment")

NONCE_TTL = 300.0
FAILURE_WINDOW = 60.0
MAX_FAILURES = 5  # per source address and window; then 429 until the oldest failure leaves the window


@dataclass(frozen=True)
class Secret:
    """Which enrolment secret a proof was made with: a token (by ID) or the passphrase."""

    token_id: str | None

    @property
    def principal(self) -> str:
        return f"token:{self.token_id}" if self.token_id else "passphrase"


@dataclass(frozen=True)
class Identity:
    """Who an enrolling machine is: the host ID it gets, what it is a clone of, whether it is an enrolment recorded
    already and asked for again, and for a failed-over machine the host it is a failover of and the point."""

    host_id: str
    cloned_from: str | None = None
    again: bool = False
    failover_of: str | None = None
    failover_point: str | None = None


@dataclass
class Enrolment:
    """Enrolment, renewal and proofs. Its methods block (database, signing): the server calls them in worker threads.
    Nothing here lives in one process: nonces are signed, their single use and the failure counts are in the
    database, so several instances behind a load balancer act as one."""

    storage: Storage
    ca: pki.Authority
    passphrase: Callable[[], str]
    tuf_root: Callable[[], bytes]
    heartbeat_interval: float = 30.0
    nonces: NonceSigner = field(default_factory=lambda: NonceSigner(secrets.token_bytes(32)))

    # Nonces and rate limiting ------------------------------------------------------------------------

    def new_nonce(self, now: float) -> str:
        """A signed nonce: nothing is stored until it is used, so asking for nonces costs the server no memory."""
        return self.nonces.issue(now, NONCE_TTL)

    def _take_nonce(self, nonce: str, now: float) -> None:
        checked = self.nonces.check(nonce, now)
        if not self.storage.use_nonce(checked.id, checked.expires_at):  # single use: a replay finds it taken
            raise NonceInvalid("the nonce was already used")

    def check_rate(self, address: str, now: float) -> None:
        count, oldest = self.storage.failures(address, now - FAILURE_WINDOW)
        if count >= MAX_FAILURES and oldest is not None:
            retry = int(oldest + FAILURE_WINDOW - now) + 1
            raise RateLimited(
                f"{count} failed proofs from {address} in the last {int(FAILURE_WINDOW)} s", retry_after=retry
            )

    def _failed(self, address: str, now: float, why: str, hostname: str) -> None:
        self.storage.record_failure(address, now)
        log.warning("enrolment refused from %s (hostname %s): %s", address, printable(hostname, 80), why)

    # Proofs ------------------------------------------------------------------------------------------

    def _check_proof(
        self,
        token_id: str | None,
        nonce: str,
        proof: str,
        message: bytes,
        now: float,
        prove: Callable[[str, str, bytes], str],
    ) -> Secret:
        """Which secret made ``proof`` (BadProof if none). A token's uses are not looked at here: the enrolment
        takes one in the same transaction that records the machine (none when it was recorded already, and is only
        asked for again). A used-up token still proves that a job report comes from its holder (the host that
        enrolled with it reports afterwards)."""
        if token_id is not None:
            token = self.storage.token(token_id)
            if token is None:
                raise BadProof("unknown enrolment token")
            secret, expires_at, _uses_left = token
            if not _same(prove(secret, nonce, message), proof):
                raise BadProof("the proof does not match the token")
            if expires_at is not None and expires_at < now:
                raise TokenExpired("the enrolment token has expired")
            return Secret(token_id)
        candidates = [self.passphrase(), *self.storage.retired_passphrases(now)]
        if not any(_same(prove(s, nonce, message), proof) for s in candidates):
            raise BadProof("the proof does not match the passphrase")
        return Secret(None)

    # Enrolment ---------------------------------------------------------------------------------------

    def enrol(self, body: Any, address: str, now: float) -> dict[str, Any]:
        self.check_rate(address, now)
        try:
            req = EnrolRequest.from_json(body, BY_TAG)
        except WireError as e:
            # Unauthenticated garbage counts against the address like a wrong proof: it costs us, not them.
            self._failed(address, now, f"malformed request: {e}", "?")
            raise BadRequest(str(e)) from e
        try:
            self._take_nonce(req.nonce, now)
            secret = self._check_proof(req.token_id, req.nonce, req.proof, req.csr.encode(), now, enrol_proof)
        except (NonceInvalid, BadProof, TokenExpired) as e:
            self._failed(address, now, e.message, req.hostname)
            raise
        csr = load_csr(req.csr)
        public = _public_pem(csr)
        # One transaction decides the identity and records it, so that concurrent enrolments of one machine (a
        # retry whose first answer was lost, clones of one image booting together) see each other: no duplicate
        # machine, and a clone is still told from its original. The token's use is taken in it too.
        try:
            with self.storage.transaction() as tx:
                tx.lock(
                    f"key:{key_id(public)}",
                    *([f"facts:{req.facts.machine_id}"] if req.facts.machine_id else []),
                    *([f"host:{req.host_id}"] if req.host_id else []),
                )
                who = self._identity(tx, req, csr, public)
                host_id, cloned_from, again = who.host_id, who.cloned_from, who.again
                try:
                    cert = pki.issue_client_cert(self.ca, csr, host_id, _utc(now))
                except ValueError as e:
                    raise CsrInvalid(str(e)) from e
                record = NewMachine(
                    host_id=host_id,
                    hostname=req.hostname,
                    os_tag=req.os_tag,
                    role=req.role,
                    platform=req.platform,
                    agent_version=req.agent_version,
                    facts=req.facts,
                    cloned_from=cloned_from,
                    failover_of=who.failover_of,
                    failover_point=who.failover_point,
                    cert_serial=format(cert.serial_number, "x"),
                    cert_not_after=cert.not_valid_after_utc.timestamp(),
                    public_key=public,
                    enrol_token_id=secret.token_id,
                    heartbeat_interval=self.heartbeat_interval,
                )
                if not tx.enrol_machine(record, now, take_use=not again):
                    raise TokenUsedUp("the enrolment token has no uses left")
        except TokenUsedUp as e:
            self._failed(address, now, e.message, req.hostname)
            raise
        # The machine is recorded; the answer is not sent yet (the crash tests kill the server here).
        fault_point("enrolment.committed", host_id=host_id)
        log.info(
            "enrolled %s as %s%s",
            printable(req.hostname, 80),
            host_id,
            f" (failover of {who.failover_of} at point {who.failover_point})"
            if who.failover_of
            else f" (clone of {cloned_from})"
            if cloned_from
            else "",
        )
        return {
            "host_id": host_id,
            "cloned_from": cloned_from,
            "failover_of": who.failover_of,
            "certificate": pki.cert_pem(cert).decode(),
            "ca": pki.cert_pem(self.ca.cert).decode(),
            "tuf_root": self.tuf_root().decode(),
            "heartbeat_interval": self.heartbeat_interval,
        }

    def _identity(self, tx: Tx, req: EnrolRequest, csr: x509.CertificateSigningRequest, public: str) -> Identity:
        """The host ID to issue, what it is a clone or a failover of, and whether this is an enrolment already
        recorded, asked for again: the named host only with proof of its current key."""
        csr_cn = pki.csr_common_name(csr)
        if req.host_id is not None and csr_cn != req.host_id:
            raise HostMismatch(f"the CSR names {csr_cn!r} but the request is for host {req.host_id}")
        if req.host_id is None and csr_cn not in (None, "new") and tx.machine(csr_cn) is not None:
            raise HostMismatch(f"the CSR names host {csr_cn}, which belongs to another machine")
        # The same key as an enrolled machine, and its facts: that machine asking again, its first answer lost (a
        # boot storm, a broken connection, this server killed between its commit and its answer; the agent keeps
        # the key until an answer is stored). The CSR is signed by the key, so only its holder can send it, and it
        # gets that machine's identity back, whatever host it named (a clone's retry names its original).
        retried = tx.machine_with_key(key_id(public))
        if retried is not None and not retried.revoked and retried.facts.same_machine(req.facts):
            return Identity(retried.host_id, retried.cloned_from, True, retried.failover_of, retried.failover_point)
        if req.host_id is not None:
            known = tx.machine(req.host_id)
            if known is None:
                # Nobody holds this ID here (a new server, or the record was removed): a fresh identity.
                return Identity(str(uuid.uuid4()))
            if known.revoked:
                log.warning("enrolment names revoked host %s: a new machine", known.host_id)
                return Identity(str(uuid.uuid4()))
            if not self._proves_key(known, req):
                log.warning("enrolment names host %s without proof of its key: a new machine", known.host_id)
                return Identity(str(uuid.uuid4()), known.host_id)
            if req.failover_point is not None:
                # A recovery point of that host, booted, registering as itself: whatever its facts (a hypervisor may
                # give the failed-over VM the source's UUID and MACs), a new machine, never the source.
                return Identity(str(uuid.uuid4()), None, False, known.host_id, req.failover_point)
            if known.facts.same_machine(req.facts):
                return Identity(known.host_id, known.cloned_from)  # the same machine, re-keyed
            return Identity(str(uuid.uuid4()), known.host_id)  # its key, other facts: a clone of it
        same = tx.find_by_facts(req.facts)
        # The same facts as a known machine without its key: a clone (or the same machine without its state). It
        # never gets the original's identity; an operator removes the old record if it is gone.
        return Identity(str(uuid.uuid4()), same.host_id if same is not None else None)

    @staticmethod
    def _proves_key(known: Machine, req: EnrolRequest) -> bool:
        if not req.key_proof:
            return False
        for pem in known.proof_keys():
            try:
                public = serialization.load_pem_public_key(pem.encode())
                if not isinstance(public, ec.EllipticCurvePublicKey):
                    continue
                public.verify(
                    bytes.fromhex(req.key_proof),
                    key_proof_message(req.nonce, req.csr.encode()),
                    ec.ECDSA(hashes.SHA256()),
                )
            except (InvalidSignature, ValueError):
                continue
            return True
        return False

    def renew(self, host_id: str, body: Any, now: float) -> dict[str, Any]:
        """A new certificate for ``host_id``, whose current certificate the caller has checked (the server's
        ``authenticate``: a revoked or superseded certificate never gets here)."""
        try:
            req = RenewRequest.from_json(body)
        except WireError as e:
            raise BadRequest(str(e)) from e
        csr = load_csr(req.csr)
        if pki.csr_common_name(csr) != host_id:
            raise HostMismatch(f"the CSR names {pki.csr_common_name(csr)!r}; this certificate is for {host_id}")
        try:
            cert = pki.issue_client_cert(self.ca, csr, host_id, _utc(now))
        except ValueError as e:
            raise CsrInvalid(str(e)) from e
        self.storage.renew_certificate(
            host_id, format(cert.serial_number, "x"), cert.not_valid_after_utc.timestamp(), _public_pem(csr)
        )
        return {"certificate": pki.cert_pem(cert).decode()}

    def check_job_proof(
        self, token_id: str | None, nonce: str, proof: str, body: bytes, address: str, now: float
    ) -> Secret:
        """A job report from a machine without a certificate (e.g. a failed install) proves the secret too."""
        self.check_rate(address, now)
        try:
            self._take_nonce(nonce, now)
            return self._check_proof(token_id, nonce, proof, body, now, job_proof)
        except (NonceInvalid, BadProof, TokenExpired, TokenUsedUp) as e:
            self._failed(address, now, e.message, "(job report)")
            raise


def load_csr(pem: str) -> x509.CertificateSigningRequest:
    """A CSR that parses, is signed by its own key, and has an EC P-256 key; CsrInvalid otherwise."""
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except ValueError as e:
        raise CsrInvalid(f"the CSR does not parse: {e}") from e
    if not csr.is_signature_valid:
        raise CsrInvalid("the CSR is not signed by its own key")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CsrInvalid("the CSR's key is not an EC P-256 key")
    return csr


def _public_pem(csr: x509.CertificateSigningRequest) -> str:
    return (
        csr.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _same(a: str, b: str) -> bool:
    """Constant-time comparison of two proofs; non-ASCII text compares as bytes instead of raising TypeError."""
    return hmac.compare_digest(a.encode(), b.encode())


def create_token(storage: Storage, ttl: float, uses: int | None, now: float) -> tuple[str, str]:
    """A new enrolment token: (its ID, the whole ``mbt_<id>_<secret>`` the machine is given)."""
    alphabet = string.ascii_letters + string.digits
    token_id = "".join(secrets.choice(alphabet) for _ in range(12))
    secret = secrets.token_urlsafe(24)
    storage.add_token(token_id, secret, now + ttl, uses, now)
    return token_id, f"mbt_{token_id}_{secret}"


def _utc(now: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(now, dt.UTC)
