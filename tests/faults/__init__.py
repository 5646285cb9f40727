"""The test suite's fault injector and its record of the error IDs the suite saw (docs/architecture.md, "Fault
injection"). Never part of a product: agent/faults.py's fault points do nothing until this module installs itself,
in the pytest process (tests/conftest.py) and in every Python the suite starts (site/sitecustomize.py, on the
PYTHONPATH that tests/conftest.py sets for the session).

What a process does is read from its environment, which only the suite sets:

- ``MOBILITY_TEST_FAULTS``: a JSON plan. ``{"kill": {"bootstrap.step": 3}}`` SIGKILLs the process the 3rd time it
  reaches that fault point; ``{"kill_at": {"update.step": {"step": "linked"}}, "once": DIR}`` SIGKILLs it where the
  point's context matches, once per DIR (a marker there says it happened: the processes that take over, which
  inherit the plan, run through); ``{"grow": DIR}`` makes the daemon's ``daemon.tick`` take a request left in
  DIR/grow (a number of MiB): it allocates and touches that much real memory, held until the process ends or
  re-executes itself, then removes the request (the test waits for that); ``{"signal_at": {"failover.step": {"step":
  "mounted"}}, "signum": 15}`` makes the process send itself that signal where the point's context matches (its
  handlers run as for a signal from outside: SIGTERM from systemd, Ctrl-C); ``{"fail_while": {"replication.step":
  FILE}}`` raises an unexpected exception (RuntimeError) at that point each time it is reached while FILE exists;
  ``{"refuse": {"repo.serve": DIR}}`` makes the server answer 503 SERVER-BUSY where it reaches that point, as many
  times as the number left in DIR/refuse (counted down; none while the file is absent): a repository that refuses
  the first tries; ``{"delay_while": {"process.verify": FILE}, "delay": 2.0}`` sleeps that many seconds at that point
  each time it is reached while FILE exists (a slow process server).
- ``MOBILITY_TEST_RECORD``: a directory; each process appends to ``<pid>.ids`` every error ID it raises (each once).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

PLAN = "MOBILITY_TEST_FAULTS"
RECORD = "MOBILITY_TEST_RECORD"
MIB = 1024 * 1024
SITE = Path(__file__).resolve().parent / "site"

_ERROR_LINE = re.compile(r"^error ([A-Z][A-Z0-9-]+): ", re.M)


class Injector:
    def __init__(self, plan: Mapping[str, Any]) -> None:
        self.kill: dict[str, int] = dict(plan.get("kill", {}))
        self.kill_at: dict[str, dict[str, object]] = dict(plan.get("kill_at", {}))
        self.once = Path(plan["once"]) if plan.get("once") else None
        self.grow = Path(plan["grow"]) if plan.get("grow") else None
        self.signal_at: dict[str, dict[str, object]] = dict(plan.get("signal_at", {}))
        self.signum = int(plan.get("signum", signal.SIGTERM))
        self.fail_while: dict[str, Path] = {k: Path(v) for k, v in plan.get("fail_while", {}).items()}
        self.refuse: dict[str, Path] = {name: Path(d) for name, d in plan.get("refuse", {}).items()}
        self.delay_while: dict[str, Path] = {k: Path(v) for k, v in plan.get("delay_while", {}).items()}
        self.delay = float(plan.get("delay", 1.0))
        self.seen: dict[str, int] = {}
        self.held: list[bytearray] = []  # the memory grown on request: real, resident, never freed

    def __call__(self, name: str, context: Mapping[str, object]) -> None:
        self.seen[name] = self.seen.get(name, 0) + 1
        if self.kill.get(name) == self.seen[name]:
            os.kill(os.getpid(), signal.SIGKILL)
        where = self.kill_at.get(name)
        if where is not None and all(context.get(k) == v for k, v in where.items()):
            if self.once is not None:
                marker = self.once / f"killed-{name}"
                try:
                    marker.touch(exist_ok=False)
                except FileExistsError:
                    return
            os.kill(os.getpid(), signal.SIGKILL)
        where = self.signal_at.get(name)
        if where is not None and all(context.get(k) == v for k, v in where.items()):
            os.kill(os.getpid(), self.signum)
        failing = self.fail_while.get(name)
        if failing is not None and failing.exists():
            raise RuntimeError(f"a failure injected at {name}")
        if name in self.refuse:
            self._refuse(self.refuse[name] / "refuse")
        slow = self.delay_while.get(name)
        if slow is not None and slow.exists():
            time.sleep(self.delay)
        if name == "daemon.tick" and self.grow is not None:
            request = self.grow / "grow"
            try:
                mib = int(request.read_text())
            except (OSError, ValueError):
                return
            block = bytearray(mib * MIB)
            block[::4096] = b"\1" * (len(block) // 4096)  # touch every page: resident, as a leak would be
            self.held.append(block)
            request.unlink()

    @staticmethod
    def _refuse(counter: Path) -> None:
        """Answer 503 while the counter says so (the server's request handlers run one at a time on its loop)."""
        try:
            left = int(counter.read_text())
        except (OSError, ValueError):
            return
        if left <= 0:
            return
        counter.write_text(str(left - 1))
        from server.errors import ServerBusy

        raise ServerBusy(f"the repository refuses this request (a test's fault plan, {left - 1} more)", retry_after=1)


class ErrorRecord:
    """Appends each error ID this process constructs, once, to DIR/<pid>.ids (written at once: a process may end
    by SIGKILL or os._exit)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.seen: set[str] = set()

    def add(self, code: str) -> None:
        if code and code not in self.seen:
            self.seen.add(code)
            try:
                with (self.directory / f"{os.getpid()}.ids").open("a") as f:
                    f.write(code + "\n")
            except OSError:  # never the product's failure: the catalogue check reports what went unrecorded
                pass


_records: list[ErrorRecord] = []


def record_errors(directory: Path) -> Callable[[], None]:
    """Every MobilityError made in this process from now on is recorded in ``directory`` (until the returned
    function is called)."""
    from agent.shared.errors import MobilityError

    record = ErrorRecord(directory)
    _records.append(record)
    original = MobilityError.__init__
    if not getattr(original, "_recorded", False):

        def __init__(self: MobilityError, message: str, *, fix: str | None = None) -> None:
            original(self, message, fix=fix)
            for each in _records:
                each.add(type(self).code)

        __init__._recorded = True  # type: ignore[attr-defined]
        MobilityError.__init__ = __init__  # type: ignore[method-assign]
    return lambda: _records.remove(record)


def record_printed(directory: Path, text: str) -> None:
    """The IDs in ``error <ID>:`` lines a program printed (the frozen programs' launchers, which run no Python)."""
    record = ErrorRecord(directory)
    for code in _ERROR_LINE.findall(text):
        record.add(code)


def record_output(*texts: str | bytes | None) -> None:
    """record_printed into the session's record (a no-op outside the suite)."""
    if os.environ.get(RECORD):
        for text in texts:
            if text:
                record_printed(
                    Path(os.environ[RECORD]), text if isinstance(text, str) else text.decode(errors="replace")
                )


def recorded(directory: Path) -> set[str]:
    return {line for f in directory.glob("*.ids") for line in f.read_text().split()}


def install_from_environment(environ: Mapping[str, str] = os.environ) -> None:
    """What site/sitecustomize.py runs at the start of every Python the suite starts."""
    if environ.get(RECORD):
        record_errors(Path(environ[RECORD]))
    if environ.get(PLAN):
        from agent.faults import set_injector

        set_injector(Injector(json.loads(environ[PLAN])))


def environment(**plan: Any) -> dict[str, str]:
    """os.environ plus a fault plan, for one subprocess."""
    return {**os.environ, PLAN: json.dumps(plan)}
