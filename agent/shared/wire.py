"""The agent-server wire format: API paths, the enrolment proofs, and every request body as a typed, validated
value. Both sides import this module (the agent never imports the server). The server parses each body once, at the
edge, with the ``from_json`` constructors here: a field of the wrong type, an over-long string or a control
character is refused before anything is stored or logged."""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.shared.fields import Fields, WireError, check_text

__all__ = ["WireError"]  # with the bodies: every caller of a body's from_json catches it from here

if TYPE_CHECKING:
    from agent.shared.replication_wire import ReplicationReport

API = "/v1"
NONCE_PATH = f"{API}/enrol/nonce"
ENROL_PATH = f"{API}/enrol"
RENEW_PATH = f"{API}/renew"
HEARTBEAT_PATH = f"{API}/heartbeat"
JOBS_PATH = f"{API}/jobs"
REPO_METADATA_PATH = f"{API}/repo/metadata"
REPO_TARGETS_PATH = f"{API}/repo/targets"
DEFAULT_PORT = 9443
MAX_BODY = 64 * 1024  # every request body the API accepts fits easily

ROLES = ("MS", "MT")
PLATFORMS = ("VmWare", "Azure")
JOB_KINDS = ("install", "upgrade", "push", "configure", "uninstall")
JOB_STATES = ("running", "succeeded", "succeeded with warnings", "failed")
HEALTH_STATES = ("healthy", "warning", "critical", "unknown")
CHECK_STATES = ("PASS", "WARN", "FAIL", "UNKNOWN")

MAX_CHECKS = 64  # a health report has about a dozen checks
_DOTTED = re.compile(r"[0-9]+(?:\.[0-9]+){1,7}")  # a version
MAX_MACS = 64
MAX_CSR = 8 * 1024

_PROOF_CONTEXT = b"mobility-enrol-proof-v1\0"
_KEY_PROOF_CONTEXT = b"mobility-key-proof-v1\0"
TOKEN_RE = re.compile(r"^mbt_([A-Za-z0-9]{12})_([A-Za-z0-9_-]{20,})$")
_TOKEN_ID = re.compile(r"[A-Za-z0-9]{12}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"(?:[0-9a-f]{2}){8,256}")
_NONCE = re.compile(r"[A-Za-z0-9_-]{16,64}")
_VERSION = re.compile(r"[0-9][0-9A-Za-z.+~-]{0,31}")
_CHECK_ID = re.compile(r"[A-Z][A-Z0-9-]{0,47}")
_ERROR_ID = re.compile(r"[A-Z][A-Z0-9-]{0,63}")
_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5,19}")
_FACT = re.compile(r"[0-9A-Za-z:._-]{0,64}")


def enrol_proof(secret: str, nonce: str, csr_pem: bytes) -> str:
    """HMAC-SHA256 keyed by the passphrase or token secret over the nonce and the CSR: the secret itself
    never crosses the wire, and a proof is useless for any other CSR or nonce."""
    msg = _PROOF_CONTEXT + nonce.encode() + b"\0" + hashlib.sha256(csr_pem).digest()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def job_proof(secret: str, nonce: str, body: bytes) -> str:
    """The same proof over a job report, for an agent that holds no certificate yet (a failed install)."""
    msg = b"mobility-job-proof-v1\0" + nonce.encode() + b"\0" + hashlib.sha256(body).digest()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def key_proof_message(nonce: str, csr_pem: bytes) -> bytes:
    """What a re-enrolling machine signs with its current private key: proof that it is the host it names (facts a
    client reports are not proof). Bound to the one-time nonce and the new CSR, so it cannot be replayed."""
    return _KEY_PROOF_CONTEXT + nonce.encode() + b"\0" + hashlib.sha256(csr_pem).digest()


def split_token(secret: str) -> tuple[str, str] | None:
    """A token ``mbt_<id>_<secret>`` as (id, secret); None for a passphrase."""
    m = TOKEN_RE.match(secret.strip())
    return (m.group(1), m.group(2)) if m else None


def _host_id(value: str, name: str) -> str:
    try:
        parsed = uuid.UUID(value)
    except ValueError as e:
        raise WireError(f"{name} is not a host ID (a UUID)") from e
    if str(parsed) != value:
        raise WireError(f"{name} is not a host ID in canonical form")
    return value


