"""Two `mobility-server serve` instances on one PostgreSQL database and one data directory, behind a TCP
round-robin load balancer (tests/integration/tcpproxy.py, TLS passed through): the agents see one server.
Enrolment, heartbeats and renewal go through the balancer; a nonce from one instance is good at the other (once);
the failure count is shared; kill -9 of one instance in the middle of a burst leaves the other serving."""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.host.paths import Paths
from agent.lifecycle.identity import new_key_and_csr
from agent.lifecycle.registration import heartbeat, renew_certificate
from agent.shared import wire
from agent.shared.errors import MobilityError
from scripts.localserver import init_local_server, start_local_server
from tests.conftest import REPO, require_root
from tests.integration.serverproc import (
    ServerProcess,
    configure_root,
    error_code,
    open_storage,
    raw_call,
    sandbox_root,
    secret_file,
    wait_for,
)
from tests.postgres import shared_cluster

pytestmark = pytest.mark.integration


@dataclass
class Fleet:
    instances: list[ServerProcess]
    balancer: ServerProcess  # its port is the balancer's; what the agents are configured with
    proxy: subprocess.Popen[str]


def start_proxy(backends: list[str]) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.tcpproxy", "127.0.0.1:0", *backends, "--for", "900"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    m = re.search(r"listening on \S+:(\d+)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"the balancer did not start: {line!r}")
    return proc, int(m.group(1))


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    require_root()
    data = tmp_path / "data"
    out = init_local_server(data, database=shared_cluster().new_database())
    fingerprint = re.search(r"fingerprint: (sha256:[0-9a-f]{64})", out).group(1)  # type: ignore[union-attr]
    procs: list[subprocess.Popen[str]] = []
    try:
        instances = []
        for _ in range(2):
            proc, address, _ = start_local_server(data, "--heartbeat-interval", "2")
            procs.append(proc)
            instances.append(ServerProcess(data, proc, int(address.rsplit(":", 1)[1]), fingerprint))
        proxy, port = start_proxy([s.address for s in instances])
        procs.append(proxy)
        yield Fleet(instances, ServerProcess(data, instances[0].proc, port, fingerprint), proxy)
    finally:
        for proc in procs:
            stop(proc)


def enrol_body(server: ServerProcess, nonce: str, machine_id: str) -> bytes:
    _, csr = new_key_and_csr(None)
    req = wire.EnrolRequest(
        csr=csr.decode(),
        nonce=nonce,
        proof=wire.enrol_proof(server.passphrase(), nonce, csr),
        hostname=f"h-{machine_id[:6]}",
        os_tag="DEBIAN12",
        role="MS",
        platform="VmWare",
        facts=wire.MachineFacts(machine_id=machine_id),
        agent_version="0.1.0",
    )
    return json.dumps(req.to_json()).encode()


def cert_of(root: Path) -> tuple[Path, Path]:
    return root / "var/lib/mobility/client.pem", root / "var/lib/mobility/client.key"


def test_two_instances_serve_one_fleet(fleet: Fleet, tmp_path: Path) -> None:
    a, b = fleet.instances
    lb = fleet.balancer
    # A nonce issued by one instance is good at the other, once.
    nonce = str(raw_call(a, "POST", wire.NONCE_PATH, b"")[1]["nonce"])
    status, doc = raw_call(b, "POST", wire.ENROL_PATH, enrol_body(b, nonce, "0a" * 16))
    assert status == 200, doc
    status, doc = raw_call(a, "POST", wire.ENROL_PATH, enrol_body(a, nonce, "0b" * 16))
    assert (status, error_code(doc)) == (401, "ENROL-NONCE-INVALID")
    # The failure count is the database's: the replay above and failed proofs at either instance add up.
    for instance in (b, a, b):
        nonce = str(raw_call(instance, "POST", wire.NONCE_PATH, b"")[1]["nonce"])
        body = json.loads(enrol_body(instance, nonce, "ee" * 16))
        body["proof"] = "0" * 64
        status, doc = raw_call(instance, "POST", wire.ENROL_PATH, json.dumps(body).encode())
        assert (status, error_code(doc)) == (401, "ENROL-BAD-PROOF")
    storage = open_storage(a.data)
    try:
        assert storage.failures("127.0.0.1", time.time() - 60)[0] == 4
    finally:
        storage.close()

    # Enrolment and heartbeats through the balancer (each call a new connection: both instances take turns).
    secret = secret_file(tmp_path / "pass", lb.passphrase())
    roots = []
    for i in range(6):
        root = sandbox_root(tmp_path / f"m{i}", f"{i:02d}" * 16)
        code, out = configure_root(lb, root, secret)
        assert code == 0, out
        roots.append(root)
    for root in roots:
        heartbeat(Paths(root), {"status": "healthy", "checks": []})
    wait_for(
        "every instance's heartbeats to be flushed",
        lambda: sum(m["health"] == "healthy" for m in lb.machines()) == len(roots),
    )

    # Renewal through the balancer; the certificate it replaced is refused by both instances.
    stale = tmp_path / "stale"
    stale.mkdir()
    old = (stale / "c.pem", stale / "c.key")
    for src, dst in zip(cert_of(roots[0]), old, strict=True):
        dst.write_bytes(src.read_bytes())
    renew_certificate(Paths(roots[0]))
    heartbeat(Paths(roots[0]), {"status": "healthy", "checks": []})
    host0 = json.loads((roots[0] / "var/lib/mobility/identity.json").read_text())["host_id"]
    beat = json.dumps({"host_id": host0, "agent_version": "0.1.0"}).encode()
    for instance in (a, b):
        status, doc = raw_call(instance, "POST", wire.HEARTBEAT_PATH, beat, cert=old)
        assert (status, error_code(doc)) == (403, "CERT-SUPERSEDED")

    # kill -9 of one instance in the middle of a burst: the other keeps serving.
    def one(i: int) -> str:
        try:
            heartbeat(Paths(roots[i % len(roots)]), {"status": "warning", "checks": []})
        except MobilityError as e:
            return e.id
        return "ok"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        before = [pool.submit(one, i) for i in range(80)]
        time.sleep(0.5)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(timeout=10)
        killed_at = time.monotonic()
        during = [f.result(timeout=60) for f in before]
        after = [f.result(timeout=60) for f in [pool.submit(one, i) for i in range(60)]]
    assert during.count("ok") >= len(during) - 8, during  # only calls in flight on the killed instance failed
    assert after == ["ok"] * len(after), after
    assert time.monotonic() - killed_at < 60
    wait_for(
        "the surviving instance to flush the burst",
        lambda: sum(m["health"] == "warning" for m in lb.machines()) == len(roots),
    )
    code, out = configure_root(lb, sandbox_root(tmp_path / "late", "ff" * 16), secret)
    assert code == 0, out
