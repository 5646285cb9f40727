"""The host keys the server trusts, in OpenSSH's known_hosts format in its data directory.

Strict by default: a host whose key is not recorded is refused (PUSH-HOST-KEY-UNKNOWN, with the key's
fingerprint to check); ``--accept-new-host-keys`` records a new host's key on first use. A recorded key that
differs from the one presented is always refused (PUSH-HOST-KEY-MISMATCH)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import asyncssh

from agent.shared.address import ServerAddress
from server.push.targets import SSH_PORT


def host_pattern(target: ServerAddress) -> str:
    """`host` on port 22, `[host]:port` otherwise, as ssh writes them (pure)."""
    return target.host if target.port == SSH_PORT else f"[{target.host}]:{target.port}"


def known_hosts_line(target: ServerAddress, key: asyncssh.SSHKey) -> str:
    algorithm, data = key.export_public_key("openssh").decode().split()[:2]
    return f"{host_pattern(target)} {algorithm} {data}\n"


class KnownHosts:
    def __init__(self, path: Path) -> None:
        self.path = path

    def trusted(self, target: ServerAddress) -> list[asyncssh.SSHKey]:
        """The keys recorded for exactly this host and port."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        pattern = host_pattern(target)
        return [
            asyncssh.import_public_key(key)
            for pattern_here, _, key in (line.partition(" ") for line in text.splitlines())
            if pattern_here == pattern
        ]

    def record(self, target: ServerAddress, key: asyncssh.SSHKey) -> None:
        """Append the key (under a lock: pushes run in parallel, possibly in several processes)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, known_hosts_line(target, key).encode())
            os.fsync(fd)
        finally:
            os.close(fd)


def fingerprint(key: asyncssh.SSHKey) -> str:
    return f"{key.get_algorithm()} {key.get_fingerprint('sha256')}"
