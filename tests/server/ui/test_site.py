"""The dashboard's listener of a real `mobility-server serve` over real HTTP and TLS: who may use it (loopback,
operators off loopback: login sessions, bearer tokens, client certificates; sessions end), the CSRF check of every
change, the audit log of who changed what, and /metrics as Prometheus parses it. The pages in a real browser are in
tests/integration/test_dashboard.py."""

from __future__ import annotations

import datetime as dt
import gzip
import http.client
import json
import re
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.shared.replication_wire import DiskReport, ReplicationReport
from agent.shared.wire import CheckReport, HealthReport
from scripts.localserver import server_log, start_local_server, ui_url
from server.database.heartbeats import Beat
from tests.integration.serverproc import ServerProcess, init_server, open_storage, server_cli, wait_for
from tests.server.database.test_storage import new_machine

PROTECTED = "11111111-1111-4111-8111-111111111111"
PLAIN = "22222222-2222-4222-8222-222222222222"
SILENT = "33333333-3333-4333-8333-333333333333"


def seed(data: Path) -> None:
    """Three machines written straight into the database: one protected and reporting, one plain, one never seen."""
    storage = open_storage(data)
    now = time.time()
    try:
        for host_id, name in ((PROTECTED, "web1"), (PLAIN, "db1"), (SILENT, "new1")):
            storage.enrol_machine(new_machine(host_id, hostname=name, facts=new_machine().facts.__class__(
                machine_id=uuid.uuid4().hex)), now)  # fmt: skip
        health = HealthReport("healthy", now, (CheckReport("AGENT-MEMORY", "PASS", "31 MiB of 64 MiB"),))
        storage.record_heartbeats([Beat(h, now, "0.1.0", json.dumps(health.to_json())) for h in (PROTECTED, PLAIN)])
        storage.protect(PROTECTED, ["/dev/sdb"], False, "default", False, now)
        disk = DiskReport("/dev/sdb", "CONTINUOUS", 8 << 30, 0, 2.5, 4e6, None, now - 60)
        storage.record_replication([(PROTECTED, now, json.dumps(ReplicationReport((disk,), now - 60).to_json()))])
    finally:
        storage.close()


@dataclass
class Ui:
    server: ServerProcess
    base: str  # scheme://127.0.0.1:PORT

    def client(self, cert: tuple[Path, Path] | None = None) -> Client:
        return Client(self.base, self.server.data / "ca" / "ca.pem", cert)


def serve(data: Path, *args: str) -> Iterator[Ui]:
    if not (data / ".initialised").exists():
        init_server(data)
        seed(data)
    proc, address, fingerprint = start_local_server(data, *args)
    server = ServerProcess(data, proc, int(address.rsplit(":", 1)[1]), fingerprint)
    try:
        url = ui_url(data)
        assert url is not None, server_log(data).read_text()[-2000:]
        parts = urlsplit(url)
        yield Ui(server, f"{parts.scheme}://127.0.0.1:{parts.port}")
    finally:
        server.stop()


