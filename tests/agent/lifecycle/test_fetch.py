"""fetch_bundle end to end: a real HTTPS server on 127.0.0.1 serving a real repository, python-tuf verifying.

The server here is only a fixture (http.server wrapped in TLS with a throwaway self-signed certificate);
the configuration server's own HTTP API is tested with it. Tampering is done by serving other bytes
for a URL, so the repository on disk stays valid.
"""

from __future__ import annotations

import datetime
import hashlib
import http.server
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.lifecycle.bundles import inspect_bundle
from agent.lifecycle.fetch import fetch_bundle
from agent.shared.errors import MobilityError
from server.datadir import DataDir
from server.releases.repository import Repository
from tests.bundle_factory import make_bundle

NOW = datetime.datetime.now(datetime.UTC)


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mobility test server")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(minutes=5))
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "server.pem", tmp / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class RepoServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, data: DataDir) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.data = data
        self.overrides: dict[str, bytes] = {}  # URL path -> bytes served instead of the file
        self.requests: list[str] = []

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: RepoServer

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        body = self.server.overrides.get(self.path)
        if body is None:
            body = self._file()
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        content_type = "application/json" if self.path.endswith(".json") else "application/gzip"
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _file(self) -> bytes | None:
        repo = Repository(self.server.data)
        for prefix, lookup in (("/v1/repo/metadata/", repo.metadata_path), ("/v1/repo/targets/", repo.target_path)):
            if self.path.startswith(prefix):
                path = lookup(self.path[len(prefix) :])
                return path.read_bytes() if path else None
        return None

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def data(tmp_path: Path) -> DataDir:
    data = DataDir(tmp_path / "data")
    Repository.create(data)
    return data


@pytest.fixture
def tls(tmp_path: Path) -> tuple[Path, Path]:
    return _self_signed(tmp_path)


@pytest.fixture
def server(data: DataDir, tls: tuple[Path, Path]) -> Iterator[RepoServer]:
    srv = RepoServer(data)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*tls)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


@pytest.fixture
def client_ctx(tls: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls[0]))


class Agent:
    """One machine: its trusted root from enrolment and its metadata and download directories."""

    def __init__(self, tmp: Path, server: RepoServer, ctx: ssl.SSLContext, root: bytes) -> None:
        self.server, self.ctx, self.root = server, ctx, root
        self.metadata_dir = tmp / "agent" / "tuf"
        self.dest_dir = tmp / "agent" / "bundles"

    def fetch(self, os_tag: str = "UBUNTU-20.04", version: str | None = None) -> Path:
        return fetch_bundle(
            self.server.base_url,
            self.ctx,
            self.root,
            self.metadata_dir,
            os_tag,
            self.dest_dir,
            version=version,
            timeout=5.0,
        )

    def refused(self, os_tag: str = "UBUNTU-20.04", version: str | None = None) -> MobilityError:
        with pytest.raises(MobilityError) as e:
            self.fetch(os_tag, version)
        assert e.value.fix, "every error carries a remediation"
        return e.value


@pytest.fixture
def agent(tmp_path: Path, server: RepoServer, client_ctx: ssl.SSLContext, data: DataDir) -> Agent:
    return Agent(tmp_path, server, client_ctx, Repository(data).root_json())


@pytest.fixture
def bundles(tmp_path: Path, data: DataDir) -> dict[str, Path]:
    made = {
        "old": make_bundle(tmp_path / "in", "UBUNTU-20.04", "0.9.1", datetime.date(2026, 12, 1)),
        "new": make_bundle(tmp_path / "in", "UBUNTU-20.04", "0.10.0", datetime.date(2026, 11, 1)),
        "rhel": make_bundle(tmp_path / "in", "RHEL7", "1.0.0"),
    }
    Repository(data).add(made.values())
    return made


def test_fetches_and_verifies_the_newest_bundle_for_the_tag(agent: Agent, bundles: dict[str, Path]) -> None:
    path = agent.fetch()
    assert path == agent.dest_dir / bundles["new"].name  # 0.10.0 is newer than 0.9.1
    assert path.read_bytes() == bundles["new"].read_bytes()
    assert inspect_bundle(path)[0].version == "0.10.0"
    assert [p.name for p in agent.dest_dir.iterdir()] == [path.name]  # no partial files left
    assert agent.fetch("RHEL7").read_bytes() == bundles["rhel"].read_bytes()


