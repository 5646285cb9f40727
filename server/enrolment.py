"""Enrolment: check the proof of the passphrase or token, decide the machine's identity, issue its certificate."""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import secrets
import string
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from agent.wire import PLATFORMS, ROLES, EnrolRequest, MachineFacts, enrol_proof, job_proof
from server import pki
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
from server.storage import Storage

log = logging.getLogger("mobility.server.enrolment")

NONCE_TTL = 300.0
FAILURE_WINDOW = 60.0
MAX_FAILURES = 5  # per source address and window; then 429 until the oldest failure leaves the window
MAX_NONCES = 100_000


@dataclass
class Enrolment:
    storage: Storage
    ca: pki.Authority
    passphrase: Callable[[], str]
    tuf_root: Callable[[], bytes]
    heartbeat_interval: float = 30.0
    _nonces: dict[str, float] = field(default_factory=dict)
    _failures: dict[str, deque[float]] = field(default_factory=dict)

    # Nonces and rate limiting ------------------------------------------------------------------------

    def new_nonce(self, now: float) -> str:
        if len(self._nonces) >= MAX_NONCES:
            self._nonces = {n: t for n, t in self._nonces.items() if t > now}
        nonce = secrets.token_urlsafe(24)
        self._nonces[nonce] = now + NONCE_TTL
        return nonce

    def _take_nonce(self, nonce: str, now: float) -> None:
        expires = self._nonces.pop(nonce, None)  # single use: a replay finds nothing
        if expires is None or expires < now:
            raise NonceInvalid("the nonce is unknown, already used or expired")

    def check_rate(self, address: str, now: float) -> None:
        recent = self._failures.get(address)
        while recent and recent[0] <= now - FAILURE_WINDOW:
            recent.popleft()
        if recent is not None and len(recent) >= MAX_FAILURES:
            retry = int(recent[0] + FAILURE_WINDOW - now) + 1
            err = RateLimited(f"{len(recent)} failed proofs from {address} in the last {int(FAILURE_WINDOW)} s")
            err.retry_after = retry  # type: ignore[attr-defined]
            raise err

    def _failed(self, address: str, now: float, why: str, hostname: str) -> None:
        self._failures.setdefault(address, deque()).append(now)
        log.warning("enrolment refused from %s (hostname %r): %s", address, hostname, why)

    # Proofs ------------------------------------------------------------------------------------------

    def _check_proof(
        self,
        token_id: str | None,
        nonce: str,
        proof: str,
        message: bytes,
        now: float,
        prove: Callable[[str, str, bytes], str],
    ) -> None:
        if token_id is not None:
            token = self.storage.token(token_id)
            if token is None:
                raise BadProof("unknown enrolment token")
            secret, expires_at, uses_left = token
            if not hmac.compare_digest(prove(secret, nonce, message), proof):
                raise BadProof("the proof does not match the token")
            if expires_at is not None and expires_at < now:
                raise TokenExpired("the enrolment token has expired")
            if uses_left is not None and uses_left <= 0:
                raise TokenUsedUp("the enrolment token has no uses left")
            return
        candidates = [self.passphrase(), *self.storage.retired_passphrases(now)]
        if not any(hmac.compare_digest(prove(s, nonce, message), proof) for s in candidates):
            raise BadProof("the proof does not match the passphrase")

    # Enrolment ---------------------------------------------------------------------------------------

    def enrol(self, body: Any, address: str, now: float) -> dict[str, Any]:
        req = parse_enrol_request(body)
        self.check_rate(address, now)
        try:
            self._take_nonce(req.nonce, now)
            self._check_proof(req.token_id, req.nonce, req.proof, req.csr.encode(), now, enrol_proof)
        except (NonceInvalid, BadProof, TokenExpired, TokenUsedUp) as e:
            self._failed(address, now, e.message, req.hostname)
            raise
        try:
            csr = x509.load_pem_x509_csr(req.csr.encode())
        except ValueError as e:
            raise CsrInvalid(f"the CSR does not parse: {e}") from e
        if not csr.is_signature_valid:
            raise CsrInvalid("the CSR is not signed by its own key")
        host_id, cloned_from = self._identity(req, pki.csr_common_name(csr))
        try:
            cert = pki.issue_client_cert(self.ca, csr, host_id, _utc(now))
        except ValueError as e:
            raise CsrInvalid(str(e)) from e
        if req.token_id is not None:
            self.storage.use_token(req.token_id)
        self.storage.upsert_machine(
            host_id=host_id,
            hostname=req.hostname,
            os_tag=req.os_tag,
            role=req.role,
            platform=req.platform,
            agent_version=req.agent_version,
            facts=req.facts,
            cloned_from=cloned_from,
            now=now,
            cert_serial=format(cert.serial_number, "x"),
            cert_not_after=cert.not_valid_after_utc.timestamp(),
            heartbeat_interval=self.heartbeat_interval,
        )
        log.info("enrolled %s as %s%s", req.hostname, host_id, f" (clone of {cloned_from})" if cloned_from else "")
        return {
            "host_id": host_id,
            "cloned_from": cloned_from,
            "certificate": pki.cert_pem(cert).decode(),
            "ca": pki.cert_pem(self.ca.cert).decode(),
            "tuf_root": self.tuf_root().decode(),
            "heartbeat_interval": self.heartbeat_interval,
        }

    def _identity(self, req: EnrolRequest, csr_cn: str | None) -> tuple[str, str | None]:
        """The host ID to issue: the same for the same machine, a new one (with cloned_from) for a clone."""
        if req.host_id is not None:
            if csr_cn != req.host_id:
                raise HostMismatch(f"the CSR names {csr_cn!r} but the request is for host {req.host_id}")
            known = self.storage.machine(req.host_id)
            if known is None or known.facts.same_machine(req.facts):
                return req.host_id, known.cloned_from if known else None
            return str(uuid.uuid4()), req.host_id  # same identity, other machine: a clone
        if csr_cn and self.storage.machine(csr_cn) is not None:
            raise HostMismatch(f"the CSR names host {csr_cn}, which belongs to another machine")
        same = self.storage.find_by_facts(req.facts)
        if same is not None:
            return same.host_id, same.cloned_from
        return str(uuid.uuid4()), None

    def renew(self, host_id: str, body: Any, now: float) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("csr"), str):
            raise BadRequest('expected {"csr": PEM}')
        try:
            csr = x509.load_pem_x509_csr(body["csr"].encode())
        except ValueError as e:
            raise CsrInvalid(f"the CSR does not parse: {e}") from e
        if pki.csr_common_name(csr) != host_id:
            raise HostMismatch(f"the CSR names {pki.csr_common_name(csr)!r}; this certificate is for {host_id}")
        cert = pki.issue_client_cert(self.ca, csr, host_id, _utc(now))
        self.storage.renew_certificate(host_id, format(cert.serial_number, "x"), cert.not_valid_after_utc.timestamp())
        return {"certificate": pki.cert_pem(cert).decode()}

    def check_job_proof(
        self, token_id: str | None, nonce: str, proof: str, body: bytes, address: str, now: float
    ) -> None:
        """A job report from a machine without a certificate (e.g. a failed install) proves the secret too."""
        self.check_rate(address, now)
        try:
            self._take_nonce(nonce, now)
            self._check_proof(token_id, nonce, proof, body, now, job_proof)
        except (NonceInvalid, BadProof, TokenExpired, TokenUsedUp) as e:
            self._failed(address, now, e.message, "(job report)")
            raise


