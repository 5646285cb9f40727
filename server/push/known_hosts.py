"""The host keys the server trusts, in OpenSSH's known_hosts format in its data directory.

Strict by default: a host whose key is not recorded is refused (PUSH-HOST-KEY-UNKNOWN, with the key's
fingerprint to check); ``--accept-new-host-keys`` records a new host's key on first use. A recorded key that
differs from the one presented is always refused (PUSH-HOST-KEY-MISMATCH).

The file is read by asyncssh's own known_hosts parser, which understands everything OpenSSH writes there: hashed
names (``HashKnownHosts``), patterns and negations, ``[host]:port``, ``@cert-authority`` and ``@revoked``. A line it
cannot parse (hand-edited, truncated) is skipped with a warning: one bad line must not stop pushes to every host."""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
from pathlib import Path

import asyncssh

from agent.shared.address import ServerAddress
from agent.shared.textsafe import printable
from server.push.targets import SSH_PORT

log = logging.getLogger("mobility.server.push")


def _address(host: str) -> str:
    """The host itself when it is an IP address (asyncssh matches names and addresses separately)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return ""


def host_pattern(target: ServerAddress) -> str:
    """`host` on port 22, `[host]:port` otherwise, as ssh writes them (pure)."""
    return target.host if target.port == SSH_PORT else f"[{target.host}]:{target.port}"


def known_hosts_line(target: ServerAddress, key: asyncssh.SSHKey) -> str:
    algorithm, data = key.export_public_key("openssh").decode().split()[:2]
    return f"{host_pattern(target)} {algorithm} {data}\n"


class KnownHosts:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.skipped: list[str] = []  # "line N: why" for lines the parser refused

    def load(self) -> asyncssh.SSHKnownHosts:
        """The file as asyncssh checks host keys against it (lines it cannot parse left out)."""
        try:
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        good, self.skipped = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                asyncssh.import_known_hosts(line)
            except (ValueError, asyncssh.KeyImportError) as e:
                self.skipped.append(f"line {n}: {e}")
                log.warning("%s line %d skipped: %s", self.path, n, printable(str(e), 200))
                continue
            good.append(line)
        return asyncssh.import_known_hosts("\n".join(good) + "\n")

    def trusted(self, target: ServerAddress) -> list[asyncssh.SSHKey]:
        """The host keys trusted for this host and port (not counting @revoked ones or CA keys)."""
        keys, _ca, revoked, *_ = self.load().match(target.host, _address(target.host), target.port)
        unique = {k.export_public_key(): k for k in keys if k not in revoked}  # an IP matches as name and address
        return list(unique.values())

    def revoked(self, target: ServerAddress) -> list[asyncssh.SSHKey]:
        revoked = self.load().match(target.host, _address(target.host), target.port)[2]
        return list({k.export_public_key(): k for k in revoked}.values())

    def knows(self, target: ServerAddress) -> bool:
        """Whether the file says anything about this host: host keys, or a CA whose certificates it accepts."""
        keys, ca_keys, *_ = self.load().match(target.host, _address(target.host), target.port)
        return bool(keys or ca_keys)

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