def test_fetches_the_version_it_is_asked_for_older_or_newer(agent: Agent, bundles: dict[str, Path]) -> None:
    """An upgrade (or a pin to an earlier version) fetches the version the server names, not the newest."""
    path = agent.fetch(version="0.9.1")
    assert path.read_bytes() == bundles["old"].read_bytes()
    assert agent.fetch(version="0.10.0").read_bytes() == bundles["new"].read_bytes()
    err = agent.refused(version="0.9.2")
    assert err.code == "TUF-NO-BUNDLE"
    assert "UBUNTU-20.04, version 0.9.2" in err.message
    assert agent.refused("RHEL7", "0.9.1").code == "TUF-NO-BUNDLE"  # that version exists, but not for this tag


def test_a_verified_bundle_is_not_downloaded_again(agent: Agent, bundles: dict[str, Path], server: RepoServer) -> None:
    agent.fetch()
    server.requests.clear()
    agent.fetch()
    assert not any(r.startswith("/v1/repo/targets/") for r in server.requests)
    assert "/v1/repo/metadata/timestamp.json" in server.requests


def test_urls_the_agent_uses(agent: Agent, bundles: dict[str, Path], server: RepoServer) -> None:
    agent.fetch()
    assert server.requests == [
        "/v1/repo/metadata/2.root.json",
        "/v1/repo/metadata/timestamp.json",
        "/v1/repo/metadata/2.snapshot.json",
        "/v1/repo/metadata/2.targets.json",
        f"/v1/repo/targets/{bundles['new'].name}",
    ]


def test_tampered_bundle_is_refused(agent: Agent, bundles: dict[str, Path], server: RepoServer) -> None:
    content = bytearray(bundles["new"].read_bytes())
    content[100] ^= 0x01
    server.overrides[f"/v1/repo/targets/{bundles['new'].name}"] = bytes(content)
    err = agent.refused()
    assert err.code == "TUF-TAMPERED"
    assert int(err.exit_code) == 1
    assert not (agent.dest_dir / bundles["new"].name).exists()
    assert list(agent.dest_dir.iterdir()) == []


def test_longer_bundle_is_refused(agent: Agent, bundles: dict[str, Path], server: RepoServer) -> None:
    server.overrides[f"/v1/repo/targets/{bundles['new'].name}"] = bundles["new"].read_bytes() + b"\0" * 10
    assert agent.refused().code == "TUF-TAMPERED"


def test_tampered_targets_metadata_is_refused(agent: Agent, bundles: dict[str, Path], server: RepoServer) -> None:
    text = (server.data.tuf_dir / "metadata" / "2.targets.json").read_text()
    good = bundles["new"].read_bytes()
    evil = bundles["old"].read_bytes()
    forged = text.replace(hashlib.sha256(good).hexdigest(), hashlib.sha256(evil).hexdigest())
    assert forged != text
    server.overrides["/v1/repo/metadata/2.targets.json"] = forged.encode()
    server.overrides[f"/v1/repo/targets/{bundles['new'].name}"] = evil
    assert agent.refused().code == "TUF-TAMPERED"


def test_timestamp_not_signed_by_the_trusted_key_is_refused(
    agent: Agent, bundles: dict[str, Path], server: RepoServer
) -> None:
    text = (server.data.tuf_dir / "metadata" / "timestamp.json").read_text()
    forged = text.replace('"version": 2', '"version": 99')
    assert forged != text
    server.overrides["/v1/repo/metadata/timestamp.json"] = forged.encode()
    err = agent.refused()
    assert err.code == "TUF-TAMPERED"
    assert "not signed by the trusted keys" in err.message


def test_root_of_another_repository_is_refused(tmp_path: Path, agent: Agent, bundles: dict[str, Path]) -> None:
    other = DataDir(tmp_path / "other")
    agent.root = Repository.create(other).root_json()
    assert agent.refused().code == "TUF-TAMPERED"