# Bodies -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MachineFacts:
    """What identifies the machine under a host ID; when these change, the machine is a clone."""

    machine_id: str = ""
    product_uuid: str = ""
    macs: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"machine_id": self.machine_id, "product_uuid": self.product_uuid, "macs": list(self.macs)}

    @classmethod
    def from_json(cls, data: Any) -> MachineFacts:
        f = Fields(data, "facts")
        macs = f.items("macs", MAX_MACS)
        checked = [check_text(m, "facts.macs[]", 64, pattern=_MAC) if isinstance(m, str) else None for m in macs]
        if any(m is None for m in checked):
            raise WireError("facts.macs must be a list of strings")
        machine_id = f.text("machine_id", 64, pattern=_FACT) if "machine_id" in f.doc else ""
        product_uuid = f.text("product_uuid", 64, pattern=_FACT) if "product_uuid" in f.doc else ""
        return cls(machine_id, product_uuid, tuple(sorted({m for m in checked if m})))

    def same_machine(self, other: MachineFacts) -> bool:
        """Same machine-id and, where both know it, the same DMI product UUID (MACs may be replaced)."""
        if self.machine_id != other.machine_id:
            return False
        return not (self.product_uuid and other.product_uuid and self.product_uuid != other.product_uuid)


@dataclass(frozen=True)
class EnrolRequest:
    csr: str
    nonce: str
    proof: str
    hostname: str
    os_tag: str
    role: str
    platform: str
    facts: MachineFacts
    agent_version: str
    token_id: str | None = None
    host_id: str | None = None  # the identity this machine held before, if any
    key_proof: str | None = None  # hex DER signature over key_proof_message() by that identity's current key
    # A failed-over machine registering as itself: the point of ``host_id`` it was failed over from (with the proof
    # of that host's key, the server records it ``failover_of`` that host).
    failover_point: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "csr": self.csr,
            "nonce": self.nonce,
            "proof": self.proof,
            "hostname": self.hostname,
            "os_tag": self.os_tag,
            "role": self.role,
            "platform": self.platform,
            "facts": self.facts.to_json(),
            "agent_version": self.agent_version,
            "token_id": self.token_id,
            "host_id": self.host_id,
            "key_proof": self.key_proof,
        }
        if self.failover_point is not None:  # only then: a server from before failovers ignores nothing it needs
            doc["failover_point"] = self.failover_point
        return doc

    @classmethod
    def from_json(cls, body: Any, os_tags: Collection[str]) -> EnrolRequest:
        """``os_tags``: the tags of the support matrix (agent.host.distros.BY_TAG), which the server accepts."""
        f = Fields(body, "enrolment")
        host_id = f.optional_text("host_id", 36)
        return cls(
            csr=f.text("csr", MAX_CSR, lines=True),
            nonce=f.text("nonce", 64, pattern=_NONCE),
            proof=f.text("proof", 64, pattern=_HEX64),
            hostname=hostname(f.text("hostname", 255)),
            os_tag=f.text("os_tag", 32, choices=tuple(os_tags)),
            role=f.text("role", 2, choices=ROLES),
            platform=f.text("platform", 6, choices=PLATFORMS),
            facts=MachineFacts.from_json(f.doc.get("facts", {})),
            agent_version=f.text("agent_version", 32, pattern=_VERSION),
            token_id=f.optional_text("token_id", 12, pattern=_TOKEN_ID),
            host_id=_host_id(host_id, "enrolment.host_id") if host_id is not None else None,
            key_proof=f.optional_text("key_proof", 512, pattern=_HEX),
            failover_point=_point_id(f.optional_text("failover_point", 36), "enrolment.failover_point"),
        )


def _point_id(value: str | None, name: str) -> str | None:
    """A recovery point's ID: a UUID in canonical form, as agents make them."""
    if value is None:
        return None
    try:
        if str(uuid.UUID(value)) == value:
            return value
    except ValueError:
        pass
    raise WireError(f"{name} is not a UUID in canonical form")


def hostname(value: str) -> str:
    """A machine's name as it reports it: printable, no whitespace, 1-255 characters (WireError otherwise)."""
    if not value or any(c.isspace() for c in value):
        raise WireError("hostname must be a non-empty name without spaces")
    return check_text(value, "hostname", 255)


@dataclass(frozen=True)
class RenewRequest:
    csr: str

    @classmethod
    def from_json(cls, body: Any) -> RenewRequest:
        return cls(Fields(body, "renewal").text("csr", MAX_CSR, lines=True))


@dataclass(frozen=True)
class CheckReport:
    """One health check as the agent reports it (agent.lifecycle.check_report.Result.to_json)."""

    id: str
    status: str
    message: str
    remediation: str = ""
    value: str | None = None
    threshold: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return {
            "id": self.id,
            "status": self.status,
            "message": self.message,
            "remediation": self.remediation,
            "value": self.value,
            "threshold": self.threshold,
        }

    @classmethod
    def from_json(cls, doc: Any) -> CheckReport:
        f = Fields(doc, "health.checks[]")
        return cls(
            id=f.text("id", 48, pattern=_CHECK_ID),
            status=f.text("status", 8, choices=CHECK_STATES),
            message=f.text("message", 1000),
            remediation=f.optional_text("remediation", 1000) or "",
            value=f.optional_text("value", 200),
            threshold=f.optional_text("threshold", 200),
        )


