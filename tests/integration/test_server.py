"""The configuration server as a real process on loopback with real TLS, and the agent calls against it."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from agent.daemon.status_commands import local_status
from agent.host.paths import Paths
from agent.lifecycle.registration import heartbeat
from scripts.localserver import server_log
from tests.integration.serverproc import (
    ServerProcess,
    agent_cli,
    configure_root,
    error_code,
    fetch_as,
    init_server,
    raw_call,
    sandbox_root,
    secret_file,
    server_cli,
    start_server,
    wait_for,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    s = start_server(tmp_path / "data", heartbeat_interval=2.0)
    yield s
    s.stop()


def test_enrol_heartbeat_machines_and_clone(server: ServerProcess, tmp_path: Path) -> None:
    secret = secret_file(tmp_path / "pass", server.passphrase())
    root = sandbox_root(tmp_path / "m1", "a" * 32)
    code, out = configure_root(server, root, secret)
    assert code == 0, out
    host_id = str(out["host_id"])
    cert = x509.load_pem_x509_certificate((root / "var/lib/mobility/client.pem").read_bytes())
    assert cert.subject.rfc4514_string() == f"CN={host_id}"
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days in (89, 90)
    assert (root / "var/lib/mobility/client.key").stat().st_mode & 0o777 == 0o600
    assert json.loads((root / "var/lib/mobility/tuf/root.json").read_text())["signed"]["_type"] == "root"

    # Re-running is idempotent: same identity, nothing re-enrolled.
    code, again = configure_root(server, root, secret)
    assert (code, again["host_id"], again["already_registered"]) == (0, host_id, True)

    heartbeat(Paths(root), {"status": "healthy", "checks": []})
    # The server writes heartbeats in batches once a second.
    (m,) = wait_for("the heartbeat to be written", lambda: [m for m in server.machines() if m["health"] == "healthy"])
    assert (m["host_id"], m["hostname"], m["os_tag"], m["role"], m["platform"]) == (
        host_id,
        "host-aaaaaa",
        "DEBIAN12",
        "MS",
        "VmWare",
    )
    assert (m["state"], m["health"]) == ("online", "healthy")

    # A copy of the machine with a new machine-id is a clone: a new identity that remembers its origin.
    clone = tmp_path / "clone"
    os.system(f"cp -a {root} {clone}")  # noqa: S605 - a copy as an image tool would make it
    (clone / "etc" / "machine-id").write_text("b" * 32 + "\n")
    code, out = configure_root(server, clone, secret)
    assert code == 0, out
    assert out["host_id"] != host_id and out["cloned_from"] == host_id
    assert {m["host_id"]: m["cloned_from"] for m in server.machines()} == {host_id: None, out["host_id"]: host_id}


def mark(kind: str, host_id: str, point_id: str) -> dict[str, object]:
    """The failover mark as `failover` writes it into a failed-over machine's root (agent/lifecycle/failover.py)."""
    return {"mark": "mobility-failover", "version": 1, "kind": kind, "host_id": host_id, "point_id": point_id}


