"""Retries in a boot storm: full jitter (clones never retry in step), a server's Retry-After honoured, 429 left to
the next run; and the transport turning a real server's 503/429 answers into RemoteBusy with its Retry-After."""

from __future__ import annotations

import http.server
import json
import random
import ssl
import statistics
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import Exit, RemoteBusy, ServerUnreachable
from agent.lifecycle.api_client import Client
from agent.lifecycle.backoff import BACKOFF_CAP, next_wait, with_backoff
from agent.shared.address import ServerAddress


def test_full_jitter_spreads_a_thousand_clones() -> None:
    """Each wait is uniform between 0 and the capped exponential bound: a thousand clones refused at one instant
    come back spread over the whole bound, not together."""
    rng = random.Random(7)  # noqa: S311 - reproducible waits, not secrets
    for attempt in range(8):
        waits = [next_wait(attempt, None, rng.uniform) for _ in range(1000)]
        bound = min(BACKOFF_CAP, 2.0**attempt)
        assert all(0 <= w <= bound for w in waits)
        assert statistics.pstdev(waits) > bound / 4  # uniform: about bound / 3.46
        buckets = [0] * 100  # a hundredth of the bound each: uniform puts about 10 clones in each
        for w in waits:
            buckets[min(int(w / bound * 100), 99)] += 1
        assert max(buckets) < 30, max(buckets)
    # After a Retry-After, never sooner than it.
    assert all(next_wait(3, 5.0, rng.uniform) >= 5.0 for _ in range(100))


def busy(status: int, retry_after: float | None) -> RemoteBusy:
    return RemoteBusy("SERVER-BUSY", "busy", "wait", status=status, retry_after=retry_after)


def test_with_backoff_honours_retry_after_and_gives_up_in_time() -> None:
    clock = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        clock[0] += s

    answers: list[Exception | str] = [busy(503, 4.0), busy(503, 2.0), ServerUnreachable("down"), "enrolled"]

    def action() -> str:
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    assert with_backoff("enrolling", action, 120, sleep, lambda: clock[0], lambda lo, hi: hi) == "enrolled"
    assert slept == [4.0 + 1.0, 2.0 + 2.0, 4.0]  # Retry-After plus the jitter bound (drawn at its top here)

    # 429 (rate limited) is not retried now: the command exits 75 and the next run comes after the limit.
    with pytest.raises(RemoteBusy) as limited:
        with_backoff("enrolling", lambda: (_ for _ in ()).throw(busy(429, 30.0)), 120, sleep, lambda: clock[0])
    assert limited.value.exit_code == Exit.TEMPFAIL
    # A Retry-After past the time left: given up at once, not slept through.
    slept.clear()
    with pytest.raises(RemoteBusy):
        with_backoff("enrolling", lambda: (_ for _ in ()).throw(busy(503, 500.0)), 60, sleep, lambda: clock[0])
    assert slept == []


class _Busy(http.server.BaseHTTPRequestHandler):
    status = 503

    def do_POST(self) -> None:
        body = json.dumps({"error": {"code": "SERVER-BUSY", "message": "at capacity", "fix": "wait"}}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Retry-After", "7")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def busy_server(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    import datetime as dt

    from server.api import pki

    ca = pki.create_ca("test CA", dt.datetime.now(dt.UTC))
    key, cert = pki.issue_server_cert(ca, ["127.0.0.1"], dt.datetime.now(dt.UTC))
    (tmp_path / "k.pem").write_bytes(pki.key_pem(key))
    (tmp_path / "c.pem").write_bytes(pki.cert_pem(cert))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1], pki.cert_pem(ca.cert)
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("status", [503, 429])
def test_the_transport_reads_503_and_429_as_busy_with_retry_after(busy_server: tuple[int, bytes], status: int) -> None:
    port, ca = busy_server
    _Busy.status = status
    client = Client(ServerAddress("127.0.0.1", port), ca)
    try:
        with pytest.raises(RemoteBusy) as e:
            client.call("POST", "/v1/enrol/nonce")
    finally:
        client.close()
    assert (e.value.id, e.value.status, e.value.retry_after, e.value.exit_code) == (
        "SERVER-BUSY",
        status,
        7.0,
        Exit.TEMPFAIL,
    )
