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
