"""Reaching and logging in to a host, against real SSH servers on loopback (asyncssh's own server): each
failure before anything is sent gets its stable ID, and strict host keys mean no credential reaches an
unknown host. Everything after the login is tested against OpenSSH in tests/integration/test_push.py."""

from __future__ import annotations

import asyncio
import io
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import asyncssh
import pytest

from agent.shared.address import ServerAddress
from server.push.known_hosts import KnownHosts
from server.push.progress import Lines
from server.push.remote import Bundle, Credentials, HostResult, PushSettings, push_host
from server.push.targets import SSH_PORT

CLIENT_KEY = asyncssh.generate_private_key("ssh-ed25519")


class _Server(asyncssh.SSHServer):
    attempts: list[str]

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        self.attempts.append(username)
        return False


@asynccontextmanager
async def ssh_server(attempts: list[str]) -> AsyncIterator[tuple[ServerAddress, asyncssh.SSHKey]]:
    host_key = asyncssh.generate_private_key("ssh-ed25519")

    def factory() -> asyncssh.SSHServer:
        s = _Server()
        s.attempts = attempts
        return s

    server = await asyncssh.listen(
        "127.0.0.1", 0, server_host_keys=[host_key], server_factory=factory, authorized_client_keys=None
    )
    try:
        yield ServerAddress("127.0.0.1", server.sockets[0].getsockname()[1]), host_key
    finally:
        server.close()
        await server.wait_closed()


def settings(tmp_path: Path, *, accept_new: bool = False, password: str | None = None) -> PushSettings:
    def no_bundle(tag: str) -> Bundle:
        raise AssertionError("never reached")

    return PushSettings(
        server="127.0.0.1:9443",
        fingerprint="sha256:" + "0" * 64,
        credentials=Credentials("root", key=None if password else CLIENT_KEY, password=password),
        known_hosts=KnownHosts(tmp_path / "known_hosts"),
        accept_new_host_keys=accept_new,
        bundle_for=no_bundle,
        log_dir=tmp_path / "logs",
        timeout=2.0,
    )


def push(target: ServerAddress, s: PushSettings) -> HostResult:
    out = io.StringIO()
    result = asyncio.run(push_host(target, HostResult(str(target), "job"), "mbt_x_y", s, Lines(out).step))
    assert out.getvalue().startswith(f"{target}: connecting\n")
    return result


def error_of(r: HostResult) -> str | None:
    assert r.state == "failed"
    return r.error.id if r.error else None


def with_server(work: Callable[[ServerAddress, asyncssh.SSHKey], HostResult], attempts: list[str]) -> HostResult:
    async def main() -> HostResult:
        async with ssh_server(attempts) as (target, key):
            return await asyncio.to_thread(work, target, key)

    return asyncio.run(main())


def test_an_unknown_host_key_is_refused_before_any_credential_is_sent(tmp_path: Path) -> None:
    attempts: list[str] = []
    r = with_server(lambda t, _: push(t, settings(tmp_path, password="secret")), attempts)
    assert error_of(r) == "PUSH-HOST-KEY-UNKNOWN"
    assert "ssh-ed25519 SHA256:" in r.message and "nothing was sent" in r.message
    assert attempts == [] and not (tmp_path / "known_hosts").exists()


def test_trust_on_first_use_records_the_key_then_a_changed_key_is_refused(tmp_path: Path) -> None:
    attempts: list[str] = []

    def first(target: ServerAddress, key: asyncssh.SSHKey) -> HostResult:
        r = push(target, settings(tmp_path, accept_new=True, password="wrong"))
        assert [k.export_public_key() for k in KnownHosts(tmp_path / "known_hosts").trusted(target)] == [
            key.export_public_key()
        ]
        return r

    r = with_server(first, attempts)
    assert error_of(r) == "PUSH-AUTH-FAILED"  # the key was recorded, then the password was refused
    assert attempts  # it did try the password once the key was trusted
    # The same address and port, another key (a reinstalled host, or someone in the middle).
    known = (tmp_path / "known_hosts").read_text()
    port = int(known.split("]:", 1)[1].split()[0])
    attempts.clear()

    async def same_port() -> HostResult:
        key = asyncssh.generate_private_key("ssh-ed25519")
        server = await asyncssh.listen("127.0.0.1", port, server_host_keys=[key], server_factory=_Server)
        try:
            return await asyncio.to_thread(
                push, ServerAddress("127.0.0.1", port), settings(tmp_path, accept_new=True, password="secret")
            )
        finally:
            server.close()
            await server.wait_closed()

    r = asyncio.run(same_port())
    assert error_of(r) == "PUSH-HOST-KEY-MISMATCH"
    assert "it presented ssh-ed25519 SHA256:" in r.message
    assert (tmp_path / "known_hosts").read_text() == known  # never replaced by --accept-new-host-keys


def test_refused_and_timed_out(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert error_of(push(ServerAddress("127.0.0.1", closed), settings(tmp_path))) == "PUSH-CONNECT-REFUSED"

    with socket.socket() as silent:  # accepts, never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        r = push(ServerAddress("127.0.0.1", silent.getsockname()[1]), settings(tmp_path))
    assert error_of(r) == "PUSH-CONNECT-TIMEOUT"
    assert 1.5 < r.seconds < 10


def test_results_as_json_carry_the_error_and_no_secret(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    r = push(ServerAddress("127.0.0.1", closed), settings(tmp_path, password="hunter2-secret"))
    doc = r.to_json()
    assert doc["state"] == "failed" and doc["error"]["code"] == "PUSH-CONNECT-REFUSED"
    assert "fix" in doc["error"] and "hunter2" not in repr(doc) and "hunter2" not in repr(settings(tmp_path))


@pytest.mark.parametrize("port", [SSH_PORT, 2222])
def test_lines_progress_names_the_host_and_the_outcome(port: int) -> None:
    out = io.StringIO()
    r = HostResult(str(ServerAddress("web1", port)), "job")
    Lines(out).step(r, "copying")
    r.seconds = 3.25
    Lines(out).step(r, "succeeded")
    assert out.getvalue() == f"{r.target}: copying\n{r.target}: succeeded in 3.2 s\n"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "PUSH-NAME-UNRESOLVED"),
        (ConnectionRefusedError(111, "Connection refused"), "PUSH-CONNECT-REFUSED"),
        (TimeoutError(), "PUSH-CONNECT-TIMEOUT"),
        (OSError(101, "Network is unreachable"), "PUSH-UNREACHABLE"),
        (asyncssh.ProtocolError("bad packet"), "PUSH-SSH-FAILED"),
        (asyncssh.ConnectionLost("reset by peer"), "PUSH-SSH-FAILED"),
        (asyncssh.PermissionDenied("no"), "PUSH-AUTH-FAILED"),
        (EOFError(), "PUSH-SSH-FAILED"),
    ],
)
def test_each_way_of_not_reaching_a_host_has_its_id(error: BaseException, code: str) -> None:
    from server.push.remote import connect_error

    assert connect_error(error, ServerAddress("web1", 22)).id == code