def test_a_failover_registers_as_a_machine_of_its_own_and_a_test_failover_never_does(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A recovery point of a registered machine, booted (here: a copy of its root, facts and all, as a hypervisor
    that gives the failed-over VM the source's identity would), told by its image that it is a failover: `configure`
    registers it as a new machine failover_of the source, never the source re-keyed; told it is a test failover, it
    refuses to register and the server records nothing."""
    secret = secret_file(tmp_path / "pass", server.passphrase())
    root = sandbox_root(tmp_path / "src", "a" * 32)
    code, out = configure_root(server, root, secret)
    assert code == 0, out
    source = str(out["host_id"])
    point = "0b7f1a52-3c1e-4f57-9a0e-2f1d6c7b8e90"
    before = next(m for m in server.machines() if m["host_id"] == source)

    test = tmp_path / "test"
    os.system(f"cp -a {root} {test}")  # noqa: S605 - the point's image, as failover writes it
    (test / "etc/mobility").mkdir(exist_ok=True)
    (test / "etc/mobility/failover.json").write_text(json.dumps(mark("test", source, point)))
    code, out = configure_root(server, test, secret)
    assert (code, error_code(out)) == (1, "FAILOVER-TEST-SILENT"), out
    assert [m["host_id"] for m in server.machines()] == [source]

    real = tmp_path / "real"
    os.system(f"cp -a {root} {real}")  # noqa: S605
    (real / "etc/mobility").mkdir(exist_ok=True)
    (real / "etc/mobility/failover.json").write_text(json.dumps(mark("failover", source, point)))
    code, out = configure_root(server, real, secret)
    assert code == 0, out
    assert out["host_id"] != source and (out["failover_of"], out["cloned_from"]) == (source, None), out
    machines = {m["host_id"]: m for m in server.machines()}
    assert set(machines) == {source, out["host_id"]}
    made = machines[str(out["host_id"])]
    assert (made["failover_of"], made["failover_point"], made["cloned_from"]) == (source, point, None)
    assert machines[source] == before  # the source's key, certificate and record as they were
    table = server_cli(server.data, "machines", check=True).stdout.splitlines()
    assert table[0].split()[-1] == "FAILOVER_OF"
    assert [line.split()[-1] for line in table if line.startswith(str(out["host_id"]))] == [source]
    # Registered as itself: the agent speaks as that machine now, and says what it is.
    code, again = configure_root(server, real, secret)
    assert (code, again["host_id"], again["already_registered"]) == (0, out["host_id"], True)
    status = local_status(Paths(real))
    assert status["failover"]["registered_as"] == out["host_id"] and status["failover_of"] == source


def test_wrong_passphrase_then_rate_limit(server: ServerProcess, tmp_path: Path) -> None:
    wrong = secret_file(tmp_path / "wrong", "not-the-passphrase")
    root = sandbox_root(tmp_path / "m", "c" * 32)
    codes = []
    for _ in range(7):
        code, out = configure_root(server, root, wrong)
        codes.append((code, error_code(out)))
    assert codes[0] == (1, "ENROL-BAD-PROOF")
    assert codes[-1] == (75, "ENROL-RATE-LIMITED")  # 429: a temporary failure, for a later run after Retry-After
    assert not (root / "var/lib/mobility/identity.json").exists()
    log = server.stop()
    assert log == 0
    stderr = server_log(server.data).read_text()
    assert "enrolment refused from 127.0.0.1" in stderr
    assert "not-the-passphrase" not in stderr


def test_tokens_expire_and_run_out(server: ServerProcess, tmp_path: Path) -> None:
    once = server_cli(server.data, "token", "create", "--ttl", "1h", "--uses", "1", check=True).stdout.strip()
    tok = secret_file(tmp_path / "tok", once)
    assert configure_root(server, sandbox_root(tmp_path / "t1", "d" * 32), tok)[0] == 0
    code, out = configure_root(server, sandbox_root(tmp_path / "t2", "e" * 32), tok)
    assert (code, error_code(out)) == (1, "ENROL-TOKEN-USED-UP")
    short = server_cli(server.data, "token", "create", "--ttl", "1s", check=True).stdout.strip()
    created = time.time()  # it was made before now (the command takes a second to start: measured after it)
    wait_for("the token's second to pass", lambda: time.time() > created + 1.5, every=0.1)
    code, out = configure_root(server, sandbox_root(tmp_path / "t3", "f" * 32), secret_file(tmp_path / "s", short))
    assert (code, error_code(out)) == (1, "ENROL-TOKEN-EXPIRED")


def test_wrong_fingerprint_sends_no_secret(server: ServerProcess, tmp_path: Path) -> None:
    secret = secret_file(tmp_path / "pass", server.passphrase())
    root = sandbox_root(tmp_path / "m", "1" * 32)
    r = agent_cli(
        "configure",
        "--root",
        str(root),
        "-i",
        server.address,
        "-P",
        str(secret),
        "--cs-fingerprint",
        "sha256:" + "0" * 64,
    )
    assert r.returncode == 1
    assert r.stderr.startswith("error SERVER-FINGERPRINT-MISMATCH")
    assert server.machines() == []


def test_api_bad_inputs(server: ServerProcess, tmp_path: Path) -> None:
    assert raw_call(server, "POST", "/v1/enrol", b"{not json")[1]["error"]["code"] == "BAD-REQUEST"  # type: ignore[index]
    status, doc = raw_call(server, "POST", "/v1/enrol", b"x" * 100_000)
    assert (status, error_code(doc)) == (413, "BODY-TOO-LARGE")
    status, doc = raw_call(server, "POST", "/v1/heartbeat", b'{"host_id": "x"}')
    assert (status, error_code(doc)) == (401, "CLIENT-CERT-REQUIRED")
    # A replayed nonce: the first use consumes it, even when the proof was wrong.
    nonce = raw_call(server, "POST", "/v1/enrol/nonce", b"")[1]["nonce"]
    body = {
        "csr": "x",
        "nonce": nonce,
        "proof": "0" * 64,
        "hostname": "h",
        "os_tag": "DEBIAN12",
        "role": "MS",
        "platform": "VmWare",
        "agent_version": "0",
        "facts": {},
    }
    got = raw_call(server, "POST", "/v1/enrol", json.dumps(body).encode())[1]
    assert error_code(got) == "ENROL-BAD-PROOF", got
    assert error_code(raw_call(server, "POST", "/v1/enrol", json.dumps(body).encode())[1]) == "ENROL-NONCE-INVALID"

    # A registered machine cannot heartbeat for another host ID.
    secret = secret_file(tmp_path / "pass", server.passphrase())
    root = sandbox_root(tmp_path / "m", "2" * 32)
    assert configure_root(server, root, secret)[0] == 0
    state = root / "var/lib/mobility"
    status, doc = raw_call(
        server,
        "POST",
        "/v1/heartbeat",
        json.dumps({"host_id": "0f0f0f0f-0000-4000-8000-000000000000", "agent_version": "0.1.0"}).encode(),
        cert=(state / "client.pem", state / "client.key"),
    )
    assert (status, error_code(doc)) == (403, "HOST-ID-MISMATCH")


def test_job_reported_before_registration_with_a_proof(server: ServerProcess, tmp_path: Path) -> None:
    from agent.lifecycle.registration import report_job

    root = sandbox_root(tmp_path / "m", "3" * 32)
    job = {
        "kind": "install",
        "state": "failed",
        "hostname": "host-333333",
        "error_id": "PREREQ-FAILED",
        "remediation": "free space",
        "detail": "PRQ-FREE-SPACE",
    }
    job_id = report_job(Paths(root), job, server.address, server.passphrase(), server.fingerprint)
    (recorded,) = server.jobs()
    assert (recorded["job_id"], recorded["state"], recorded["error_id"]) == (job_id, "failed", "PREREQ-FAILED")


def test_kill_9_loses_no_acknowledged_enrolment(tmp_path: Path) -> None:
    s = start_server(tmp_path / "data")
    secret = secret_file(tmp_path / "pass", s.passphrase())
    code, out = configure_root(s, sandbox_root(tmp_path / "m", "4" * 32), secret)
    assert code == 0
    s.stop(signal.SIGKILL)
    s = start_server(tmp_path / "data")
    try:
        assert [m["host_id"] for m in s.machines()] == [out["host_id"]]
    finally:
        assert s.stop() == 0


def test_an_enrolment_the_server_committed_but_never_answered_is_the_same_machine_when_retried(
    tmp_path: Path,
) -> None:
    """The server records an enrolment, then dies (kill -9) before it answers. The agent kept its key (0600) before
    the CSR left; its next `configure` sends the same key, and the server gives it the machine it recorded: one
    machine, with a certificate that works, and no second row "a clone of" it. The same for a clone's enrolment
    (one new clone, not two) and for a single-use token (its one use is not taken twice)."""
    from tests import faults

    data = tmp_path / "data"
    dying = faults.environment(kill={"enrolment.committed": 1})

    def enrol_killed(root: Path, secret: Path) -> None:
        cert = root / "var/lib/mobility/client.pem"
        before = cert.read_bytes() if cert.exists() else None
        s = start_server(data, heartbeat_interval=2.0, env=dying)
        try:
            code, out = configure_root(s, root, secret)
            assert code != 0, out
            assert s.proc.wait(timeout=30) == -signal.SIGKILL  # killed at the fault point, after its commit
        finally:
            s.stop()
        pending = root / "var/lib/mobility/pending-enrolment.json"
        assert pending.stat().st_mode & 0o777 == 0o600
        assert (cert.read_bytes() if cert.exists() else None) == before  # no answer: nothing of it stored

    s = start_server(data, heartbeat_interval=2.0)
    passphrase, token = s.passphrase(), server_cli(data, "token", "create", "--ttl", "1h", "--uses", "1").stdout
    s.stop()
    secret = secret_file(tmp_path / "pass", passphrase)
    root = sandbox_root(tmp_path / "m", "5" * 32)
    enrol_killed(root, secret)
    assert len(json.loads(server_cli(data, "machines", "--json", check=True).stdout)) == 1  # it did record it

    s = start_server(data, heartbeat_interval=2.0)
    try:
        code, out = configure_root(s, root, secret)
        assert code == 0, out
        host_id = str(out["host_id"])
        assert [(m["host_id"], m["cloned_from"]) for m in s.machines()] == [(host_id, None)]
        assert not (root / "var/lib/mobility/pending-enrolment.json").exists()
        heartbeat(Paths(root), {"status": "healthy", "checks": []})  # its certificate is the machine's
        wait_for("the machine online and healthy", lambda: s.machines()[0]["health"] == "healthy")
    finally:
        s.stop()

    # A clone of it (new machine-id) whose enrolment the server recorded and never answered: one clone.
    clone = tmp_path / "clone"
    os.system(f"cp -a {root} {clone}")  # noqa: S605 - a copy as an image tool would make it
    (clone / "etc" / "machine-id").write_text("6" * 32 + "\n")
    enrol_killed(clone, secret)
    s = start_server(data, heartbeat_interval=2.0)
    try:
        code, cloned = configure_root(s, clone, secret)
        assert code == 0 and cloned["cloned_from"] == host_id and cloned["host_id"] != host_id, cloned
        assert sorted((m["host_id"], m["cloned_from"]) for m in s.machines()) == sorted(
            [(host_id, None), (cloned["host_id"], host_id)]
        )
    finally:
        s.stop()

    # A machine enrolling with a single-use token, the same way: its retry is not refused for the use it took.
    other = sandbox_root(tmp_path / "t", "7" * 32)
    token_file = secret_file(tmp_path / "token", token.strip())
    enrol_killed(other, token_file)
    s = start_server(data, heartbeat_interval=2.0)
    try:
        code, tokened = configure_root(s, other, token_file)
        assert code == 0, tokened
        assert sorted((m["host_id"], m["cloned_from"]) for m in s.machines()) == sorted(
            [(host_id, None), (cloned["host_id"], host_id), (tokened["host_id"], None)]
        )
    finally:
        assert s.stop() == 0


def test_passphrase_rotation_keeps_the_old_one_for_the_grace_period(server: ServerProcess, tmp_path: Path) -> None:
    old = server.passphrase()
    new = server_cli(server.data, "passphrase", "rotate", check=True).stdout.strip()
    assert new != old and server.passphrase() == new
    assert configure_root(server, sandbox_root(tmp_path / "a", "5" * 32), secret_file(tmp_path / "o", old))[0] == 0
    assert configure_root(server, sandbox_root(tmp_path / "b", "6" * 32), secret_file(tmp_path / "n", new))[0] == 0


def test_server_refuses_bad_data_directories(tmp_path: Path) -> None:
    data = tmp_path / "data"
    init_server(data)
    r = server_cli(data, "init")
    assert (r.returncode, r.stderr.split(":")[0]) == (2, "error DATA-DIR-INITIALISED")
    r = server_cli(tmp_path / "empty", "serve")
    assert r.stderr.startswith("error DATA-DIR-NOT-INITIALISED")
    os.chmod(data / "ca" / "ca.key", 0o644)
    r = server_cli(data, "serve", "--listen", "127.0.0.1:0")
    assert (r.returncode, r.stderr.split(":")[0]) == (1, "error DATA-DIR-PERMISSIONS")
    os.chmod(data / "ca" / "ca.key", 0o600)
    key_before = (data / "ca" / "ca.key").read_bytes()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    garbage.chmod(0o600)
    r = server_cli(data, "serve", "--listen", "127.0.0.1:0", "--database", f"sqlite:///{garbage}")
    assert r.stderr.startswith("error DB-CORRUPT"), r.stderr
    assert (data / "ca" / "ca.key").read_bytes() == key_before


def test_port_in_use(server: ServerProcess, tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_server(other)
    r = server_cli(other, "serve", "--listen", f"127.0.0.1:{server.port}")
    assert (r.returncode, r.stderr.split(":")[0]) == (1, "error LISTEN-FAILED")


def test_bad_configure_arguments(tmp_path: Path) -> None:
    root = sandbox_root(tmp_path / "m", "7" * 32)
    loose = tmp_path / "loose"
    loose.write_text("secret\n")
    os.chmod(loose, 0o644)
    r = agent_cli("configure", "--root", str(root), "-i", "127.0.0.1:1", "-P", str(loose))
    assert r.stderr.startswith("error PASSPHRASE-FILE")
    ok = secret_file(tmp_path / "ok", "secret")
    r = agent_cli("configure", "--root", str(root), "-i", "bad host name!", "-P", str(ok))
    assert (r.returncode, r.stderr.split(":")[0]) == (2, "error SERVER-ADDRESS-INVALID")
    r = agent_cli("configure", "--root", str(root), "-i", "127.0.0.1:1", "-P", str(ok))
    assert (r.returncode, r.stderr.split(":")[0]) == (75, "error SERVER-UNREACHABLE")
    r = agent_cli("configure", "--root", str(root), "-i", "127.0.0.1", "-P", str(ok), "-r", "XX")
    assert r.returncode == 2


def test_repo_add_then_agent_fetches_and_verifies_over_mutual_tls(server: ServerProcess, tmp_path: Path) -> None:
    from agent.errors import TufTampered
    from tests.bundle_factory import make_bundle

    bundle = make_bundle(tmp_path / "build", os_tag="DEBIAN12", version="0.1.0")
    r = server_cli(server.data, "repo", "add", str(bundle))
    assert r.returncode == 0, r.stderr
    listing = json.loads(server_cli(server.data, "repo", "list", "--json", check=True).stdout)
    assert [(e["name"], e["os_tag"]) for e in listing] == [(bundle.name, "DEBIAN12")]

    root = sandbox_root(tmp_path / "m", "8" * 32)
    assert configure_root(server, root, secret_file(tmp_path / "pass", server.passphrase()))[0] == 0
    got = fetch_as(server, root, "DEBIAN12", tmp_path / "dl")
    assert got.read_bytes() == bundle.read_bytes()

    # The same bytes changed on the server after signing: the agent refuses them.
    served = server.data / "repository" / bundle.name
    data = bytearray(served.read_bytes())
    data[len(data) // 2] ^= 0xFF
    served.write_bytes(bytes(data))
    with pytest.raises(TufTampered):
        fetch_as(server, root, "DEBIAN12", tmp_path / "dl2")


def test_certificate_renewal_keeps_the_host_id(server: ServerProcess, tmp_path: Path) -> None:
    from agent.lifecycle.identity import new_key_and_csr
    from agent.lifecycle.registration import renew_certificate

    root = sandbox_root(tmp_path / "m", "9" * 32)
    assert configure_root(server, root, secret_file(tmp_path / "pass", server.passphrase()))[0] == 0
    state = root / "var/lib/mobility"
    before = x509.load_pem_x509_certificate((state / "client.pem").read_bytes())
    renew_certificate(Paths(root))
    after = x509.load_pem_x509_certificate((state / "client.pem").read_bytes())
    assert after.subject == before.subject and after.serial_number != before.serial_number
    heartbeat(Paths(root), {"status": "healthy"})  # the new pair works

    _, csr = new_key_and_csr("another-host")
    status, doc = raw_call(
        server,
        "POST",
        "/v1/renew",
        json.dumps({"csr": csr.decode()}).encode(),
        cert=(state / "client.pem", state / "client.key"),
    )
    assert (status, error_code(doc)) == (403, "HOST-ID-MISMATCH")


def test_machine_goes_offline_after_three_missed_heartbeats(tmp_path: Path) -> None:
    s = start_server(tmp_path / "data", heartbeat_interval=3.0)
    try:
        root = sandbox_root(tmp_path / "m", "ab" * 16)
        assert configure_root(s, root, secret_file(tmp_path / "pass", s.passphrase()))[0] == 0
        sent = time.time()
        assert heartbeat(Paths(root), {"status": "warning"})["interval"] == 3.0
        # A machine that never reported lists its health as "unknown" (and offline, it was never seen).
        states = wait_for(
            "the heartbeat's batch to be written", lambda: [m for m in s.machines() if m["health"] != "unknown"]
        )
        if time.time() - sent < 8.0:  # the listing was made within 3 intervals (9 s) of the heartbeat
            assert [(m["state"], m["health"]) for m in states] == [("online", "warning")]
        wait_for("3 missed intervals", lambda: [m["state"] for m in s.machines()] == ["offline"], timeout=30)
        assert time.time() - sent >= 9.0  # not before 3 intervals passed
    finally:
        s.stop()


def test_enrolment_csr_claiming_another_hosts_id(server: ServerProcess, tmp_path: Path) -> None:
    from agent.lifecycle.identity import new_key_and_csr
    from agent.shared import wire

    root = sandbox_root(tmp_path / "m", "ac" * 16)
    code, out = configure_root(server, root, secret_file(tmp_path / "pass", server.passphrase()))
    assert code == 0
    # Another machine asks for a certificate naming the first machine's host ID.
    _, csr = new_key_and_csr(str(out["host_id"]))
    nonce = str(raw_call(server, "POST", wire.NONCE_PATH, b"")[1]["nonce"])
    req = wire.EnrolRequest(
        csr=csr.decode(),
        nonce=nonce,
        proof=wire.enrol_proof(server.passphrase(), nonce, csr),
        hostname="intruder",
        os_tag="DEBIAN12",
        role="MS",
        platform="VmWare",
        facts=wire.MachineFacts(machine_id="f" * 32),
        agent_version="0",
    )
    status, doc = raw_call(server, "POST", wire.ENROL_PATH, json.dumps(req.to_json()).encode())
    assert (status, error_code(doc)) == (403, "HOST-ID-MISMATCH")
    assert [m["hostname"] for m in server.machines()] == ["host-acacac"]


def test_repo_refuses_bad_bundles_and_rescans_without_restart(server: ServerProcess, tmp_path: Path) -> None:
    from tests.bundle_factory import add_member, make_bundle

    bad_name = make_bundle(tmp_path / "b1", os_tag="DEBIAN12", name="mobility-latest.tar.gz")
    r = server_cli(server.data, "repo", "add", str(bad_name))
    assert (r.returncode, r.stderr.split(":")[0]) == (1, "error BUNDLE-REFUSED")
    traversal = make_bundle(tmp_path / "b2", os_tag="DEBIAN11", extra=add_member("../../etc/cron.d/evil"))
    r = server_cli(server.data, "repo", "add", str(traversal))
    assert (r.returncode, r.stderr.split(":")[0]) == (1, "error BUNDLE-REFUSED")
    assert json.loads(server_cli(server.data, "repo", "list", "--json", check=True).stdout) == []

    # An operator drops a bundle in by hand (as the seed asks for Debian 7); rescan publishes it, no restart.
    dropped = make_bundle(server.data / "repository", os_tag="DEBIAN7", version="0.1.0")
    r = server_cli(server.data, "repo", "rescan")
    assert (r.returncode, r.stdout.strip()) == (0, f"added {dropped.name}")
    root = sandbox_root(tmp_path / "m", "ad" * 16, tree="debian7")
    assert configure_root(server, root, secret_file(tmp_path / "pass", server.passphrase()))[0] == 0
    got = fetch_as(server, root, "DEBIAN7", tmp_path / "dl")
    assert got.name == dropped.name


def test_kill_9_loses_no_acknowledged_job(tmp_path: Path) -> None:
    from agent.lifecycle.registration import report_job

    s = start_server(tmp_path / "data")
    root = sandbox_root(tmp_path / "m", "ae" * 16)
    assert configure_root(s, root, secret_file(tmp_path / "pass", s.passphrase()))[0] == 0
    job_id = report_job(Paths(root), {"kind": "install", "state": "succeeded", "hostname": "host-aeaeae"})
    s.stop(signal.SIGKILL)
    s = start_server(tmp_path / "data")
    try:
        assert [(j["job_id"], j["state"]) for j in s.jobs()] == [(job_id, "succeeded")]
    finally:
        s.stop()
