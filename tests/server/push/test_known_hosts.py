from __future__ import annotations

import subprocess
from pathlib import Path

import asyncssh

from agent.shared.address import ServerAddress
from server.push.known_hosts import KnownHosts, fingerprint, host_pattern, known_hosts_line


def test_patterns_are_what_openssh_writes() -> None:
    assert host_pattern(ServerAddress("web1", 22)) == "web1"
    assert host_pattern(ServerAddress("10.0.0.5", 2222)) == "[10.0.0.5]:2222"


def test_recorded_keys_are_trusted_for_that_host_and_port_only(tmp_path: Path) -> None:
    known = KnownHosts(tmp_path / "known_hosts")
    a, b = (asyncssh.generate_private_key("ssh-ed25519") for _ in range(2))
    web1, web1_alt, web2 = ServerAddress("web1", 22), ServerAddress("web1", 2222), ServerAddress("web2", 22)
    assert known.trusted(web1) == []  # no file yet
    known.record(web1, a)
    known.record(web1_alt, b)
    assert [k.export_public_key() for k in known.trusted(web1)] == [a.export_public_key()]
    assert [k.export_public_key() for k in known.trusted(web1_alt)] == [b.export_public_key()]
    assert known.trusted(web2) == []


def test_the_file_is_readable_by_openssh(tmp_path: Path) -> None:
    """ssh-keygen -F finds the host in the file the server writes, with the same fingerprint."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    target = ServerAddress("10.9.8.7", 2200)
    path = tmp_path / "known_hosts"
    KnownHosts(path).record(target, key)
    assert path.read_text() == known_hosts_line(target, key)
    found = subprocess.run(
        ["ssh-keygen", "-l", "-F", "[10.9.8.7]:2200", "-f", str(path)], capture_output=True, text=True, check=True
    )
    assert key.get_fingerprint("sha256") in found.stdout
    assert fingerprint(key).startswith("ssh-ed25519 SHA256:")


def _line(host: str, key: asyncssh.SSHKey) -> str:
    return f"{host} {key.export_public_key('openssh').decode().strip()}\n"


def test_a_malformed_line_is_skipped_not_fatal(tmp_path: Path) -> None:
    """A hand-edited or truncated line (even one naming the host) costs that line only, never the whole push."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    path = tmp_path / "known_hosts"
    path.write_text("web1 ssh-ed25519\n" + "garbage\n" + "|1|notbase64|x " + "ssh-ed25519 AAAA\n" + _line("web1", key))
    known = KnownHosts(path)
    assert [k.export_public_key() for k in known.trusted(ServerAddress("web1", 22))] == [key.export_public_key()]
    assert any("garbage" in why for why in known.skipped)


def test_hashed_names_patterns_and_revoked_keys(tmp_path: Path) -> None:
    """What OpenSSH writes with HashKnownHosts, wildcard patterns and @revoked, as asyncssh reads them."""
    hashed, pattern, revoked = (asyncssh.generate_private_key("ssh-ed25519") for _ in range(3))
    path = tmp_path / "known_hosts"
    path.write_text(_line("*.lab.example", pattern) + "@revoked * " + _line("", revoked).lstrip())
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(path)], check=True, capture_output=True)  # hash the names
    with path.open("a") as f:
        f.write(_line("db1", hashed))
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(path)], check=True, capture_output=True)
    assert "db1" not in path.read_text()  # hashed
    known = KnownHosts(path)
    assert [k.export_public_key() for k in known.trusted(ServerAddress("db1", 22))] == [hashed.export_public_key()]
    assert known.knows(ServerAddress("db1", 22)) and not known.knows(ServerAddress("db2", 22))
    assert [k.export_public_key() for k in known.revoked(ServerAddress("anything", 22))] == [
        revoked.export_public_key()
    ]
