"""How `failover` and `test-failover` take SIGTERM, Ctrl-C (SIGINT) and a closed terminal (SIGHUP): as
FAILOVER-INTERRUPTED raised in the main thread, so that every ``finally`` runs and nothing they made is left (a tool
running then is killed and waited for first, server/process/commands.py). Where an exception must not land (while a
tool is being started, whose process would otherwise run on unwatched; while what was made is being released), the
signal waits, and is raised once that part is done. Python-level deferral, not the signal mask: a tool started
meanwhile inherits no blocked signals."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

from server.errors import FailoverInterrupted

STOPPING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _State:
    """The main thread's: which command takes signals now, whether they wait, and the one that waits."""

    command: str | None = None
    holding = 0
    pending: int | None = None


_state = _State()


def _interrupted(signum: int) -> FailoverInterrupted:
    return FailoverInterrupted(f"{_state.command or 'the command'} was stopped by {signal.Signals(signum).name}")


def _stop(signum: int, _frame: FrameType | None) -> None:
    if _state.holding:
        _state.pending = signum  # taken when the held part is done
        return
    raise _interrupted(signum)


@contextlib.contextmanager
def interruptible(command: str) -> Iterator[None]:
    """While the block runs, SIGTERM, SIGINT and SIGHUP raise FailoverInterrupted (the previous handlers come back
    after; a signal that waited in a held part is raised at the end). Only the main thread takes signals: elsewhere
    the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _stop) for sig in STOPPING}
    _state.command, _state.pending = command, None
    try:
        yield
    finally:
        with signals_held():
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        signum, _state.pending = _state.pending, None
        if signum is not None and sys.exc_info()[0] is None:
            raise _interrupted(signum)
        _state.command = None


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """A signal that would stop the command waits until the block is done (the mask is not touched: a tool started
    in the block inherits none), then is raised by ``take_signal`` or at the end of ``interruptible``."""
    _state.holding += 1
    try:
        yield
    finally:
        _state.holding -= 1


def take_signal() -> None:
    """Raise FailoverInterrupted now if a signal waited (outside a held part)."""
    if not _state.holding and _state.pending is not None:
        signum, _state.pending = _state.pending, None
        raise _interrupted(signum)