def test_rollback_is_refused(agent: Agent, bundles: dict[str, Path], server: RepoServer, tmp_path: Path) -> None:
    old_timestamp = (server.data.tuf_dir / "metadata" / "timestamp.json").read_bytes()
    Repository(server.data).add([make_bundle(tmp_path / "in2", "UBUNTU-20.04", "0.11.0")])
    assert agent.fetch().name.startswith("Mobility_UA_0.11.0_")  # the agent has seen timestamp v3
    server.overrides["/v1/repo/metadata/timestamp.json"] = old_timestamp  # v2, validly signed
    err = agent.refused()
    assert err.code == "TUF-ROLLBACK"
    assert int(err.exit_code) == 1


def test_expired_timestamp_is_refused(agent: Agent, bundles: dict[str, Path], server: RepoServer) -> None:
    # A server that stopped re-signing: its last timestamp expired two days ago.
    resigned = Repository(server.data).refresh_timestamp(NOW - datetime.timedelta(days=3), datetime.timedelta(days=5))
    assert resigned == ["timestamp"]
    err = agent.refused()
    assert err.code == "TUF-EXPIRED"
    assert "expired" in err.message


def test_no_bundle_for_the_tag(agent: Agent, bundles: dict[str, Path]) -> None:
    err = agent.refused("RHEL9")
    assert err.code == "TUF-NO-BUNDLE"
    assert "RHEL9" in err.message


def test_empty_repository_has_no_bundle(agent: Agent) -> None:
    assert agent.refused().code == "TUF-NO-BUNDLE"


def test_unreachable_server_is_a_temporary_failure(tmp_path: Path, client_ctx: ssl.SSLContext, data: DataDir) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(MobilityError) as e:
        fetch_bundle(
            f"https://127.0.0.1:{port}",
            client_ctx,
            Repository(data).root_json(),
            tmp_path / "md",
            "UBUNTU-20.04",
            tmp_path / "dest",
            timeout=5.0,
        )
    assert e.value.code == "TUF-FETCH-FAILED"
    assert int(e.value.exit_code) == 75


def test_server_with_an_unpinned_certificate_is_refused(agent: Agent, bundles: dict[str, Path]) -> None:
    agent.ctx = ssl.create_default_context()  # the system CAs, not the server's own CA
    err = agent.refused()
    assert err.code == "TUF-FETCH-FAILED"
    assert "CERTIFICATE_VERIFY_FAILED" in err.message


def test_missing_bundle_file_on_the_server_is_a_temporary_failure(
    agent: Agent, bundles: dict[str, Path], server: RepoServer
) -> None:
    (server.data.repository_dir / bundles["new"].name).unlink()  # removed by hand, not yet rescanned
    err = agent.refused()
    assert err.code == "TUF-FETCH-FAILED"
    assert "404" in err.message


def test_a_bundle_that_cannot_be_written_is_a_local_failure(agent: Agent, bundles: dict[str, Path]) -> None:
    agent.dest_dir.parent.mkdir(parents=True, exist_ok=True)
    agent.dest_dir.write_text("a file where the downloads directory goes")
    err = agent.refused()
    assert err.code == "FETCH-WRITE-FAILED" and int(err.exit_code) == 1


def test_answers_that_are_not_the_api_are_protocol_errors(server: RepoServer, tls: tuple[Path, Path]) -> None:
    """agent/lifecycle/api_client.py against a TLS server that is not a Mobility server (this fixture)."""
    from agent.errors import ServerProtocolError
    from agent.lifecycle.api_client import CA_PATH, Client, fetch_pinned_ca
    from agent.shared.address import ServerAddress

    address = ServerAddress("127.0.0.1", server.server_address[1])
    server.overrides["/v1/status"] = b"<html>a web server</html>"
    client = Client(address, tls[0].read_bytes())
    try:
        with pytest.raises(ServerProtocolError, match="HTTP 200, not JSON"):
            client.call("GET", "/v1/status")
        server.overrides["/v1/status"] = b"[1, 2]"
        with pytest.raises(ServerProtocolError, match="not a JSON object"):
            client.call("GET", "/v1/status")
        with pytest.raises(ServerProtocolError, match="HTTP 404"):
            client.call("GET", "/v1/nothing-here")  # an error page, not the API's JSON error
    finally:
        client.close()
    server.overrides[CA_PATH] = b"no certificate here"
    with pytest.raises(ServerProtocolError, match="no CA certificate"):
        fetch_pinned_ca(address, None)
