"""Cutting a crash-consistent recovery point across every protected disk of the machine.

The whole job holds off upgrades and rollbacks (``version_hold``: the agent never switches versions and restarts
under a point), and no point starts while one switches (the point fails at once; the next is cut after the
restart).

1. Pre-copy: wait (bounded) until the disks' dirty maps hold little, so the freeze is short, or until what they hold
   stops shrinking (writes spread over a large area change chunks as fast as they are sent). What is left is then
   captured in a bounded freeze: the point is cut only when reading it is expected to take at most ``MAX_FREEZE``
   seconds at the rate past captures reached (nothing is compressed or sent during a freeze).
2. App-consistent hooks: /etc/mobility/freeze.d/* ``pre`` (the post hooks always run).
3. Freeze every filesystem whose writes reach the protected disks (mounted from them, their partitions, or LVM and
   md devices stacked on them), all at once (FIFREEZE). First they are recorded under /run (agent/replication/
   frozen.py), so that if this process dies inside the freeze, the unit's ExecStopPost and the next start thaw
   them; a watchdog thread thaws them after 10 s whatever happens. Nothing between freeze and thaw writes a file
   or a log line: the state directory and the logs may be on a frozen filesystem, and a write there would block
   until the thaw.
4. Drain the tracer (every write completed before the freeze is now in the dirty maps) and have each disk's
   thread read its residual: the chunks changed since they were last read, hashed, their records held in memory
   (nothing from the process server is waited for while frozen; this thread and the capture's run at the normal
   priority until the thaw).
5. Thaw. Each disk then sends its residual, waits until the process server verified it (a delta refused now fails
   the point: its chunk goes whole, and the next point has it) and closes the point on its stream with the root hash
   of its chunk hashes at the freeze; the process server accepts it only if its replica has the same root.

A disk without a mounted filesystem cannot be frozen: its point is consistent only if it was idle (no write in the
second before the freeze nor during the capture), labelled ``raw-idle``, else ``raw-busy``.

A point is cancellable (``cancel``: the agent stops): every wait in it gives up within a tenth of a second, a pre
hook is killed, the filesystems are thawed at once, and the post hooks still run, for at most
``STOP_HOOK_SECONDS`` together; ``CANCEL_SECONDS`` bounds it all."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import FreezeFailed, PointFailed, UpdateBusy
from agent.faults import fault_point
from agent.host.paths import Paths
from agent.host.proc import run
from agent.replication.devices import freeze, full_priority, lower_priority, mounts_of, read_block_tree, thaw
from agent.replication.frozen import forget_frozen, record_frozen
from agent.replication.sync import PREPARE_SECONDS, Capture, DiskReplicator
from agent.replication.tracing import Tracer
from agent.shared.errors import MobilityError
from agent.shared.replication_wire import NextPoint, weakest_consistency
from agent.update.state import version_hold

log = logging.getLogger("mobility.replication")

WATCHDOG_SECONDS = 10.0
PRECOPY_BYTES = 16 * 1024 * 1024  # the residual a freeze reads: small enough for a freeze well under a second
PRECOPY_TIMEOUT = 60.0
PRECOPY_PLATEAU = 5.0  # the residual has not shrunk for this long: the pre-copy cannot do better
MAX_FREEZE = 5.0  # seconds a freeze may be expected to last (as VSS's flush-and-hold, under its 10 s limit)
CAPTURE_DEADLINE = 8.0  # seconds after the freeze by which every disk must have read its residual
# Bytes of changed sub-blocks per second assumed before a capture was measured, at the least. A capture reads the
# whole chunk of each changed sub-block: 2 MB/s of 4 KiB sub-blocks is 500 chunks a second.
MIN_CAPTURE_RATE = 2e6
ACK_TIMEOUT = 120.0
HOOK_TIMEOUT = 60.0
STOP_HOOK_SECONDS = 5.0  # what the post hooks of a cancelled point get, together
CANCEL_SECONDS = STOP_HOOK_SECONDS + 1.0  # from ``cancel`` to the end of the point, at most


class CaptureRate:
    """How fast a freeze's residual was read and sent (bytes per second, a moving average of the captures large
    enough to measure it), to foresee how long the next freeze would last."""

    def __init__(self) -> None:
        self.rate: float | None = None

    def expect(self, pending: int, sending: float) -> float:
        """Seconds to capture ``pending`` bytes; before any measurement, from the rate the disks send at now
        (a freeze captures faster: the applications wait, nothing is compressed)."""
        return pending / self.rate_for(sending)

    def rate_for(self, sending: float) -> float:
        return self.rate if self.rate is not None else max(MIN_CAPTURE_RATE, 1.5 * sending)

    def measured(self, nbytes: int, seconds: float) -> None:
        if nbytes >= PRECOPY_BYTES and seconds > 0:
            rate = nbytes / seconds
            self.rate = rate if self.rate is None else 0.5 * self.rate + 0.5 * rate


SETTLE_SECONDS = 1.0  # a pre-copy that keeps up leaves about this long of changes for the freeze
CONVERGES = 1.05  # sending this much faster than the writes change: the pre-copy shrinks what is changed


def plan_point(pending: int, dirty_bps: float, send_bps: float, capture: CaptureRate) -> NextPoint:
    """The next point as the measured rates foresee it (pure): the residual its freeze would capture and how long
    that takes, and why it should wait when that is longer than MAX_FREEZE. While replication sends faster than the
    writes change data, a pre-copy brings what is changed down to about a second of writes; otherwise what is changed
    now stays, and grows while the pre-copy waits for it to stop shrinking."""
    converging = send_bps > CONVERGES * dirty_bps
    residual = dirty_bps * SETTLE_SECONDS if converging else pending + dirty_bps * PRECOPY_PLATEAU
    expected = capture.expect(int(residual), send_bps)
    postponed = None
    if expected > MAX_FREEZE:
        if not converging:
            why = (
                f"the writes change {dirty_bps / 1e6:.1f} MB/s and replication sends {send_bps / 1e6:.1f} MB/s: "
                f"{int(residual) >> 20} MiB would still be changed"
            )
        else:
            why = f"{int(residual) >> 20} MiB would be captured at {capture.rate_for(send_bps) / 1e6:.1f} MB/s"
        postponed = f"expected freeze {expected:.1f} s, more than {MAX_FREEZE:.0f} s: {why}"
    return NextPoint(round(expected * 1000, 1), dirty_bps, send_bps, postponed)


@dataclass(frozen=True)
class FrozenMount:
    """A filesystem a point froze: where it is mounted, its type and the protected disks its writes reach (more than
    one for a volume group over several disks)."""

    mount: str
    fstype: str
    disks: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {"mount": self.mount, "type": self.fstype, "disks": list(self.disks)}

    def __str__(self) -> str:
        return f"{self.mount} ({self.fstype} on {', '.join(self.disks)})"


def frozen_mounts(mounts: dict[str, list[tuple[str, str]]]) -> list[FrozenMount]:
    """Per mount point, its type and the disks (by protected name) whose ``mounts_of`` found it (pure)."""
    found: dict[str, tuple[str, list[str]]] = {}
    for disk, on_disk in mounts.items():
        for point, fstype in on_disk:
            found.setdefault(point, (fstype, []))[1].append(disk)
    return [FrozenMount(point, fstype, tuple(sorted(disks))) for point, (fstype, disks) in sorted(found.items())]


@dataclass
class PointResult:
    ok: bool
    point_id: str | None = None
    created: float | None = None
    consistency: str | None = None
    freeze_ms: float | None = None
    frozen_at: float | None = None  # wall clock
    thawed_at: float | None = None
    residual_chunks: int = 0
    error: str | None = None
    message: str | None = None
    frozen: list[FrozenMount] = field(default_factory=list)  # what the freeze covered

    def to_json(self) -> dict[str, object]:
        return {**self.__dict__, "frozen": [m.to_json() for m in self.frozen]}


class Freezer:
    """Freezes filesystems all at once; ``thaw`` (or, after ``limit`` seconds, the watchdog) thaws them. With
    ``paths``, they are recorded before the first freeze and the record goes after the thaw."""

    def __init__(
        self, mount_points: Sequence[str], limit: float = WATCHDOG_SECONDS, paths: Paths | None = None
    ) -> None:
        self.mount_points = list(mount_points)
        self.limit = limit
        self.paths = paths
        self.fds: list[int] = []
        self.lock = threading.Lock()
        self.thawed = False
        self.watchdog_fired = False
        self._done = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="freeze-watchdog", daemon=True)

    def freeze(self) -> None:
        self._watchdog.start()  # first: whatever happens below, a thaw is coming
        if self.paths is not None and self.mount_points:
            try:
                record_frozen(self.paths, self.mount_points)  # durable before any FIFREEZE
            except OSError as e:
                self.thaw()
                raise FreezeFailed(f"cannot record the filesystems to freeze: {e.strerror or e}") from e
        for point in self.mount_points:
            try:
                fd = freeze(point)
            except OSError as e:
                self.thaw()
                raise FreezeFailed(f"cannot freeze {point}: {e.strerror}") from e
            with self.lock:
                if self.thawed:  # the watchdog already thawed (a freeze that took 10 s)
                    thaw(fd)
                    raise FreezeFailed(f"freezing {point} took longer than {self.limit:.0f} s")
                self.fds.append(fd)

    def _watch(self) -> None:
        if not self._done.wait(self.limit):
            # No logging before the thaw: the log may be on a frozen filesystem.
            with self.lock:
                self.watchdog_fired = not self.thawed
            self.thaw()

    def thaw(self) -> bool:
        """Thaw everything frozen; True if the filesystems were thawed here, before the watchdog did it."""
        with self.lock:
            first = not self.thawed
            self.thawed = True
            fds, self.fds = self.fds, []
            for fd in fds:
                with contextlib.suppress(OSError):  # nothing better to do; the next start thaws again
                    thaw(fd)
            if first and self.paths is not None and self.mount_points:
                forget_frozen(self.paths)
        self._done.set()
        return first and not self.watchdog_fired


def _hooks(freeze_dir: Path) -> list[Path]:
    try:
        return sorted(p for p in freeze_dir.iterdir() if p.is_file() and os.access(p, os.X_OK))
    except OSError:
        return []


def _run_hooks(hooks: Sequence[Path], phase: str, cancel: threading.Event | None = None) -> bool:
    """Run each hook with ``phase``; with ``cancel``, a hook is killed when the point is cancelled."""
    ok = True
    for hook in hooks:
        if cancel is not None and cancel.is_set():
            return False
        try:
            run([str(hook), phase], timeout=HOOK_TIMEOUT, cancel=cancel)
        except MobilityError as e:
            log.warning("freeze hook %s %s failed: %s", hook.name, phase, e.message)
            ok = False
    return ok


def _post_hooks(hooks: Sequence[Path], cancel: threading.Event) -> None:
    """The post hooks always run; when the point was cancelled (the agent stops), within STOP_HOOK_SECONDS."""
    if not cancel.is_set():
        _run_hooks(hooks, "post")
        return
    deadline = time.monotonic() + STOP_HOOK_SECONDS
    for hook in hooks:
        left = deadline - time.monotonic()
        if left <= 0:
            log.warning("freeze hook %s post not run: the agent is stopping", hook.name)
            continue
        try:
            run([str(hook), "post"], timeout=left, cancel=threading.Event())
        except MobilityError as e:
            log.warning("freeze hook %s post failed: %s", hook.name, e.message)


def _wait(event: threading.Event, seconds: float, cancel: threading.Event) -> bool:
    """``event.wait(seconds)`` that gives up as soon as the point is cancelled."""
    deadline = time.monotonic() + seconds
    while not event.is_set():
        left = deadline - time.monotonic()
        if left <= 0 or cancel.is_set():
            return False
        event.wait(min(left, 0.05))
    return True


def cut_point(
    replicators: Sequence[DiskReplicator],
    tracer: Tracer,
    paths: Paths,
    *,
    watchdog: float = WATCHDOG_SECONDS,
    precopy_timeout: float = PRECOPY_TIMEOUT,
    frozen: Callable[[bool], None] = lambda _: None,
    capture_rate: CaptureRate | None = None,
    cancel: threading.Event | None = None,
) -> PointResult:
    """Cut one point across ``replicators`` and wait until the process server has it (PointResult either way);
    ``cancel`` ends it early, thawed, within CANCEL_SECONDS."""
    not_ready = [r.device.name for r in replicators if r.state != "CONTINUOUS" or r.need_sweep]
    if not replicators or not_ready:
        return _failed(PointFailed(f"not every protected disk is in CONTINUOUS: {', '.join(not_ready) or 'none'}"))
    try:
        with version_hold(paths):
            return _cut(
                replicators,
                tracer,
                paths,
                watchdog,
                precopy_timeout,
                frozen,
                capture_rate or CaptureRate(),
                cancel or threading.Event(),
            )
    except UpdateBusy:
        return _failed(PointFailed("the agent is switching versions: the point is cut after the restart"))


def _stopping() -> PointFailed:
    return PointFailed("the agent is stopping: the point was abandoned (the next start cuts the next one)")


def _cut(
    replicators: Sequence[DiskReplicator],
    tracer: Tracer,
    paths: Paths,
    watchdog: float,
    precopy_timeout: float,
    frozen: Callable[[bool], None],
    capture_rate: CaptureRate,
    cancel: threading.Event,
) -> PointResult:
    created = time.time()
    pending = _precopy(replicators, precopy_timeout, cancel)
    if cancel.is_set():
        return _failed(_stopping())
    # In the residual's units (bytes of changed sub-blocks), as the plan foresaw it: the acknowledged rate counts whole
    # chunks, sixteen times a 4 KiB delta's bytes.
    sending = sum(r.send_bps for r in replicators)
    expected = capture_rate.expect(pending, sending) if pending > PRECOPY_BYTES else 0.0
    if expected > MAX_FREEZE:
        # The applications would wait that long for the residual: no point now; the next interval tries again.
        return _failed(
            PointFailed(
                f"{pending >> 20} MiB still changed after the pre-copy: capturing them would freeze the filesystems "
                f"for about {expected:.0f} s (more than {MAX_FREEZE:.0f} s); no freeze"
            )
        )
    with open("/proc/self/mountinfo") as f:
        mountinfo = f.read()
    tree = read_block_tree()
    mounts = {r.device.name: mounts_of(r.device, mountinfo, tree) for r in replicators}
    covered = frozen_mounts(mounts)
    points = [m.mount for m in covered]
    hooks = _hooks(paths.freeze_dir)
    app = bool(hooks) and _run_hooks(hooks, "pre", cancel)
    if cancel.is_set():
        _post_hooks(hooks, cancel)
        return _failed(_stopping())
    point_id = str(uuid.uuid4())
    disks = tuple(r.device.name for r in replicators)
    captures = [Capture(point_id, created, disks) for _ in replicators]
    for r, c in zip(replicators, captures, strict=True):
        r.commands.put(c)  # each disk sends what it read and has it verified, then waits for the freeze
    prepare_by = time.monotonic() + PREPARE_SECONDS + 2
    for c in captures:
        _wait(c.ready, prepare_by - time.monotonic(), cancel)
    errors = [c.error for c in captures if c.error is not None]
    unready = [r.device.name for r, c in zip(replicators, captures, strict=True) if not c.ready.is_set()]
    if cancel.is_set() or errors or unready:
        _post_hooks(hooks, cancel)
        unprepared = errors[0] if errors else PointFailed(f"{', '.join(unready)} did not get ready for the freeze")
        return _abort(captures, replicators, _stopping() if cancel.is_set() else unprepared)
    freezer = Freezer(points, watchdog, paths)
    events_before = [r.dirty.events for r in replicators]
    start = time.monotonic()
    for r in replicators:
        r.hashes.hold()
    frozen(True)  # the daemon writes no status file from here to the thaw
    frozen_at = time.time()
    full_priority()  # until the thaw: the applications wait for this thread
    try:
        try:
            freezer.freeze()
        except FreezeFailed as e:
            freezer.thaw()
            return _abort(captures, replicators, e)
        froze_in = time.monotonic() - start
        fault_point("replication.frozen", mounts=len(points))  # the suite kills the daemon inside the freeze here
        if not tracer.drain(watchdog / 2, cancel):
            freezer.thaw()
            return _abort(
                captures,
                replicators,
                _stopping() if cancel.is_set() else PointFailed("the tracer did not drain in time"),
            )
        drained_in = time.monotonic() - start - froze_in
        for c in captures:
            c.go.set()
        deadline = start + min(CAPTURE_DEADLINE, watchdog - 1)
        for c in captures:
            _wait(c.captured, deadline - time.monotonic(), cancel)
        captured_in = time.monotonic() - start
        in_time = freezer.thaw()
    finally:
        freezer.thaw()
        frozen(False)
        lower_priority()
    thawed_at = time.time()
    freeze_ms = (time.monotonic() - start) * 1000
    thawed_in = freeze_ms / 1000 - captured_in
    if hooks:
        _post_hooks(hooks, cancel)
    for r in replicators:
        r.hashes.release()
    if cancel.is_set():
        return _abort(captures, replicators, _stopping(), freeze_ms)
    late = [r.device.name for r, c in zip(replicators, captures, strict=True) if not c.captured.is_set()]
    errors = [c.error for c in captures if c.error is not None]
    if not in_time or late or errors:
        if late and not errors:  # it took longer than the freeze may: the next estimate knows it was slower still
            capture_rate.measured(pending, captured_in)
        why = errors[0].message if errors else f"{', '.join(late) or 'a disk'} did not capture within the freeze"
        return _abort(captures, replicators, PointFailed(why), freeze_ms)
    capture_rate.measured(sum(c.residual_bytes for c in captures), captured_in)
    tracer.drain(5.0, cancel)
    labels = []
    for r, found, before in zip(replicators, (mounts[r.device.name] for r in replicators), events_before, strict=True):
        if found:
            labels.append("app-consistent" if app else "crash-consistent")
        else:
            idle = r.dirty.events == before and start - r.dirty.last_event >= 1.0
            labels.append("raw-idle" if idle else "raw-busy")
    for c, label in zip(captures, labels, strict=True):
        c.label = label
        c.closing.set()
    deadline = time.monotonic() + ACK_TIMEOUT
    for r, c in zip(replicators, captures, strict=True):
        if not _wait(c.acked, deadline - time.monotonic(), cancel) or not c.point_ok:
            if cancel.is_set():
                return _failed(_stopping())
            if c.failure is not None:
                return _failed(PointFailed(c.failure), freeze_ms)
            return _failed(PointFailed(f"the process server did not acknowledge point {point_id} of {r.device.name}"))
    for r in replicators:
        r.persisted.last_point = created
    weakest = weakest_consistency(labels)
    slowest = max(captures, key=lambda c: sum(c.phases.values()))
    log.info(
        "point %s cut (%s): froze %s for %.0f ms (freeze %.0f, tracer %.0f, %s, thaw %.0f), %d residual chunks (%d "
        "KiB of changed sub-blocks); deltas refused so far: %d",
        point_id,
        weakest,
        "; ".join(map(str, covered)) or "no filesystem",
        freeze_ms,
        froze_in * 1000,
        drained_in * 1000,
        ", ".join(f"{k} {v * 1000:.0f}" for k, v in slowest.phases.items()),
        thawed_in * 1000,
        sum(c.residual for c in captures),
        sum(c.residual_bytes for c in captures) >> 10,
        sum(r.refusals for r in replicators),
    )
    return PointResult(
        True,
        point_id,
        created,
        weakest,
        round(freeze_ms, 1),
        frozen_at,
        thawed_at,
        sum(c.residual for c in captures),
        frozen=covered,
    )


def _precopy(replicators: Sequence[DiskReplicator], timeout: float, cancel: threading.Event) -> int:
    """Wait (bounded) until little is left to send, or until it stops shrinking; returns the bytes still changed."""
    now = time.monotonic()
    deadline = now + timeout
    best, best_at = None, now
    while True:
        # What a freeze would read: the sub-blocks still changed. Frames not acknowledged yet are no part of it: the
        # freeze waits for nothing from the process server (the residual is sent after the thaw).
        pending = sum(r.dirty.pending_bytes() for r in replicators)
        now = time.monotonic()
        if best is None or pending < 0.95 * best:
            best, best_at = pending, now
        if pending <= PRECOPY_BYTES or now >= deadline or now - best_at >= PRECOPY_PLATEAU or cancel.is_set():
            return pending
        cancel.wait(0.05)


def _abort(
    captures: Sequence[Capture], replicators: Sequence[DiskReplicator], error: MobilityError, freeze_ms: float = 0.0
) -> PointResult:
    for r in replicators:
        r.hashes.release()
    for c in captures:
        c.label = None
        c.closing.set()
    result = _failed(error)
    result.freeze_ms = round(freeze_ms, 1) if freeze_ms else None
    return result


def _failed(error: MobilityError, freeze_ms: float = 0.0) -> PointResult:
    log.warning("no point: %s: %s", error.id, error.message)
    return PointResult(False, error=error.id, message=error.message, freeze_ms=round(freeze_ms, 1) or None)
