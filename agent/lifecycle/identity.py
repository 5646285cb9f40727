"""This machine's identity: its facts, its key pair and CSR, and the registration stored in the state directory."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.host.paths import Paths
from agent.shared.fsutil import NotSmallRegularFile, atomic_write, read_small_file
from agent.shared.wire import MachineFacts, key_proof_message

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

_NO_MAC = "00:00:00:00:00:00"
MAX_HOSTNAME_FILE = 4096  # a host name is at most 255 bytes
MAX_PENDING_FILE = 64 * 1024  # a key and the machine's facts


def collect_facts(paths: Paths) -> MachineFacts:
    """machine-id of the root; DMI product UUID and the MAC addresses of its network hardware from the root's /sys
    when it has one. Virtual interfaces (veth, bridges, tunnels: no ``device``) come and go with containers and VPNs;
    counting them would make a Docker host a different machine at every boot."""
    machine_id = _read(paths.resolve("/etc/machine-id"))  # read as a chroot would: links stay inside
    sys_dir = paths.resolve("/sys") if paths.root != paths.root.parent else Path("/sys")
    product_uuid = _read(sys_dir / "class" / "dmi" / "id" / "product_uuid").lower()
    macs: list[str] = []
    net = sys_dir / "class" / "net"
    if net.is_dir():
        for iface in sorted(net.iterdir()):
            mac = _read(iface / "address").lower()
            if (iface / "device").exists() and mac and mac != _NO_MAC:
                macs.append(mac)
    return MachineFacts(machine_id, product_uuid, tuple(sorted(set(macs))))


def machine_hostname(paths: Paths) -> str:
    """The machine's name as it reports it: the running system's for /, else the root image's /etc/hostname (read
    as its chroot would, bounded), or this system's when the image has none."""
    import socket

    if paths.root != paths.root.parent:
        with contextlib.suppress(OSError, NotSmallRegularFile, UnicodeDecodeError):
            text = read_small_file(paths.resolve("/etc/hostname"), MAX_HOSTNAME_FILE)[1].decode()
            name = text.split()[0] if text.split() else ""
            if name:
                return name
    return socket.gethostname()


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class Registration:
    """What `configure` stored: who this machine is to which server."""

    host_id: str
    facts: MachineFacts
    server: str
    fingerprint: str
    role: str
    platform: str
    cloned_from: str | None = None
    heartbeat_interval: float = 30.0
    failover_of: str | None = None  # the machine this one is a failover of (registered as itself after a failover)

    def to_json(self) -> dict[str, object]:
        return {
            "host_id": self.host_id,
            "facts": self.facts.to_json(),
            "server": self.server,
            "fingerprint": self.fingerprint,
            "role": self.role,
            "platform": self.platform,
            "cloned_from": self.cloned_from,
            "heartbeat_interval": self.heartbeat_interval,
            "failover_of": self.failover_of,
        }


def load_registration(paths: Paths) -> Registration | None:
    try:
        data = json.loads(paths.identity.read_text())
        return Registration(
            host_id=str(data["host_id"]),
            facts=MachineFacts.from_json(data["facts"]),
            server=str(data["server"]),
            fingerprint=str(data["fingerprint"]),
            role=str(data["role"]),
            platform=str(data["platform"]),
            cloned_from=data.get("cloned_from"),
            heartbeat_interval=float(data.get("heartbeat_interval", 30.0)),
            failover_of=data.get("failover_of"),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or damaged: the machine registers again


def save_registration(paths: Paths, reg: Registration) -> None:
    atomic_write(paths.identity, json.dumps(reg.to_json(), indent=2).encode(), 0o600)


def new_key_and_csr(host_id: str | None) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh P-256 key and a CSR naming ``host_id`` (or "new" for a first enrolment)."""
    # cryptography is imported where keys are made, not with the module: the at-boot no-op of the bootstrapper
    # reads the stored identity only, and the import of cryptography.x509 alone costs it ~50 ms.
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    return key, csr_for(key, host_id)


def csr_for(key: ec.EllipticCurvePrivateKey, host_id: str | None) -> bytes:
    """A CSR signed by ``key`` naming ``host_id`` (or "new" for a first enrolment)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host_id or "new")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def enrolment_key(paths: Paths, facts: MachineFacts) -> ec.EllipticCurvePrivateKey:
    """The key this machine enrols with. An enrolment whose answer never came (the server committed it and died, the
    connection broke, this process was killed) left its key: the retry sends that same key, and the server knows it
    for the same machine instead of recording a second one. A new key is kept (mode 0600, fsynced) before any CSR of
    it leaves the machine. A key kept for other facts (an image copied mid-enrolment) is never reused: clones never
    share a key."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        doc = json.loads(read_small_file(paths.pending_enrolment, MAX_PENDING_FILE)[1])
        kept = serialization.load_pem_private_key(str(doc["key"]).encode(), password=None)
        if isinstance(kept, ec.EllipticCurvePrivateKey) and MachineFacts.from_json(doc["facts"]) == facts:
            return kept
    except (OSError, NotSmallRegularFile, ValueError, KeyError, TypeError, UnsupportedAlgorithm):
        pass  # none, or unreadable: a new one
    key = ec.generate_private_key(ec.SECP256R1())
    doc = {"facts": facts.to_json(), "key": key_pem(key).decode()}
    atomic_write(paths.pending_enrolment, json.dumps(doc).encode(), 0o600)
    return key


def enrolment_answered(paths: Paths) -> None:
    """The enrolment's key and certificate are stored: the pending key is the machine's key now."""
    paths.pending_enrolment.unlink(missing_ok=True)


def load_key(path: Path) -> ec.EllipticCurvePrivateKey | None:
    """This machine's current private key, or None when it has none (or it is unreadable or not EC)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    return key if isinstance(key, ec.EllipticCurvePrivateKey) else None


def key_proof(key: ec.EllipticCurvePrivateKey, nonce: str, csr_pem: bytes) -> str:
    """Proof that this machine holds the key of the identity it re-enrols as (see wire.key_proof_message)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    return key.sign(key_proof_message(nonce, csr_pem), ec.ECDSA(hashes.SHA256())).hex()


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