@dataclass
class Client:
    """A browser as far as HTTP goes: it keeps cookies (and sends Secure ones over TLS only)."""

    base: str
    ca: Path
    cert: tuple[Path, Path] | None = None
    cookies: dict[str, str] = field(default_factory=dict)
    last_cookies: SimpleCookie = field(default_factory=SimpleCookie)

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(self.base)
        if parts.scheme == "https":
            ctx = ssl.create_default_context(cafile=str(self.ca))
            if self.cert:
                ctx.load_cert_chain(str(self.cert[0]), str(self.cert[1]))
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                "127.0.0.1", parts.port, context=ctx, timeout=30
            )
        else:
            conn = http.client.HTTPConnection("127.0.0.1", parts.port, timeout=30)
        sent = dict(headers or {})
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        try:
            conn.request(method, path, body=body, headers=sent)
            resp = conn.getresponse()
            data = resp.read()
            got = {k.lower(): v for k, v in resp.getheaders()}
            for header in resp.headers.get_all("Set-Cookie") or []:
                jar: SimpleCookie = SimpleCookie()
                jar.load(header)
                for name, morsel in jar.items():
                    self.last_cookies[name] = morsel
                    if morsel["max-age"] == "0" or morsel.value == "":
                        self.cookies.pop(name, None)
                    else:
                        self.cookies[name] = morsel.value
            return resp.status, got, data
        finally:
            conn.close()

    def json(self, method: str, path: str, doc: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        body = json.dumps(doc).encode() if doc is not None else None
        status, _, data = self.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
        return status, json.loads(data) if data else None

    def page_csrf(self, path: str) -> str:
        status, _, data = self.request("GET", path)
        assert status == 200, (status, data[:300])
        found = re.search(rb'<meta name="csrf-token" content="([0-9a-f]{64})">', data)
        assert found, data[:500]
        return found.group(1).decode()


def code(doc: Any) -> object:
    return doc["error"]["code"] if isinstance(doc, dict) and "error" in doc else doc


@pytest.fixture
def loopback(tmp_path: Path) -> Iterator[Ui]:
    yield from serve(tmp_path / "data", "--ui-refresh", "1")


def test_off_loopback_only_operators_get_in_and_their_sessions_end(tmp_path: Path) -> None:
    data = tmp_path / "data"
    init_server(data)
    seed(data)
    token = server_cli(data, "operator", "add", "alice", check=True).stdout.strip()
    carol = server_cli(data, "operator", "add", "carol", "--cert-out", str(tmp_path), check=True).stdout.strip()
    for ui in serve(data, "--ui-listen", "0.0.0.0:0", "--ui-session", "4s", "--ui-refresh", "1"):
        assert ui.base.startswith("https://")
        anonymous = ui.client()
        assert code(anonymous.json("GET", "/api/overview")[1]) == "UI-LOGIN-REQUIRED"
        status, headers, _ = anonymous.request("GET", "/machines?q=web")
        location = urlsplit(headers["location"])
        assert (status, location.path, parse_qs(location.query)) == (303, "/login", {"next": ["/machines?q=web"]})
        assert anonymous.request("GET", "/metrics")[0] == 401

        # The login form: its CSRF token, a wrong token, then the operator's.
        browser = ui.client()
        form = browser.request("GET", "/login?next=/machines")[2].decode()
        csrf = re.search(r'name="csrf" value="([0-9a-f]{64})"', form)
        assert csrf and browser.last_cookies["mobility_browser"]["secure"]
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        body = urlencode({"token": token, "next": "/machines"}).encode()
        status, _, answer = browser.request("POST", "/login", body, headers)  # no CSRF token: refused
        assert (status, code(json.loads(answer))) == (
            403,
            "UI-CSRF-REFUSED",
        ) and "mobility_session" not in browser.cookies
        wrong = urlencode({"token": token[:-2] + "xx", "csrf": csrf.group(1), "next": "/machines"}).encode()
        status, _, answer = browser.request("POST", "/login", wrong, headers)
        assert status == 401 and b"UI-LOGIN-FAILED" in answer
        right = urlencode({"token": token, "csrf": csrf.group(1), "next": "/machines"}).encode()
        status, got, _ = browser.request("POST", "/login", right, headers)
        assert (status, got["location"]) == (303, "/machines")
        session = browser.last_cookies["mobility_session"]
        assert session["secure"] and session["httponly"] and session["samesite"] == "Strict"
        assert 0 < int(session["max-age"]) <= 4
        status, doc = browser.json("GET", "/api/overview")
        assert status == 200 and doc["instance"]["who"] == "alice" and doc["machines"] == 3

        # Scripts and Prometheus: a bearer token; an operator's certificate; never a machine's certificate.
        status, _, text = ui.client().request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
        assert status == 200 and b"mobility_machine_info" in text
        cert = ui.client(cert=(tmp_path / "carol.crt", tmp_path / "carol.key"))
        status, doc = cert.json("GET", "/api/overview")
        assert status == 200 and doc["instance"]["who"] == "carol" and carol.startswith("mop_")
        machine = ui.client(cert=machine_certificate(data, tmp_path))
        assert code(machine.json("GET", "/api/overview")[1]) == "UI-LOGIN-REQUIRED"

        # Sessions end: at their time, and at once when their operator is removed.
        wait_for("the session to end", lambda b=browser: b.json("GET", "/api/overview")[0] == 401, timeout=15)
        server_cli(data, "operator", "remove", "alice", check=True)
        status, doc = ui.client().json("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
        assert (status, code(doc)) == (401, "UI-LOGIN-FAILED")

        # Five failed logins from an address, then none for a while, whatever the token.
        for _ in range(5):
            ui.client().json("GET", "/metrics", headers={"Authorization": "Bearer mop_0000000000000000_" + "x" * 43})
        status, got, answer = ui.client().request("GET", "/metrics", headers={"Authorization": f"Bearer {carol}"})
        assert (status, code(json.loads(answer))) == (429, "UI-LOGIN-LIMITED") and int(got["retry-after"]) > 0
    log = server_log(data).read_text()
    assert token not in log and carol not in log


def machine_certificate(data: Path, where: Path) -> tuple[Path, Path]:
    """A machine's client certificate, of the same CA as the operators' (it must not log in)."""
    from cryptography import x509

    from agent.lifecycle.identity import new_key_and_csr
    from server.api import pki

    ca = pki.Authority.load((data / "ca/ca.pem").read_bytes(), (data / "ca/ca.key").read_bytes())
    key, csr = new_key_and_csr(PROTECTED)
    cert = pki.issue_client_cert(ca, x509.load_pem_x509_csr(csr), PROTECTED, dt.datetime.now(dt.UTC))
    (where / "machine.crt").write_bytes(pki.cert_pem(cert))
    (where / "machine.key").write_bytes(pki.key_pem(key))  # type: ignore[arg-type]
    return where / "machine.crt", where / "machine.key"


def test_changes_need_the_pages_csrf_token_and_the_audit_log_says_who_made_them(loopback: Ui) -> None:
    browser = loopback.client()
    csrf = browser.page_csrf(f"/machines/{PROTECTED}")
    pause = f"/api/machines/{PROTECTED}/pause"
    forged = (
        {},  # no token
        {"X-CSRF-Token": "0" * 64},  # another page's
        {"X-CSRF-Token": csrf, "Origin": "http://evil.example"},  # the right token, from another site
        {"X-CSRF-Token": csrf, "Sec-Fetch-Site": "cross-site"},
    )
    for headers in forged:
        status, doc = browser.json("POST", pause, {}, headers)
        assert (status, code(doc)) == (403, "UI-CSRF-REFUSED"), headers
    assert loopback.client().json("POST", pause, {}, {"X-CSRF-Token": csrf})[0] == 403  # another browser's token
    storage = open_storage(loopback.server.data)
    try:
        protection = storage.protection(PROTECTED)
        assert protection is not None and not protection.paused
        assert json.loads(server_cli(loopback.server.data, "audit", "--json", check=True).stdout) == []
        status, doc = browser.json("POST", pause, {}, {"X-CSRF-Token": csrf, "Origin": loopback.base})
        assert (status, doc) == (200, {"outcome": "done"})
        protection = storage.protection(PROTECTED)
        assert protection is not None and protection.paused
    finally:
        storage.close()
    status, doc = browser.json("POST", f"/api/machines/{PLAIN}/pause", {}, {"X-CSRF-Token": csrf})
    assert (status, code(doc)) == (409, "PROTECT-DISK-INVALID")
    # A machine removed since the page was loaded: the operator's refusal, never the agent's `mobility configure`.
    for change in ("pause", "resume", "test-failover"):
        unknown = f"/api/machines/99999999-9999-4999-8999-999999999999/{change}"
        status, doc = browser.json("POST", unknown, {}, {"X-CSRF-Token": csrf})
        assert (status, code(doc)) == (404, "MACHINE-NOT-FOUND"), change
        assert "mobility-server machines" in doc["error"]["fix"] and "configure" not in doc["error"]["fix"], doc
    status, doc = browser.json("POST", "/api/rollouts/halt", {"reason": "bad build"}, {"X-CSRF-Token": csrf})
    assert (status, code(doc)) == (409, "ROLLOUT-NOT-RUNNING")
    # A test failover of a machine without a point: started, then ended by the command's own error; one at a time.
    started = browser.json("POST", f"/api/machines/{PROTECTED}/test-failover", {}, {"X-CSRF-Token": csrf})
    again = browser.json("POST", f"/api/machines/{PROTECTED}/test-failover", {}, {"X-CSRF-Token": csrf})
    assert started[0] == 200 and (again[0], code(again[1])) == (409, "TEST-FAILOVER-RUNNING")

    def audit() -> list[dict[str, Any]]:
        return list(json.loads(server_cli(loopback.server.data, "audit", "--json", check=True).stdout))

    wait_for("the test failover's outcome", lambda: audit()[0]["outcome"] is not None, timeout=60)
    entries = [(e["operator"], e["action"], (e["outcome"] or "").split(":")[0]) for e in audit()]
    assert entries == [
        ("loopback", "start test failover", "POINT-NOT-FOUND"),
        ("loopback", "halt rollout", "ROLLOUT-NOT-RUNNING"),
        ("loopback", "pause protection", "PROTECT-DISK-INVALID"),
        ("loopback", "pause protection", "done"),
    ]
    assert all(e["via"].startswith("dashboard (loopback, no login) from 127.0.0.1") for e in audit())
    page = json.loads(browser.request("GET", "/api/audit")[2])
    assert [e["action"] for e in page["entries"]][-1] == "pause protection"


def test_the_loopback_dashboard_answers_loopback_names_only(loopback: Ui) -> None:
    client = loopback.client()
    port = urlsplit(loopback.base).port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert client.request("GET", "/api/overview", headers={"Host": host})[0] == 200, host
    for host in (f"evil.example:{port}", "evil.example", f"10.0.0.1:{port}"):
        status, _, answer = client.request("GET", "/", headers={"Host": host})
        assert (status, code(json.loads(answer))) == (403, "UI-HOST-REFUSED"), host
    status, headers, _ = client.request("GET", "/")
    assert status == 200 and "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"


def test_an_instance_without_the_store_cannot_start_a_test_failover(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for ui in serve(data, "--role", "api", "--process-address", "127.0.0.1:1"):
        browser = ui.client()
        csrf = browser.page_csrf("/")
        status, doc = browser.json("POST", f"/api/machines/{PROTECTED}/test-failover", {}, {"X-CSRF-Token": csrf})
        assert (status, code(doc)) == (409, "UI-NO-STORE")


def test_metrics_parse_and_count_the_fleet(loopback: Ui) -> None:
    client = loopback.client()
    client.request("GET", "/api/machines?sort=nope")  # a 400, counted by route
    status, headers, text = client.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}

    def value(name: str, **labels: str) -> float:
        found = [s.value for s in families[name].samples if all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(found) == 1, (name, labels, found)
        return float(found[0])

    assert value("mobility_machines", state="online", health="healthy") == 2
    assert value("mobility_machines", state="never seen", health="unknown") == 1
    assert len(families["mobility_machine_info"].samples) == 3
    assert value("mobility_machine_info", host_id=PROTECTED, hostname="web1") == 1
    assert value("mobility_machine_up", host_id=SILENT) == 0
    assert value("mobility_disk_lag_seconds", host_id=PROTECTED, disk="/dev/sdb") == 2.5
    assert value("mobility_disk_state", host_id=PROTECTED, disk="/dev/sdb", state="CONTINUOUS") == 1
    assert value("mobility_protection_rpo_seconds", host_id=PROTECTED) == 900
    assert value("mobility_store_reserve_bytes") == 256 << 20
    assert value("mobility_http_requests", route="ui /api/machines", code="400", method="GET") == 1
    assert families["mobility_event_loop_lateness_seconds"].type == "histogram"
    # Compressed for a scraper that asks: the same figures.
    status, headers, packed = client.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
    assert headers["content-encoding"] == "gzip"
    again = {f.name for f in text_string_to_metric_families(gzip.decompress(packed).decode())}
    assert again == set(families)


def test_hostile_paths_queries_and_bodies_get_json_errors(loopback: Ui) -> None:
    client = loopback.client()
    csrf = client.page_csrf("/")
    for path in ("/static/../site.py", "/static/%2e%2e/site.py", "/static/vendor/uplot/LICENSE", "/static/app.js/x"):
        status, _, answer = client.request("GET", path)
        assert (status, code(json.loads(answer))) == (404, "NOT-FOUND"), path
    for path in (
        "/api/machines?limit=0",
        "/api/machines?offset=" + "9" * 30,
        "/api/protection?state=BROKEN",
        "/api/protection?limit=abc",
        "/api/audit?limit=1001",
        f"/api/rollouts/{uuid.uuid4()}?state=evil",
        "/api/rollouts/x?offset=-1",
    ):
        status, doc = client.json("GET", path)
        assert (status, code(doc)) == (400, "BAD-REQUEST"), path
    assert code(client.json("GET", f"/api/machines/{uuid.uuid4()}")[1]) == "NOT-FOUND"
    assert code(client.json("GET", f"/api/rollouts/{uuid.uuid4()}")[1]) == "NOT-FOUND"
    halt = "/api/rollouts/halt"
    headers = {"X-CSRF-Token": csrf, "Content-Type": "application/json"}
    for body, expected in ((b"[1]", "BAD-REQUEST"), (b"{", "BAD-REQUEST"), (b'{"reason": 5}', "BAD-REQUEST"),
                           (b'{"reason": "' + b"x" * 20000 + b'"}', "BODY-TOO-LARGE")):  # fmt: skip
        status, _, answer = client.request("POST", halt, body, headers)
        assert code(json.loads(answer)) == expected, (body[:20], status)
    assert json.loads(server_cli(loopback.server.data, "audit", "--json", check=True).stdout) == []


def test_every_dashboard_route_has_its_cases(tmp_path: Path) -> None:
    """A new route of the dashboard must get its cases (here or in tests/integration/test_dashboard.py)."""
    from server.ui.site import Ui as Site
    from server.ui.site import UiOptions
    from tests.server.ui.test_refresh import make_server

    covered = {
        ("GET", "/"), ("GET", "/machines"), ("GET", "/machines/{host_id}"), ("GET", "/protection"),
        ("GET", "/rollouts"), ("GET", "/rollouts/{rollout_id}"), ("GET", "/audit"),  # login redirect, Host check
        ("GET", "/login"), ("POST", "/login"), ("POST", "/logout"),  # off loopback, CSRF, limits, session end
        ("GET", "/static/{name}"),  # only the listed files: test_hostile_paths_queries_and_bodies_get_json_errors
        ("GET", "/metrics"),  # test_metrics_parse_and_count_the_fleet, bearer tokens
        ("GET", "/api/overview"), ("GET", "/api/machines"), ("GET", "/api/machines/{host_id}"),
        ("GET", "/api/protection"), ("GET", "/api/rollouts"), ("GET", "/api/rollouts/{rollout_id}"),
        ("GET", "/api/audit"),  # bounds: above and tests/server/ui/test_snapshot.py
        ("POST", "/api/machines/{host_id}/pause"), ("POST", "/api/machines/{host_id}/resume"),
        ("POST", "/api/machines/{host_id}/test-failover"), ("POST", "/api/rollouts/halt"),  # CSRF, audit, bodies
    }  # fmt: skip
    for server in make_server(tmp_path):
        app = Site(server, UiOptions("127.0.0.1", 0)).app()
        routes = {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD" and r.resource}
        assert routes == covered, f"routes without cases: {routes - covered}; stale: {covered - routes}"
