"""Retrying what a busy or unreachable server refused, without a thousand clones retrying in step.

Full jitter (each wait drawn uniformly between 0 and a capped exponential bound): clones of one template that boot
in the same second spread their retries instead of hitting the server together again. A server that says how long
to wait (503 or 429 with Retry-After) is honoured: the wait is at least that, plus the jitter."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from agent.errors import RemoteBusy, ServerUnreachable, TufFetchFailed
from agent.shared.errors import MobilityError

T = TypeVar("T")
BACKOFF_START, BACKOFF_CAP = 1.0, 30.0
_RETRIED = (ServerUnreachable, TufFetchFailed, RemoteBusy)


def next_wait(attempt: int, retry_after: float | None, draw: Callable[[float, float], float] = random.uniform) -> float:
    """The wait before retry ``attempt`` (0-based): full jitter over min(cap, start * 2**attempt), after
    Retry-After if the server gave one (pure, given ``draw``)."""
    bound = min(BACKOFF_CAP, BACKOFF_START * 2**attempt)
    return (retry_after or 0.0) + draw(0.0, bound)


def with_backoff(
    what: str,
    action: Callable[[], T],
    retry_for: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    draw: Callable[[float, float], float] = random.uniform,
    retried: tuple[type[MobilityError], ...] = _RETRIED,
) -> T:
    """``action`` retried on temporary failures (an unreachable server, a failed download, a 503 with Retry-After)
    for at most ``retry_for`` seconds; then the last failure, saying that a later run will retry. A 429 (rate
    limited) is not retried here: the command exits 75 and the next run comes after the limit."""
    deadline = clock() + retry_for
    attempt = 0
    while True:
        try:
            return action()
        except retried as e:
            if isinstance(e, RemoteBusy) and e.status != 503:
                raise  # 429: more attempts now would only extend the limit; a later run retries after it
            left = deadline - clock()
            wait = next_wait(attempt, e.retry_after if isinstance(e, RemoteBusy) else None, draw)
            if left <= 0 or (isinstance(e, RemoteBusy) and wait > left):
                if isinstance(e, RemoteBusy):
                    raise
                raise type(e)(f"{e.message} (gave up {what} after {retry_for:.0f} s; a later run will retry)") from e
            sleep(min(wait, left))
            attempt += 1
