from __future__ import annotations

import datetime as dt

import pytest

from agent.shared import timefmt


def test_a_moment_is_shown_in_utc_to_the_second() -> None:
    assert timefmt.shown(1_700_000_000.7) == "2023-11-14 22:13:20Z"
    assert timefmt.shown(dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)) == "2026-01-02 03:04:05Z"
    assert timefmt.shown(None) == "never" and timefmt.shown(None, never="-") == "-"


@pytest.mark.parametrize("t", [1e300, -1e300, float("inf"), float("nan"), 1e20])
def test_a_number_no_calendar_holds_is_shown_as_such(t: float) -> None:
    """A peer's time stored before the wire bounded it: a listing shows it, never raises."""
    assert timefmt.shown(t).startswith("not a time (")
