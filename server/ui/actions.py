"""The changes the dashboard can make: pause and resume a machine's protection, start a test failover of its newest
point, halt the running rollout. Each is written to the audit log first (who, from where, what, on what), made, and
its outcome recorded; a change that fails records its error ID. The same storage calls the command line makes do
the work, so a change means the same from both.

A test failover runs as `mobility-server test-failover` in a child process (it checks the point's filesystems in a
throwaway VM for minutes, and stops that VM on SIGTERM): one at a time per instance, stopped with the server, its
result recorded as a job by the command itself, like one started from a shell."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.shared.errors import MobilityError
from agent.shared.textsafe import printable
from server.database.operators import Operators
from server.database.storage import Storage
from server.datadir import DataDir
from server.errors import MachineNotFound, ProtectDiskInvalid, TestFailoverRunning, UiNoStore
from server.process.service import store_dir
from server.releases.rollouts import Rollouts
from server.ui.access import Who

log = logging.getLogger("mobility.server.ui")

MAX_REASON = 500
CHILD_OUTPUT = 1 << 20  # what is kept of a test failover's output
STOP_SECONDS = 60.0  # a test failover told to stop (the server stops) stops its VM and removes its scratch in this


@dataclass
class Running:
    host_id: str
    entry: int
    process: asyncio.subprocess.Process
    started: float


class Actions:
    def __init__(
        self,
        storage: Storage,
        operators: Operators,
        data: DataDir,
        database: str | None,
        clock: Callable[[], float],
    ) -> None:
        self.storage = storage
        self.operators = operators
        self.data = data
        self.database = database  # the --database serve was given (a URL without a password), for the child
        self.clock = clock
        self.running: Running | None = None
        self._waiter: asyncio.Task[None] | None = None

    def _target(self, host_id: str) -> str:
        machine = self.storage.machine(host_id)
        if machine is None:
            raise MachineNotFound(f"no machine {printable(host_id, 80)} is registered")  # the operator's refusal
        return f"{printable(machine.hostname, 100)} ({machine.host_id})"

    def _audited(self, who: Who, action: str, target: str, detail: str | None, change: Callable[[], str]) -> str:
        entry = self.operators.audit(who.operator, who.described, action, target, detail, self.clock())
        try:
            outcome = change()
        except MobilityError as e:
            self.operators.finish(entry, f"{e.id}: {e.message}", self.clock())
            raise
        except BaseException:
            self.operators.finish(entry, "failed: the server could not make the change", self.clock())
            raise
        self.operators.finish(entry, outcome, self.clock())
        return outcome

    def set_paused(self, who: Who, host_id: str, paused: bool) -> str:
        """Pause (or resume) a protected machine's replication (blocking: a worker thread)."""
        target = self._target(host_id)

        def change() -> str:
            if not self.storage.change_protection(host_id, self.clock(), paused=paused):
                raise ProtectDiskInvalid(f"{target} is not protected")
            return "done"

        return self._audited(who, "pause protection" if paused else "resume protection", target, None, change)

    def halt(self, who: Who, reason: str) -> str:
        """Halt the running rollout, with the operator's reason (blocking)."""
        reason = printable(reason.strip(), MAX_REASON) or "no reason given"
        text = f"halted by {who.operator} from the dashboard: {reason}"

        def change() -> str:
            rollout, _ = Rollouts(self.storage).halt(text, self.clock())
            return f"done: rollout {rollout.rollout_id} halted"

        return self._audited(who, "halt rollout", "the running rollout", reason, change)

    async def start_test_failover(self, who: Who, host_id: str, offload: Callable[..., Any]) -> int:
        """Start a test failover of the machine's newest point; returns its audit entry (the result follows it)."""
        if self.running is not None:
            raise TestFailoverRunning(f"the test failover of {self.running.host_id} started here is still running")
        if not (store_dir(self.data) / "index.db").exists():
            raise UiNoStore(f"no chunk store under {store_dir(self.data)} on this instance")
        target = await offload(self._target, host_id)
        if self.running is not None:  # another request started one while this one looked the machine up
            raise TestFailoverRunning(f"the test failover of {self.running.host_id} started here is still running")
        now = self.clock()
        entry: int = await offload(
            self.operators.audit, who.operator, who.described, "start test failover", target, "point latest", now
        )
        argv = [sys.executable, "-m", "server", "test-failover", "--data", str(self.data.root), "--machine", host_id,
                "--point", "latest", "--json", *(["--database", self.database] if self.database else [])]  # fmt: skip
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
        except OSError as e:
            await offload(self.operators.finish, entry, f"failed: could not start: {e.strerror}", self.clock())
            raise
        self.running = Running(host_id, entry, process, self.clock())
        self._waiter = asyncio.get_running_loop().create_task(self._wait(offload))
        log.info("test failover of %s started by %s (%s)", target, printable(who.operator, 100), who.described)
        return entry

    async def _wait(self, offload: Callable[..., Any]) -> None:
        running = self.running
        if running is None:
            return
        try:
            _, err = await asyncio.gather(_bounded(running.process.stdout), _bounded(running.process.stderr))
            code = await running.process.wait()
            outcome = _outcome(code, err)
            with contextlib.suppress(MobilityError):
                await offload(self.operators.finish, running.entry, outcome, self.clock())
            log.info("test failover of %s: %s", running.host_id, outcome)
        finally:
            self.running = None

    async def close(self) -> None:
        """Stop a running test failover (it releases what it made) and wait for it."""
        running, waiter = self.running, self._waiter
        if running is None:
            return
        with contextlib.suppress(ProcessLookupError):
            running.process.terminate()
        try:
            await asyncio.wait_for(running.process.wait(), STOP_SECONDS)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                running.process.kill()
            await running.process.wait()
        if waiter is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(waiter, 10)


async def _bounded(stream: asyncio.StreamReader | None) -> bytes:
    """All of a child's output, keeping the first CHILD_OUTPUT bytes (the rest is read and dropped)."""
    if stream is None:
        return b""
    kept = bytearray()
    while chunk := await stream.read(65536):
        if len(kept) < CHILD_OUTPUT:
            kept += chunk[: CHILD_OUTPUT - len(kept)]
    return bytes(kept)


_ERROR_LINE = re.compile(r"^error ([A-Z][A-Z0-9-]{0,63}): (.*)$", re.M)


def _outcome(code: int, err: bytes) -> str:
    """What the audit log says of a finished test failover: PASSED, or the error ID and message the command printed
    (its ``error ID: message`` line on stderr)."""
    if code == 0:
        return "done: PASSED"
    text = err.decode(errors="replace")
    found = _ERROR_LINE.search(text)
    if found:
        return f"{found.group(1)}: {printable(found.group(2), 500)}"
    lines = text.strip().splitlines()
    return f"failed (exit {code}): {printable(lines[-1], 500) if lines else 'no output'}"
