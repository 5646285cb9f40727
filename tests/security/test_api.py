"""The configuration server's API as an attacker meets it: a real server on loopback with TLS, real agents.

Each test is one thing an attacker (a holder of the shared passphrase, an enrolled machine, or anyone on the
network) tries; the server must refuse it with a stable error ID, keep every other machine's state as it was,
and keep serving. `test_every_route_has_its_cases` fails when an endpoint is added without cases here."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from agent.errors import RemoteError
from agent.host.paths import Paths
from agent.lifecycle.identity import collect_facts, key_proof, new_key_and_csr
from agent.lifecycle.registration import heartbeat, renew_certificate, report_job
from agent.shared import wire
from scripts.localserver import server_log, start_local_server
from tests.integration.serverproc import (
    ServerProcess,
    configure_root,
    db_execute,
    error_code,
    open_storage,
    raw_call,
    sandbox_root,
    secret_file,
    server_cli,
    start_server,
    wait_for,
)
from tests.postgres import on_postgresql, shared_cluster

pytestmark = pytest.mark.integration

VERSION = "0.1.0"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    s = start_server(tmp_path / "data", heartbeat_interval=2.0)
    yield s
    s.stop()


def machine(server: ServerProcess, host_id: str) -> Any:
    storage = open_storage(server.data)
    try:
        return storage.machine(host_id)
    finally:
        storage.close()


def cert_of(root: Path) -> tuple[Path, Path]:
    state = root / "var" / "lib" / "mobility"
    return state / "client.pem", state / "client.key"


def registered(server: ServerProcess, tmp_path: Path, name: str, machine_id: str, secret: Path | None = None) -> Path:
    root = sandbox_root(tmp_path / name, machine_id)
    code, out = configure_root(server, root, secret or secret_file(tmp_path / f"{name}.pass", server.passphrase()))
    assert code == 0, out
    return root


def host_id_of(root: Path) -> str:
    return str(json.loads((root / "var/lib/mobility/identity.json").read_text())["host_id"])


def enrol(
    server: ServerProcess,
    *,
    facts: wire.MachineFacts,
    host_id: str | None = None,
    signer: ec.EllipticCurvePrivateKey | None = None,
    csr: bytes | None = None,
    hostname: str = "intruder",
    proof: str | None = None,
) -> tuple[int, dict[str, Any]]:
    """An enrolment as a passphrase holder can send it, with whatever it claims."""
    if csr is None:
        _, csr = new_key_and_csr(host_id)
    nonce = str(raw_call(server, "POST", wire.NONCE_PATH, b"")[1]["nonce"])
    req = wire.EnrolRequest(
        csr=csr.decode(),
        nonce=nonce,
        proof=proof if proof is not None else wire.enrol_proof(server.passphrase(), nonce, csr),
        hostname=hostname,
        os_tag="DEBIAN12",
        role="MS",
        platform="VmWare",
        facts=facts,
        agent_version=VERSION,
        host_id=host_id,
        key_proof=key_proof(signer, nonce, csr) if signer is not None else None,
    )
    return raw_call(server, "POST", wire.ENROL_PATH, json.dumps(req.to_json()).encode())


# Identity -------------------------------------------------------------------------------------------------------


def test_passphrase_holder_cannot_take_over_another_machine(server: ServerProcess, tmp_path: Path) -> None:
    victim = registered(server, tmp_path, "victim", "ab" * 16)
    victim_id = host_id_of(victim)
    before = machine(server, victim_id)
    facts = collect_facts(Paths(victim))  # everything the victim would report about itself

    # The victim's facts, no host ID, a fresh key.
    status, out = enrol(server, facts=facts)
    assert status == 200, out
    assert (out["host_id"] != victim_id, out["cloned_from"]) == (True, victim_id)

    # The victim's host ID, a CSR naming it, no proof of its key.
    status, out = enrol(server, facts=facts, host_id=victim_id)
    assert status == 200, out
    assert (out["host_id"] != victim_id, out["cloned_from"]) == (True, victim_id)

    # The victim's host ID with a "proof" signed by a key of the attacker's own.
    attacker_key = ec.generate_private_key(ec.SECP256R1())
    status, out = enrol(server, facts=facts, host_id=victim_id, signer=attacker_key)
    assert status == 200, out
    assert (out["host_id"] != victim_id, out["cloned_from"]) == (True, victim_id)

    after = machine(server, victim_id)
    assert (after.hostname, after.public_key, after.cert_serial) == (
        before.hostname,
        before.public_key,
        before.cert_serial,
    )
    heartbeat(Paths(victim), {"status": "healthy", "checks": []})  # the victim's own certificate still works


def test_a_machine_that_proves_its_key_keeps_its_identity(server: ServerProcess, tmp_path: Path) -> None:
    root = registered(server, tmp_path, "m", "ac" * 16)
    host_id = host_id_of(root)
    old_key = machine(server, host_id).public_key
    cert_of(root)[0].unlink()  # lost its certificate, still has its key and identity
    code, out = configure_root(server, root, secret_file(tmp_path / "again", server.passphrase()))
    assert (code, out["host_id"], out["cloned_from"]) == (0, host_id, None)
    assert machine(server, host_id).public_key != old_key  # re-keyed: the new key is the one to prove next time


def test_a_csr_naming_a_host_without_the_request_doing_so(server: ServerProcess, tmp_path: Path) -> None:
    victim_id = host_id_of(registered(server, tmp_path, "v", "ad" * 16))
    _, csr = new_key_and_csr(victim_id)
    status, doc = enrol(server, facts=wire.MachineFacts(machine_id="f" * 32), csr=csr)
    assert (status, error_code(doc)) == (403, "HOST-ID-MISMATCH")


# Jobs -----------------------------------------------------------------------------------------------------------


def job(**extra: Any) -> dict[str, Any]:
    return {"kind": "install", "state": "succeeded", "hostname": "h1", **extra}


def test_a_machine_cannot_write_another_machines_job(server: ServerProcess, tmp_path: Path) -> None:
    a = registered(server, tmp_path, "a", "a1" * 16)
    b = registered(server, tmp_path, "b", "b1" * 16)
    job_id = report_job(Paths(a), job(state="failed", error_id="PREREQ-FAILED"))
    status, doc = raw_call(server, "POST", wire.JOBS_PATH, json.dumps(job(job_id=job_id)).encode(), cert=cert_of(b))
    assert (status, error_code(doc)) == (403, "JOB-NOT-OWNED")
    # Without a certificate, a passphrase holder can neither take it nor name a host.
    nobody = Paths(tmp_path / "nobody")
    with pytest.raises(RemoteError) as refused:
        report_job(nobody, job(job_id=job_id), server.address, server.passphrase(), server.fingerprint)
    assert refused.value.id == "JOB-NOT-OWNED"
    with pytest.raises(RemoteError) as refused:
        report_job(
            Paths(tmp_path / "nobody2"),
            job(host_id=host_id_of(a)),
            server.address,
            server.passphrase(),
            server.fingerprint,
        )
    assert refused.value.id == "HOST-ID-MISMATCH"
    (recorded,) = [j for j in server.jobs() if j["job_id"] == job_id]
    assert (recorded["host_id"], recorded["state"], recorded["error_id"]) == (host_id_of(a), "failed", "PREREQ-FAILED")


def test_a_push_job_belongs_to_the_host_that_enrolled_with_its_token(server: ServerProcess, tmp_path: Path) -> None:
    token = server_cli(server.data, "token", "create", "--ttl", "1h", "--uses", "1", check=True).stdout.strip()
    token_id = wire.split_token(token)[0]  # type: ignore[index]
    storage = open_storage(server.data)
    try:  # what `mobility-server push` does: the job first, bound to the token it hands the host
        push_job = storage.record_job(
            job_id=None,
            host_id=None,
            hostname="10.0.0.9:22",
            kind="push",
            state="running",
            error_id=None,
            remediation=None,
            detail=None,
            now=0.0,
            owner=f"token:{token_id}",
        )
    finally:
        storage.close()
    pushed = registered(server, tmp_path, "pushed", "c1" * 16, secret_file(tmp_path / "tok", token))
    other = registered(server, tmp_path, "other", "c2" * 16)
    status, doc = raw_call(
        server, "POST", wire.JOBS_PATH, json.dumps(job(job_id=push_job, kind="push")).encode(), cert=cert_of(other)
    )
    assert (status, error_code(doc)) == (403, "JOB-NOT-OWNED")
    assert report_job(Paths(pushed), job(job_id=push_job, kind="push")) == push_job
    (recorded,) = [j for j in server.jobs() if j["job_id"] == push_job]
    assert (recorded["host_id"], recorded["state"]) == (host_id_of(pushed), "succeeded")


# Every field of every request is validated at the edge -----------------------------------------------------------

BAD_HEALTH: list[Any] = [
    [1, 2],
    "healthy",
    {"status": "fine"},
    {"status": "healthy", "checks": [{"id": "x"}]},
    {"status": "healthy", "checks": "none"},
    {"status": "healthy", "checks": [{"id": "HLT-RSS", "status": "PASS", "message": "\x1b[2J"}]},
    {"status": "healthy", "checks": [{"id": "HLT-RSS", "status": "PASS", "message": "m" * 5000}]},
    {"status": "healthy", "checks": [{"id": "HLT-RSS", "status": "PASS", "message": "m"}] * 1000},
    {"status": "healthy", "time": float("inf")},
]


def test_poisoned_heartbeats_are_refused_and_the_cli_keeps_working(server: ServerProcess, tmp_path: Path) -> None:
    root = registered(server, tmp_path, "m", "d1" * 16)
    host_id = host_id_of(root)
    for health in BAD_HEALTH:
        body = json.dumps({"host_id": host_id, "agent_version": VERSION, "health": health}).encode()
        status, doc = raw_call(server, "POST", wire.HEARTBEAT_PATH, body, cert=cert_of(root))
        assert (status, error_code(doc)) == (400, "BAD-REQUEST"), health
    for body in (
        {"host_id": host_id, "agent_version": ["0.1"]},
        {"host_id": host_id, "agent_version": VERSION, "queued": "yes"},
        {"host_id": 7, "agent_version": VERSION},
        [host_id],
    ):
        status, doc = raw_call(server, "POST", wire.HEARTBEAT_PATH, json.dumps(body).encode(), cert=cert_of(root))
        assert (status, error_code(doc)) == (400, "BAD-REQUEST"), body

    # A poisoned row as an older server stored it: the readers stay up.
    db_execute(
        server.data, "UPDATE machines SET health = '[1, 2]', facts = '{\"macs\": 5}' WHERE host_id = :h", {"h": host_id}
    )
    text = server_cli(server.data, "machines")
    assert text.returncode == 0 and host_id in text.stdout, text.stderr
    (row,) = json.loads(server_cli(server.data, "machines", "--json", check=True).stdout)
    assert (row["health"], row["health_report"]) == ("unknown", None)


def test_client_strings_never_reach_a_terminal_or_log_raw(server: ServerProcess, tmp_path: Path) -> None:
    root = registered(server, tmp_path, "m", "e2" * 16)
    facts = wire.MachineFacts(machine_id="e1" * 16)
    for name in ("evil\x1b[31mred", "two\nlines", "tab\there", "", "x" * 300):
        status, doc = enrol(server, facts=facts, hostname=name)
        assert (status, error_code(doc)) == (400, "BAD-REQUEST"), repr(name)
    # A hostname stored raw by an older server is printed escaped.
    forged = "pwn\x1b]0;owned\x07\nfake line"
    db_execute(
        server.data, "UPDATE machines SET hostname = :n WHERE host_id = :h", {"n": forged, "h": host_id_of(root)}
    )
    out = server_cli(server.data, "machines").stdout
    assert "\x1b" not in out and "\x07" not in out and "\\x1b" in out
    assert len(out.strip().splitlines()) == 2  # header and one machine: no forged line
    server.stop()
    log = server_log(server.data).read_text()
    assert "\x1b" not in log and "two\nlines" not in log


def test_deep_nesting_wrong_methods_and_odd_bodies_get_json_errors(server: ServerProcess) -> None:
    for path in (wire.ENROL_PATH, wire.JOBS_PATH):
        headers = {"X-Mobility-Nonce": "n", "X-Mobility-Proof": "p"}
        status, doc = raw_call(server, "POST", path, b"[" * 60_000, headers=headers)
        assert status in (400, 401) and isinstance(error_code(doc), str), (path, status, doc)
    status, doc = raw_call(server, "POST", wire.ENROL_PATH, b"[" * 60_000)
    assert (status, error_code(doc)) == (400, "BAD-REQUEST")
    for method, path in (
        ("GET", wire.ENROL_PATH),
        ("PUT", wire.HEARTBEAT_PATH),
        ("DELETE", wire.JOBS_PATH),
        ("POST", f"{wire.API}/ca"),
        ("POST", f"{wire.REPO_METADATA_PATH}/root.json"),
    ):
        status, doc = raw_call(server, method, path, b"{}")
        assert (status, error_code(doc)) == (405, "METHOD-NOT-ALLOWED"), (method, path)
    status, doc = raw_call(server, "GET", "/v1/nope", b"")
    assert (status, error_code(doc)) == (404, "NOT-FOUND")
    assert raw_call(server, "GET", f"{wire.API}/health", b"")[0] == 200  # still serving


def test_malformed_proofs_count_against_the_address(server: ServerProcess) -> None:
    facts = wire.MachineFacts(machine_id="f1" * 16)
    codes = [error_code(enrol(server, facts=facts, proof="é" * 64)[1]) for _ in range(5)]
    assert codes == ["BAD-REQUEST"] * 5
    status, doc = raw_call(server, "POST", wire.NONCE_PATH, b"")
    assert (status, error_code(doc)) == (429, "ENROL-RATE-LIMITED")


# Certificates ----------------------------------------------------------------------------------------------------


def _tampered(csr_pem: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature: the structure still parses, the signature is wrong
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


def _rsa_csr(common_name: str) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def test_renewal_checks_the_csr_as_enrolment_does(server: ServerProcess, tmp_path: Path) -> None:
    root = registered(server, tmp_path, "m", "aa" * 16)
    host_id = host_id_of(root)
    serial = machine(server, host_id).cert_serial
    _, good = new_key_and_csr(host_id)
    for csr in (_tampered(good), _rsa_csr(host_id), b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END"):
        status, doc = raw_call(
            server, "POST", wire.RENEW_PATH, json.dumps({"csr": csr.decode()}).encode(), cert=cert_of(root)
        )
        assert (status, error_code(doc)) == (400, "CSR-INVALID"), csr[:60]
    for body in ({"csr": 5}, {}, [1]):
        status, doc = raw_call(server, "POST", wire.RENEW_PATH, json.dumps(body).encode(), cert=cert_of(root))
        assert (status, error_code(doc)) == (400, "BAD-REQUEST")
    assert machine(server, host_id).cert_serial == serial  # nothing was issued
    for csr in (_tampered(good), _rsa_csr("new")):
        status, doc = enrol(server, facts=wire.MachineFacts(machine_id="ab" * 16), csr=csr)
        assert (status, error_code(doc)) == (400, "CSR-INVALID")


# The server's own disk and database ------------------------------------------------------------------------------


def test_a_deleted_database_is_not_silently_replaced(tmp_path: Path) -> None:
    s = start_server(tmp_path / "data")
    s.stop()
    if on_postgresql():  # the database is dropped and made again, empty
        name = (s.data / "database.url").read_text().strip().rsplit("/", 1)[1]
        shared_cluster().sql(f"DROP DATABASE {name}")
        shared_cluster().sql(f"CREATE DATABASE {name} OWNER mobility")
    for name in ("mobility.db", "mobility.db-wal", "mobility.db-shm"):
        (s.data / name).unlink(missing_ok=True)
    r = server_cli(s.data, "serve", "--listen", "127.0.0.1:0")
    assert (r.returncode, r.stderr.split(":")[0]) == (1, "error DB-MISSING")
    for args in (("machines",), ("jobs",), ("token", "create", "--ttl", "1h")):
        r = server_cli(s.data, *args)
        assert (r.returncode, r.stderr.split(":")[0]) == (1, "error DB-MISSING"), args
    assert not (s.data / "mobility.db").exists()
    proc, _, _ = start_local_server(s.data, "--new-database")  # told to: starts empty, still private
    try:
        if not on_postgresql():
            assert (s.data / "mobility.db").stat().st_mode & 0o777 == 0o600
        assert server_cli(s.data, "machines", "--json", check=True).stdout.strip() == "[]"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_every_route_has_its_cases() -> None:
    """A new endpoint must get its cases in this suite: add it here once it has them."""
    from server.api.app import build_app

    covered = {
        ("GET", f"{wire.API}/health"),  # test_deep_nesting_wrong_methods_and_odd_bodies_get_json_errors
        ("GET", f"{wire.API}/ca"),  # public by design (agents pin its fingerprint); wrong methods above
        ("POST", wire.NONCE_PATH),  # rate limited with enrolment: test_malformed_proofs_count_against_the_address
        ("POST", wire.ENROL_PATH),  # identity, CSR, strings, nesting, proofs
        ("POST", wire.RENEW_PATH),  # test_renewal_checks_the_csr_as_enrolment_does
        ("POST", wire.HEARTBEAT_PATH),  # test_poisoned_heartbeats_are_refused_and_the_cli_keeps_working
        ("POST", wire.JOBS_PATH),  # the two job tests
        ("GET", wire.REPO_METADATA_PATH + "/{name}"),  # tests/server/releases/test_repository.py: names, traversal
        ("GET", wire.REPO_TARGETS_PATH + "/{name}"),  # tests/server/releases/test_repository.py: only published names
    }

    class _Nothing:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError("routes are only listed here")

    app = build_app(_Nothing())  # type: ignore[arg-type]
    routes = {
        (r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD" and r.resource is not None
    }
    assert routes == covered, f"routes without security cases: {routes - covered}; stale: {covered - routes}"


def test_unknown_host_ids_and_uuid_forms(server: ServerProcess, tmp_path: Path) -> None:
    root = registered(server, tmp_path, "m", "bb" * 16)
    for claimed in (host_id_of(root).upper(), "../../etc", str(uuid.uuid4()) + "x"):
        body = json.dumps({"host_id": claimed, "agent_version": VERSION}).encode()
        status, doc = raw_call(server, "POST", wire.HEARTBEAT_PATH, body, cert=cert_of(root))
        assert (status, error_code(doc)) == (400, "BAD-REQUEST"), claimed


def test_a_certificate_of_a_machine_the_server_no_longer_knows(server: ServerProcess, tmp_path: Path) -> None:
    """A valid client certificate is not enough: the host must still be in the database (removed by hand here)."""
    root = registered(server, tmp_path, "gone", "cd" * 16)
    host_id = host_id_of(root)
    db_execute(server.data, "DELETE FROM machines WHERE host_id = :h", {"h": host_id})
    body = json.dumps({"host_id": host_id, "agent_version": VERSION}).encode()
    status, doc = raw_call(server, "POST", wire.HEARTBEAT_PATH, body, cert=cert_of(root))
    assert (status, error_code(doc)) == (404, "MACHINE-UNKNOWN")


# Revocation ------------------------------------------------------------------------------------------------------


def _calls_with(server: ServerProcess, cert: tuple[Path, Path], host_id: str) -> dict[str, tuple[int, object]]:
    """Every call that takes a certificate, made with ``cert``: its status and error ID."""
    _, csr = new_key_and_csr(host_id)
    calls = {
        "heartbeat": (wire.HEARTBEAT_PATH, {"host_id": host_id, "agent_version": VERSION}),
        "jobs": (wire.JOBS_PATH, job()),
        "renew": (wire.RENEW_PATH, {"csr": csr.decode()}),
    }
    out = {}
    for name, (path, body) in calls.items():
        status, doc = raw_call(server, "POST", path, json.dumps(body).encode(), cert=cert)
        out[name] = (status, error_code(doc) if status >= 400 else "ok")
    return out


def test_superseded_revoked_and_removed_certificates_are_refused_everywhere(
    server: ServerProcess, tmp_path: Path
) -> None:
    root = registered(server, tmp_path, "m", "9a" * 16)
    host_id = host_id_of(root)
    stale = tmp_path / "stale"  # what a copy of the disk (or a thief) keeps: the certificate before the renewal
    stale.mkdir()
    old = (stale / "client.pem", stale / "client.key")
    for src, dst in zip(cert_of(root), old, strict=True):
        dst.write_bytes(src.read_bytes())
    renew_certificate(Paths(root))
    heartbeat(Paths(root), {"status": "healthy", "checks": []})  # the new certificate's first use: now the current
    assert set(_calls_with(server, old, host_id).values()) == {(403, "CERT-SUPERSEDED")}

    r = server_cli(server.data, "machines", "revoke", host_id)
    assert r.returncode == 0, r.stderr
    assert set(_calls_with(server, cert_of(root), host_id).values()) == {(403, "CERT-REVOKED")}
    (row,) = [m for m in server.machines() if m["host_id"] == host_id]
    assert (row["revoked"], row["state"]) == (True, "revoked")
    # Its key no longer proves the identity: enrolling again makes a new machine.
    cert_of(root)[0].unlink()
    code, out = configure_root(server, root, secret_file(tmp_path / "again", server.passphrase()))
    assert code == 0 and out["host_id"] != host_id and out["cloned_from"] is None, out

    other = registered(server, tmp_path, "o", "9b" * 16)
    r = server_cli(server.data, "machines", "remove", host_id_of(other))
    assert r.returncode == 0, r.stderr
    assert set(_calls_with(server, cert_of(other), host_id_of(other)).values()) == {(404, "MACHINE-UNKNOWN")}
    for action in ("remove", "revoke"):
        r = server_cli(server.data, "machines", action, host_id_of(other))
        assert (r.returncode, r.stderr.split(":")[0]) == (2, "error MACHINE-NOT-FOUND"), r.stderr
    r = server_cli(server.data, "machines", "revoke")
    assert (r.returncode, r.stderr.split(":")[0]) == (2, "error USAGE"), r.stderr


def test_queued_reports_are_history_never_the_current_state(server: ServerProcess, tmp_path: Path) -> None:
    """After an outage the daemon sends its current report, then its backlog (queued: true). The backlog's stale
    "server unreachable" reports must not replace the current one."""
    root = registered(server, tmp_path, "m", "9c" * 16)
    host_id = host_id_of(root)
    heartbeat(Paths(root), {"status": "healthy", "checks": []})
    stale = {"status": "warning", "time": 1_700_000_000.0, "checks": []}
    for _ in range(3):
        body = json.dumps({"host_id": host_id, "agent_version": VERSION, "health": stale, "queued": True}).encode()
        assert raw_call(server, "POST", wire.HEARTBEAT_PATH, body, cert=cert_of(root))[0] == 200

    def history() -> list[Any]:
        storage = open_storage(server.data)
        try:
            return storage.history(host_id)
        finally:
            storage.close()

    kept = wait_for("the queued reports in the history", lambda: len(history()) == 3 and history())
    assert [(when, report.status) for when, _, report in kept] == [(1_700_000_000.0, "warning")] * 3
    (row,) = [m for m in server.machines() if m["host_id"] == host_id]
    assert (row["health"], row["state"]) == ("healthy", "online")
