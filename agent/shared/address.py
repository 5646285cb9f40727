"""``HOST``, ``HOST:PORT``, ``[IPv6]:PORT``: the configuration server as an agent is told it (-i, bootstrap.conf), and
the hosts the server pushes to; parsed once, at the edge, into a ``ServerAddress``."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from agent.shared.errors import ServerAddressInvalid
from agent.shared.textsafe import shown
from agent.shared.wire import DEFAULT_PORT

_PORT = re.compile(r"[0-9]{1,5}")  # ASCII digits only (str.isdigit takes "²", which int() refuses)
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


@dataclass(frozen=True)
class ServerAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> ServerAddress:
    """HOST, HOST:PORT, [IPv6]:PORT or a bare IPv6 address (pure; ServerAddressInvalid otherwise)."""
    text = text.strip()
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ServerAddressInvalid(f"{shown(text, 80)}: unclosed '['")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":") or not _PORT.fullmatch(rest[1:]):
                raise ServerAddressInvalid(f"{shown(text, 80)}: expected [IPv6]:PORT")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        if not _PORT.fullmatch(p):
            raise ServerAddressInvalid(f"{shown(text, 80)}: the port must be a number from 1 to 65535")
        port = int(p)
    if not 0 < port < 65536:
        raise ServerAddressInvalid(f"{shown(text, 80)}: port {port} is out of range")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.match(host):
            raise ServerAddressInvalid(f"{shown(text, 80)} is not a host name or IP address") from None
    return ServerAddress(host, port)
