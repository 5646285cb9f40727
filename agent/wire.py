"""The agent-server wire format: API paths, the enrolment proof, and the JSON bodies. Both sides import
this module (the server may import the agent's wire formats; the agent never imports the server)."""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import asdict, dataclass, field
from typing import Any

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

_PROOF_CONTEXT = b"mobility-enrol-proof-v1\0"
TOKEN_RE = re.compile(r"^mbt_([A-Za-z0-9]{12})_([A-Za-z0-9_-]{20,})$")


def enrol_proof(secret: str, nonce: str, csr_pem: bytes) -> str:
    """HMAC-SHA256 keyed by the passphrase or token secret over the nonce and the CSR: the secret itself
    never crosses the wire, and a proof is useless for any other CSR or nonce."""
    msg = _PROOF_CONTEXT + nonce.encode() + b"\0" + hashlib.sha256(csr_pem).digest()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def job_proof(secret: str, nonce: str, body: bytes) -> str:
    """The same proof over a job report, for an agent that holds no certificate yet (a failed install)."""
    msg = b"mobility-job-proof-v1\0" + nonce.encode() + b"\0" + hashlib.sha256(body).digest()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def split_token(secret: str) -> tuple[str, str] | None:
    """A token ``mbt_<id>_<secret>`` as (id, secret); None for a passphrase."""
    m = TOKEN_RE.match(secret.strip())
    return (m.group(1), m.group(2)) if m else None


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
        if not isinstance(data, dict):
            raise ValueError("facts must be an object")
        macs = data.get("macs", [])
        if not isinstance(macs, list) or not all(isinstance(m, str) for m in macs):
            raise ValueError("facts.macs must be a list of strings")
        return cls(str(data.get("machine_id", "")), str(data.get("product_uuid", "")), tuple(sorted(macs)))

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
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["facts"] = self.facts.to_json()
        return d
