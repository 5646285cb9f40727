"""Waiting for a condition, for the labs, the tests and the benchmarks: polled often at first, then less (many
conditions run a command each time, a Python program that costs a good part of a CPU second)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(
    what: str, condition: Callable[[], Any], timeout: float = 20.0, every: float = 0.2, most: float = 1.0
) -> Any:
    """Poll ``condition`` until it is truthy (returned) or ``timeout`` passes (AssertionError naming ``what``): first
    after ``every`` seconds, each pause half as long again as the one before, at most ``most`` seconds."""
    deadline = time.monotonic() + timeout
    pause = every
    while True:
        value = condition()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(min(pause, left))
        pause = min(pause * 1.5, max(most, every))
