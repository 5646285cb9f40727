"""os-release(5): a pure parser and the reader that finds the file inside a root."""

from __future__ import annotations

import re

from agent.host.paths import Paths
from agent.host.textfile import read_small_text

# /etc/os-release wins; /usr/lib/os-release is the vendor's fallback (os-release(5)).
OS_RELEASE_LOCATIONS = ("/etc/os-release", "/usr/lib/os-release")

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_os_release(text: str) -> dict[str, str]:
    """Parse os-release content: ``KEY=value`` lines with shell quoting; comments, CRLF and
    malformed lines (e.g. an unterminated quote in a truncated file) are ignored."""
    info: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip()
        if not _KEY.fullmatch(key):
            continue
        parsed = _shell_value(value)
        if parsed is not None:
            info[key] = parsed
    return info


def _shell_value(value: str) -> str | None:
    """The value of a shell assignment as os-release(5) defines it; None if a quote is unterminated."""
    out: list[str] = []
    quote = ""
    i = 0
    while i < len(value):
        c = value[i]
        if quote == "'":
            if c == "'":
                quote = ""
            else:
                out.append(c)
        elif quote == '"':
            if c == '"':
                quote = ""
            elif c == "\\" and i + 1 < len(value) and value[i + 1] in '$"\\`':
                i += 1
                out.append(value[i])
            else:
                out.append(c)
        elif c in "'\"":
            quote = c
        elif c == "\\" and i + 1 < len(value):
            i += 1
            out.append(value[i])
        elif c == "#" and (not out or out[-1].isspace()):
            break  # an unquoted comment
        else:
            out.append(c)
        i += 1
    return None if quote else "".join(out).strip()


def read_os_release(paths: Paths) -> tuple[str, dict[str, str]] | None:
    """The first os-release of the root that holds at least one field, with its system path.

    A file that exists but is not text raises ``ReleaseFileUnreadable``; an empty one is
    passed over, so that the vendor copy in /usr/lib still counts.
    """
    for location in OS_RELEASE_LOCATIONS:
        text = read_small_text(paths, location)
        if text is None:
            continue
        info = parse_os_release(text)
        if info:
            return location, info
    return None
