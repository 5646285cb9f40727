"""The hosts to push to: HOST, HOST:PORT or [IPv6]:PORT, from the command line or a hosts file (pure)."""

from __future__ import annotations

from collections.abc import Iterable

from agent.shared.address import ServerAddress, parse_address
from agent.shared.errors import ServerAddressInvalid
from server.errors import PushTargetInvalid

SSH_PORT = 22


def parse_target(text: str, source: str = "--host") -> ServerAddress:
    try:
        return parse_address(text, default_port=SSH_PORT)
    except ServerAddressInvalid as e:
        raise PushTargetInvalid(f"{source}: {e.message}") from e


def parse_hosts_file(text: str, source: str) -> list[ServerAddress]:
    """One host per line; `#` starts a comment; blank lines are skipped."""
    found: list[ServerAddress] = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line:
            found.append(parse_target(line, f"{source}:{n}"))
    return found


def unique_targets(targets: Iterable[ServerAddress]) -> list[ServerAddress]:
    """In the order given, each host:port once (pushing twice at once to one host would fight for its lock)."""
    return list(dict.fromkeys(targets))
