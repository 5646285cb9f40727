"""How Mobility writes a moment, everywhere: UTC, to the second. ``shown`` for people (tables, status, messages,
logs), ``iso`` for records and log files that programs read back (ISO 8601, ``Z``)."""

from __future__ import annotations

import datetime as dt


def _utc(t: float | dt.datetime) -> dt.datetime:
    return t.astimezone(dt.UTC) if isinstance(t, dt.datetime) else dt.datetime.fromtimestamp(t, dt.UTC)


def shown(t: float | dt.datetime | None, never: str = "never") -> str:
    """``2026-11-26 16:19:36Z``; ``never`` for None. A number no calendar holds (a peer's ``1e300``, NaN: stored
    before bounds were checked, or from a clock gone wrong) is shown as such, never an exception in a listing."""
    if t is None:
        return never
    try:
        return _utc(t).strftime("%Y-%m-%d %H:%M:%SZ")
    except (OverflowError, OSError, ValueError, TypeError):
        return f"not a time ({str(t)[:24]})"


def iso(t: float | dt.datetime) -> str:
    """``2026-11-26T16:19:36Z`` (datetime.fromisoformat reads it back)."""
    return _utc(t).strftime("%Y-%m-%dT%H:%M:%SZ")
