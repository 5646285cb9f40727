"""What a hostile client can cost the server, against a real server process: oversized headers and bodies, slow
clients holding connections, floods of connections and bursts of unauthenticated requests. Each gets a bounded cost
and a clear 4xx or 503 with a stable ID, and the enrolled machine keeps being served meanwhile."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.host.paths import Paths
from agent.lifecycle.registration import heartbeat
from agent.shared import wire
from scripts.localserver import start_local_server
from server.api.edge import HEADER_SECONDS
from tests.integration.serverproc import (
    ServerProcess,
    configure_root,
    error_code,
    raw_call,
    sandbox_root,
    secret_file,
    start_server,
)

# solo: slow clients are told from served ones by time (a heartbeat within 2 s while the server is flooded)
pytestmark = [pytest.mark.integration, pytest.mark.solo]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    s = start_server(tmp_path / "data", heartbeat_interval=30.0)
    yield s
    s.stop()


def enrolled(server: ServerProcess, tmp_path: Path) -> Paths:
    root = sandbox_root(tmp_path / "m", "5e" * 16)
    code, out = configure_root(server, root, secret_file(tmp_path / "pass", server.passphrase()))
    assert code == 0, out
    return Paths(root)


def tls(server: ServerProcess, port: int | None = None) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(server.data / "ca" / "ca.pem"))
    raw = socket.create_connection(("127.0.0.1", port or server.port), timeout=30)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def answer(sock: ssl.SSLSocket) -> tuple[int, dict[str, object]]:
    """Read one whole response (the server closes after these errors); its status and JSON body."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def timed_heartbeat(paths: Paths) -> float:
    start = time.monotonic()
    heartbeat(paths, {"status": "healthy", "checks": []})
    return time.monotonic() - start


def test_oversized_headers_get_a_json_431(server: ServerProcess) -> None:
    for request in (
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
        b"GET /v1/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
    ):
        with tls(server) as s:
            s.sendall(request)
            status, doc = answer(s)
        assert (status, error_code(doc)) == (431, "HEADERS-TOO-LARGE"), request[:60]
    with tls(server) as s:
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        status, doc = answer(s)
    assert (status, error_code(doc)) == (400, "BAD-REQUEST")
    status, doc = raw_call(server, "POST", wire.ENROL_PATH, b"x" * 100_000)
    assert (status, error_code(doc)) == (413, "BODY-TOO-LARGE")


def test_slow_clients_are_cut_off_and_enrolled_machines_are_served(server: ServerProcess, tmp_path: Path) -> None:
    """Slowloris: a connection that sends nothing, one that trickles its headers, one that trickles its body. Each
    is answered 408 and closed within the header deadline; a heartbeat meanwhile is answered at once."""
    paths = enrolled(server, tmp_path)
    silent, headers, body = tls(server), tls(server), tls(server)
    headers.sendall(b"POST /v1/enrol HTTP/1.1\r\nHost: x\r\n")
    body.sendall(b"POST /v1/enrol HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n{")
    start = time.monotonic()
    waits = []
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = [pool.submit(answer, s) for s in (silent, headers, body)]
        while not all(a.done() for a in answers) and time.monotonic() - start < HEADER_SECONDS + 10:
            waits.append(timed_heartbeat(paths))
            for s in (headers, body):  # a byte a second: never finishing
                with contextlib.suppress(OSError):
                    s.sendall(b"X-Slow: 1\r\n" if s is headers else b" ")
            time.sleep(1)
        results = [a.result(timeout=5) for a in answers]
    elapsed = time.monotonic() - start
    for status, doc in results:
        assert (status, error_code(doc)) == (408, "REQUEST-TIMEOUT")
    assert elapsed < HEADER_SECONDS + 5
    assert max(waits) < 2.0, waits  # the enrolled machine never waited on them
    for s in (silent, headers, body):
        s.close()


def test_a_connection_flood_leaves_room_for_enrolled_machines(tmp_path: Path) -> None:
    """At most a quarter of the connections may be anonymous (no client certificate): a flood of them is answered
    503 SERVER-BUSY at once, and a machine with its certificate still connects and is served."""
    data = tmp_path / "data"
    base = start_server(data)
    paths = enrolled(base, tmp_path)
    base.stop()
    proc, address, _ = start_local_server(data, "--max-connections", "40", port=base.port)
    server = ServerProcess(data, proc, int(address.rsplit(":", 1)[1]), base.fingerprint)
    held: list[ssl.SSLSocket] = []
    try:
        busy = 0
        for _ in range(30):
            s = tls(server)
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")  # an unfinished request: the connection stays
            s.settimeout(0.5)
            try:
                status, doc = answer(s)
            except TimeoutError:
                held.append(s)  # accepted, waiting for the rest of its request
                continue
            assert (status, error_code(doc)) == (503, "SERVER-BUSY")
            busy += 1
            s.close()
        assert (len(held), busy) == (10, 20)
        assert timed_heartbeat(paths) < 2.0  # its certificate gets it in
        status, doc = raw_call(server, "GET", f"{wire.API}/health", b"")  # anonymous: full for now
        assert (status, error_code(doc)) == (503, "SERVER-BUSY")
    finally:
        for s in held:
            s.close()
        server.stop()


def test_a_burst_of_unauthenticated_requests(server: ServerProcess, tmp_path: Path) -> None:
    """400 enrolment attempts and nonce requests at once from one address: every one gets a JSON answer with a
    stable ID (a nonce, a refused proof, the rate limit or SERVER-BUSY), none hangs, and heartbeats go on."""
    paths = enrolled(server, tmp_path)
    junk = json.dumps({"csr": "x", "nonce": "n" * 20, "proof": "0" * 64}).encode()

    def one(i: int) -> tuple[int, object]:
        path, body = (wire.NONCE_PATH, b"") if i % 2 else (wire.ENROL_PATH, junk)
        status, doc = raw_call(server, "POST", path, body)
        return status, error_code(doc) if status != 200 else "ok"

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        burst = [pool.submit(one, i) for i in range(400)]
        waits = [timed_heartbeat(paths) for _ in range(5)]
        got = [f.result(timeout=60) for f in burst]
    assert time.monotonic() - start < 60
    allowed = {(200, "ok"), (400, "BAD-REQUEST"), (429, "ENROL-RATE-LIMITED"), (503, "SERVER-BUSY")}
    assert set(got) <= allowed, set(got) - allowed
    assert (429, "ENROL-RATE-LIMITED") in got  # the failures were counted
    assert max(waits) < 2.0, waits
