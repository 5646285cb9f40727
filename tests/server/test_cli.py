from __future__ import annotations

import pytest

from server.cli import parse_duration
from server.errors import BadDuration


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("30m", 1800), (" 12h ", 43200), ("7d", 604800)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0h", "12", "h", "1.5h", "-1d", "1w", "12 h", "1hm"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(BadDuration):
        parse_duration(text)
