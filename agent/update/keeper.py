"""The watcher's keeper where no init system restarts it (SysV, none): a forked child that outlives the watcher and, if
the watcher dies without ending its upgrade (kill -9, the OOM killer, an error it did not survive), becomes the
watcher again. Under systemd the unit's ``Restart=on-failure`` does this.

Without it, a watcher killed in the health window of a version that crashes at start would leave that version alone:
nothing else runs on the machine to start a watcher again (the new daemon dies before its first heartbeat, and the
previous one is gone) until the next boot. The keeper holds nothing: it forks before the update lock is taken and
closes every inherited descriptor, so a watcher that takes over is never kept waiting by it; a watcher that ends its
run (committed, rolled back, failed, postponed) stops its keeper first, so a postponed upgrade is not tried again at
once. Killing both at once is a power cut: the daemon or the boot resumes the upgrade."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence

from agent.host.paths import Paths
from agent.host.proc import host_environ

TAKEOVER_DELAY = 2.0  # seconds after the watcher's end before the keeper takes over (a supervisor's restart delay)
MAX_TAKEOVER_DELAY = 300.0  # a watcher that keeps dying is started again ever more slowly, up to this


@contextlib.contextmanager
def kept(paths: Paths, argv: Sequence[str], *, poll: float = 0.5) -> Iterator[int]:
    """Run the block with a keeper (its PID is the block's value): if this process dies in it, the keeper runs
    ``argv`` (this watcher again) when the upgrade is still unfinished and no other watcher runs. A block that
    returns stops the keeper; one that raises leaves it to take over."""
    watcher = os.getpid()  # before the fork: a watcher killed at once must not leave the keeper watching init
    keeper = os.fork()
    if keeper == 0:  # the child: tested through real processes (tests/agent/update/test_keeper.py)
        _keep(paths, list(argv), watcher, poll)
    yield keeper  # an exception leaves the keeper to take over
    _stop(keeper)


def _stop(keeper: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(keeper, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(keeper, 0)


def _keep(paths: Paths, argv: list[str], watcher: int, poll: float) -> None:
    """The keeper's whole life: never returns into the watcher's code."""
    try:
        os.closerange(3, _max_fd())
        _wait_for_end(watcher, poll, time.sleep)
        time.sleep(_delay(paths))
        if _takeover_due(paths):
            # This very watcher's program, as it was started, in the environment it was started in.
            os.execve(argv[0], argv, host_environ())  # noqa: S606
    finally:
        os._exit(0)


def _wait_for_end(watcher: int, poll: float, sleep: Callable[[float], None]) -> None:
    """Until the watcher is gone: this process is then re-parented (to init or a subreaper)."""
    while os.getppid() == watcher:
        sleep(poll)


def _delay(paths: Paths) -> float:
    """Longer each time the upgrade was taken over already: a watcher that dies at every start is not a busy loop."""
    from agent.update.state import load_record

    record = load_record(paths)
    resumes = record.resumes if record is not None else 0
    return float(min(TAKEOVER_DELAY * 1.5 ** min(resumes, 30), MAX_TAKEOVER_DELAY))


def _takeover_due(paths: Paths) -> bool:
    from agent.update.state import load_record, unfinished, updater_running

    return unfinished(load_record(paths)) and not updater_running(paths)


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (OSError, ValueError):
        return 1024
