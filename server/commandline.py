"""What every `mobility-server` command shares, whichever module defines it (server/cli.py, server/process/cli.py,
server/ui/cli.py): the data directory and the database opened for one command, flag values parsed where they enter
(durations, sizes, bounded numbers), and tables printed safely. The command modules import this one; it imports none
of them."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.shared.errors import BadArguments
from agent.shared.textsafe import printable, shown
from server.datadir import DataDir
from server.errors import BadDuration, DataDirNotInitialised

if TYPE_CHECKING:  # imported where used: `--help` and the refusals start in a blink
    from server.database.connection import Database
    from server.database.storage import Storage

_DURATION = re.compile(r"^([0-9]{1,12})([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION_DAYS = 3650  # ten years: longer than any lifetime, grace or timeout here, so a typo
MAX_SIZE = 1 << 50  # 1 PiB: more than any reserve or rate here, and far inside the 64 bits a database stores


def parse_duration(text: str) -> float:
    """Seconds from 30s, 5m, 12h, 7d (at most ten years); BAD-DURATION otherwise."""
    m = _DURATION.match(text.strip())
    if not m or int(m.group(1)) == 0:
        raise BadDuration(f"{shown(text, 40)} is not a duration")
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if seconds > MAX_DURATION_DAYS * 86400:
        raise BadDuration(f"{shown(text, 40)} is longer than {MAX_DURATION_DAYS} days")
    return seconds


def count(low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number from ``low`` to ``high``. Bounded where it enters: a number past what makes
    sense (or past the 64 bits a database stores) is the flag's USAGE error, never an overflow deeper down."""

    def parse(text: str) -> int:
        value = text.strip()
        if not re.fullmatch(r"[+-]?[0-9]{1,19}", value) or not low <= int(value) <= high:
            raise argparse.ArgumentTypeError(f"{shown(text, 40)} is not a whole number from {low} to {high}")
        return int(value)

    return parse


def seconds(low: float, high: float) -> Callable[[str], float]:
    """An argparse ``type``: a number of seconds from ``low`` to ``high`` (not NaN, not infinite)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"{shown(text, 40)} is not a number of seconds from {low:g} to {high:g}")
        return value

    return parse


def data_dir(args: argparse.Namespace) -> DataDir:
    """The data directory of --data, refused unless `init` made it."""
    data = DataDir(Path(args.data))
    if not data.initialised_marker.exists():
        raise DataDirNotInitialised(f"{data.root} is not an initialised server data directory")
    return data


def open_database(args: argparse.Namespace, data: DataDir) -> Database:
    """The database of --database, or the one `init` recorded in the data directory."""
    from server.database.connection import database_for

    return database_for(data, getattr(args, "database", None))


def open_storage(args: argparse.Namespace, data: DataDir) -> Storage:
    """The server's storage for one command (no pool: a command makes a few calls and ends)."""
    from server.database.storage import Storage

    return Storage.open(open_database(args, data), pool_size=0)


_SIZE = re.compile(r"^([0-9]{1,19})([KMGTP]?)(i?B)?$", re.IGNORECASE)


def parse_size(text: str, flag: str, high: int = MAX_SIZE) -> int:
    """Bytes from 512M, 2G, 100MiB, 0 (powers of 1024), at most ``high``; USAGE otherwise."""
    m = _SIZE.match(text.strip())
    if not m:
        raise BadArguments(f"{flag} {shown(text, 40)} is not a size (like 512M or 2G)")
    unit = m.group(2).upper()
    size = int(m.group(1)) * (1024 ** ("KMGTP".index(unit) + 1) if unit else 1)
    if size > high:
        raise BadArguments(f"{flag} {shown(text, 40)} is more than {size_text(high)}")
    return size


def size_text(size: int) -> str:
    """``size`` in the largest power-of-1024 unit that divides it (1 TiB, 1536 MiB)."""
    for unit in ("PiB", "TiB", "GiB", "MiB", "KiB"):
        scale = 1024 ** ("KMGTP".index(unit[0]) + 1)
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


def print_table(header: list[str], rows: list[list[Any]]) -> None:
    # Client-supplied text (hostnames, messages) never reaches the terminal raw: no escape sequences, no forged lines.
    cells = [header, *[["-" if v is None else printable(str(v), 120) for v in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
