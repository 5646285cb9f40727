"""Registration (`configure`): pin the server, prove the passphrase, get a certificate; and the calls after it."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent import __version__
from agent.errors import FailoverTestSilent, FingerprintMismatch, NotRegistered, RemoteBusy
from agent.host.paths import Paths
from agent.lifecycle.api_client import Client, ca_fingerprint, fetch_pinned_ca
from agent.lifecycle.backoff import with_backoff
from agent.lifecycle.failover import Failover, registered, speaks_as_source
from agent.lifecycle.identity import (
    Registration,
    collect_facts,
    csr_for,
    enrolment_answered,
    enrolment_key,
    key_pem,
    key_proof,
    load_key,
    load_registration,
    machine_hostname,
    new_key_and_csr,
    save_registration,
)
from agent.shared import wire
from agent.shared.address import ServerAddress, parse_address
from agent.shared.fsutil import atomic_write

log = logging.getLogger("mobility.registration")


@dataclass(frozen=True)
class Enrolled:
    registration: Registration
    reused: bool  # nothing to do: already registered with this server, same machine


def trusted_ca(paths: Paths, server: ServerAddress, pinned: str | None) -> tuple[bytes, str]:
    """The server CA to trust: a stored one is enforced; otherwise fetched and pinned (or trusted on first use)."""
    stored = paths.server_ca.read_bytes() if paths.server_ca.exists() else None
    if stored is not None:
        fp = ca_fingerprint(stored)
        if pinned is not None and pinned != fp:
            raise FingerprintMismatch(f"--cs-fingerprint {pinned} differs from the stored server CA {fp}")
        return stored, fp
    ca = fetch_pinned_ca(server, pinned)
    atomic_write(paths.server_ca, ca)
    return ca, ca_fingerprint(ca)


def configure(
    paths: Paths,
    server_text: str,
    secret: str,
    pinned: str | None,
    role: str,
    platform: str,
    os_tag: str,
    *,
    retry_for: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
    failover: Failover | None = None,
) -> Enrolled:
    """Register this machine (idempotent: a registered machine with unchanged facts is left as it is). A busy
    server (503) is waited out with jittered backoff for ``retry_for`` seconds. The key is kept before its CSR is
    sent and used again until an answer is stored (``enrolment_key``), so an enrolment retried after its answer was
    lost (in this call, or by the next `configure` after the server died between its commit and its answer) is
    recognised by the server as the same machine. A real ``failover`` that still holds the source's registration
    registers as a machine of its own, whatever its facts, naming its point and proving the source's key (the
    server records it ``failover_of`` the source); a test failover never registers (FailoverTestSilent)."""
    server = parse_address(server_text)
    facts = collect_facts(paths)
    previous = load_registration(paths)
    if failover is not None and failover.test:
        raise FailoverTestSilent(f"this machine is {failover.describe()}: a test failover never registers")
    leaving = previous is not None and speaks_as_source(failover, previous.host_id)
    if (
        not leaving
        and previous is not None
        and previous.server == str(server)
        and previous.facts == facts
        and paths.client_cert.exists()
        and paths.client_key.exists()
    ):
        return Enrolled(previous, reused=True)
    ca, fingerprint = trusted_ca(paths, server, pinned)
    host_id = previous.host_id if previous is not None else None
    if leaving and failover is not None:
        log.warning("this machine is %s: registering it as a machine of its own", failover.describe())
    elif previous is not None and previous.facts != facts:
        log.warning("machine facts changed since registration as %s: enrolling as a clone", previous.host_id)
    current_key = load_key(paths.client_key) if host_id is not None else None
    key = enrolment_key(paths, facts)
    csr = csr_for(key, host_id)
    client = Client(server, ca)
    token = wire.split_token(secret)

    def enrol() -> dict[str, Any]:
        nonce = str(client.call("POST", wire.NONCE_PATH)["nonce"])
        req = wire.EnrolRequest(
            csr=csr.decode(),
            nonce=nonce,
            proof=wire.enrol_proof(token[1] if token else secret, nonce, csr),
            hostname=machine_hostname(paths),
            os_tag=os_tag,
            role=role,
            platform=platform,
            facts=facts,
            agent_version=__version__,
            token_id=token[0] if token else None,
            host_id=host_id,
            key_proof=key_proof(current_key, nonce, csr) if current_key is not None else None,
            failover_point=failover.point_id if leaving and failover is not None else None,
        )
        return client.call("POST", wire.ENROL_PATH, req.to_json())

    try:
        answer = with_backoff("enrolling", enrol, retry_for, sleep, retried=(RemoteBusy,))
    finally:
        client.close()
    # Key first, then certificate: a crash between them leaves a mismatched pair that `configure` replaces.
    atomic_write(paths.client_key, key_pem(key), 0o600)
    atomic_write(paths.client_cert, str(answer["certificate"]).encode())
    atomic_write(paths.tuf_dir / "root.json", str(answer["tuf_root"]).encode())
    reg = Registration(
        host_id=str(answer["host_id"]),
        facts=facts,
        server=str(server),
        fingerprint=fingerprint,
        role=role,
        platform=platform,
        cloned_from=answer.get("cloned_from"),
        heartbeat_interval=float(answer.get("heartbeat_interval", 30.0)),
        failover_of=answer.get("failover_of"),
    )
    save_registration(paths, reg)
    enrolment_answered(paths)
    if leaving and failover is not None:
        registered(paths, failover, reg.host_id)
        if reg.failover_of is None:
            log.warning(
                "registered as %s, but not as a failover of %s: the server could not verify this machine holds its "
                "key (a certificate renewed after the point?); it is recorded as a clone of it",
                reg.host_id,
                failover.source_host,
            )
    return Enrolled(reg, reused=False)


def authenticated_client(paths: Paths, timeout: float = 15.0) -> tuple[Registration, Client]:
    reg = load_registration(paths)
    if reg is None or not paths.client_cert.exists():
        raise NotRegistered("this machine is not registered with a configuration server")
    client = Client(
        parse_address(reg.server), paths.server_ca.read_bytes(), (paths.client_cert, paths.client_key), timeout=timeout
    )
    return reg, client


def heartbeat(paths: Paths, health: dict[str, Any]) -> dict[str, Any]:
    """One heartbeat with a health report; the answer carries the interval the server wants."""
    reg, client = authenticated_client(paths)
    try:
        return client.call(
            "POST", wire.HEARTBEAT_PATH, {"host_id": reg.host_id, "agent_version": __version__, "health": health}
        )
    finally:
        client.close()


def report_job(
    paths: Paths,
    job: dict[str, Any],
    server_text: str | None = None,
    secret: str | None = None,
    pinned: str | None = None,
) -> str:
    """Report a job: over mutual TLS when registered, else with a proof of the secret (a failed install). A
    registered machine that was handed a token proves it too: a push job belongs to the token its push gave."""
    body = json.dumps(job).encode()
    token = wire.split_token(secret) if secret else None
    if paths.client_cert.exists() and load_registration(paths) is not None:
        _, client = authenticated_client(paths)
        try:
            headers = _proof_headers(client, body, token[1], token[0]) if token else None
            return str(client.call("POST", wire.JOBS_PATH, raw_body=body, headers=headers)["job_id"])
        finally:
            client.close()
    if server_text is None or secret is None:
        raise NotRegistered("cannot report the job: not registered and no passphrase given")
    server = parse_address(server_text)
    ca, _ = trusted_ca(paths, server, pinned)
    client = Client(server, ca)
    try:
        headers = _proof_headers(client, body, token[1] if token else secret, token[0] if token else None)
        return str(client.call("POST", wire.JOBS_PATH, raw_body=body, headers=headers)["job_id"])
    finally:
        client.close()


def _proof_headers(client: Client, body: bytes, secret: str, token_id: str | None) -> dict[str, str]:
    """A one-time nonce and the proof of the secret over the job report (the secret itself never travels)."""
    nonce = str(client.call("POST", wire.NONCE_PATH)["nonce"])
    headers = {"X-Mobility-Nonce": nonce, "X-Mobility-Proof": wire.job_proof(secret, nonce, body)}
    if token_id is not None:
        headers["X-Mobility-Token-Id"] = token_id
    return headers


def renew_certificate(paths: Paths) -> None:
    """A new certificate for the same host ID and a new key, over mutual TLS with the current one."""
    reg, client = authenticated_client(paths)
    key, csr = new_key_and_csr(reg.host_id)
    try:
        answer = client.call("POST", wire.RENEW_PATH, {"csr": csr.decode()})
    finally:
        client.close()
    # The old pair stays valid until it expires: writing the key first never locks the machine out for long,
    # and the next renewal (or `configure`) repairs a crash between the two writes.
    atomic_write(paths.client_key, key_pem(key), 0o600)
    atomic_write(paths.client_cert, str(answer["certificate"]).encode())