@dataclass(frozen=True)
class HealthReport:
    """The daemon's health report: overall status, when it was measured, and every check."""

    status: str
    time: float | None = None
    checks: tuple[CheckReport, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "time": self.time, "checks": [c.to_json() for c in self.checks]}

    @classmethod
    def from_json(cls, doc: Any) -> HealthReport:
        f = Fields(doc, "health")
        return cls(
            status=f.text("status", 16, choices=HEALTH_STATES),
            time=f.number("time") if f.doc.get("time") is not None else None,
            checks=tuple(CheckReport.from_json(c) for c in f.items("checks", MAX_CHECKS)),
        )

    @classmethod
    def stored(cls, doc: Any) -> HealthReport | None:
        """A report read back from the database, or None when it is not one (a reader never crashes on it)."""
        try:
            return cls.from_json(doc)
        except WireError:
            return None


@dataclass(frozen=True)
class Heartbeat:
    host_id: str
    agent_version: str
    health: HealthReport | None
    queued: bool = False  # sent from the backlog after an outage: history, not the current state
    replication: ReplicationReport | None = None  # a protected machine's replication status

    def to_json(self) -> dict[str, Any]:
        return {
            "host_id": self.host_id,
            "agent_version": self.agent_version,
            "health": self.health.to_json() if self.health else None,
            "queued": self.queued,
            "replication": self.replication.to_json() if self.replication else None,
        }

    @classmethod
    def from_json(cls, body: Any) -> Heartbeat:
        # Imported here: the bootstrapper's at-boot check imports this module and never a heartbeat's replication.
        from agent.shared.replication_wire import ReplicationReport

        f = Fields(body, "heartbeat")
        health = f.doc.get("health")
        replication = f.doc.get("replication")
        return cls(
            host_id=_host_id(f.text("host_id", 36), "heartbeat.host_id"),
            agent_version=f.text("agent_version", 32, pattern=_VERSION),
            health=HealthReport.from_json(health) if health is not None else None,
            queued=f.flag("queued"),
            replication=ReplicationReport.from_json(replication) if replication is not None else None,
        )


@dataclass(frozen=True)
class JobReport:
    """An install, upgrade, push, configure or uninstall job as the agent reports it."""

    kind: str
    state: str
    hostname: str
    job_id: str | None = None
    host_id: str | None = None
    error_id: str | None = None
    remediation: str | None = None
    detail: str | None = None
    runs: str | None = None  # an upgrade job's end: the agent version the machine runs now (a failed move's way back)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "state": self.state,
            "hostname": self.hostname,
            "job_id": self.job_id,
            "host_id": self.host_id,
            "error_id": self.error_id,
            "remediation": self.remediation,
            "detail": self.detail,
            "runs": self.runs,
        }

    @classmethod
    def from_json(cls, body: Any) -> JobReport:
        f = Fields(body, "job")
        job_id, host_id = f.optional_text("job_id", 36), f.optional_text("host_id", 36)
        return cls(
            kind=f.text("kind", 16, choices=JOB_KINDS),
            state=f.text("state", 32, choices=JOB_STATES),
            hostname=hostname(f.text("hostname", 255)),
            job_id=_host_id(job_id, "job.job_id") if job_id is not None else None,
            host_id=_host_id(host_id, "job.host_id") if host_id is not None else None,
            error_id=f.optional_text("error_id", 64, pattern=_ERROR_ID),
            remediation=f.optional_text("remediation", 2000),
            detail=f.optional_text("detail", 4000, lines=True),
            runs=f.optional_text("runs", 64, pattern=_DOTTED),
        )


@dataclass(frozen=True)
class UpdateTarget:
    """The version the server names for a machine: the ``update`` field of a heartbeat answer (absent: none).

    ``job_id`` is the server's upgrade job for this machine (a rollout's or a pin's), under which the machine reports
    its upgrade; ``pinned`` says the machine stays at ``version`` (an operator's pin, or a rollback's)."""

    version: str
    job_id: str | None = None
    pinned: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "job_id": self.job_id, "pinned": self.pinned}

    @classmethod
    def from_json(cls, doc: Any) -> UpdateTarget:
        f = Fields(doc, "update")
        job_id = f.optional_text("job_id", 36)
        return cls(
            version=f.text("version", 32, pattern=_DOTTED),
            job_id=_host_id(job_id, "update.job_id") if job_id is not None else None,
            pinned=f.flag("pinned"),
        )