def create_token(storage: Storage, ttl: float, uses: int | None, now: float) -> tuple[str, str]:
    """A new enrolment token: (its ID, the whole ``mbt_<id>_<secret>`` the machine is given)."""
    alphabet = string.ascii_letters + string.digits
    token_id = "".join(secrets.choice(alphabet) for _ in range(12))
    secret = secrets.token_urlsafe(24)
    storage.add_token(token_id, secret, now + ttl, uses, now)
    return token_id, f"mbt_{token_id}_{secret}"


def parse_enrol_request(body: Any) -> EnrolRequest:
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    try:
        fields = {
            k: body[k] for k in ("csr", "nonce", "proof", "hostname", "os_tag", "role", "platform", "agent_version")
        }
    except KeyError as e:
        raise BadRequest(f"missing field {e.args[0]!r}") from e
    if not all(isinstance(v, str) and v for v in fields.values()):
        raise BadRequest("csr, nonce, proof, hostname, os_tag, role, platform, agent_version must be strings")
    if fields["role"] not in ROLES or fields["platform"] not in PLATFORMS:
        raise BadRequest(f"role must be one of {ROLES} and platform one of {PLATFORMS}")
    token_id, host_id = body.get("token_id"), body.get("host_id")
    if (token_id is not None and not isinstance(token_id, str)) or (
        host_id is not None and not isinstance(host_id, str)
    ):
        raise BadRequest("token_id and host_id must be strings when given")
    try:
        facts = MachineFacts.from_json(body.get("facts", {}))
    except ValueError as e:
        raise BadRequest(str(e)) from e
    return EnrolRequest(facts=facts, token_id=token_id, host_id=host_id, **fields)


def _utc(now: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(now, dt.UTC)
