"""Replication as the daemon runs it: what the server asks to protect (from each heartbeat answer), one tracer for
the machine's protected disks, one replicator thread per disk, points on the policy's interval (or on request:
`mobility point`), and the status `mobility status` and the heartbeat report.

The daemon's loop only calls ``apply``, ``tick``, ``report`` and ``stop``; each returns at once except ``stop``, which
takes at most STOP_SECONDS (a point in progress is cancelled, the disks' threads end, the tracing is kept). Reading
disks, hashing, compressing, sending and freezing happen in the replication threads, at a lower priority.

The threads are supervised: each tick looks at the tracer and every disk's thread, and one that ended unexpectedly
is started again, its disks resynchronised and shown with REPL-INTERNAL (a disk's thread also survives an unexpected
exception of its own the same way). Each disk's stream belongs to its thread: the daemon's thread only asks it to
move to another process server address (``DiskReplicator.retarget``)."""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import InternalError
from agent.host.paths import Paths
from agent.replication import tracing
from agent.replication.devices import all_disks, device_size, lower_priority, partitions, resolve_disk
from agent.replication.points import CANCEL_SECONDS, CaptureRate, PointResult, cut_point, plan_point
from agent.replication.state import (
    answer_request,
    disk_dir,
    forget_tracing_stop,
    load_tracing_stop,
    pending_requests,
    save_status,
    save_tracing_stop,
)
from agent.replication.stream import Stream
from agent.replication.sync import POOL_JOBS, DiskReplicator, release_readers
from agent.replication.tracing import TracedDevice, Tracer, instance_name, trace_dev
from agent.shared.address import ServerAddress
from agent.shared.errors import MobilityError
from agent.shared.replication_wire import DiskReport, NextPoint, Protection, ReplicationReport

log = logging.getLogger("mobility.replication")

STATUS_SECONDS = 2.0
RESIZE_CHECK_SECONDS = 10.0
REQUEST_POLL_SECONDS = 2.0
POSTPONE_SECONDS = 5.0  # a point postponed for a freeze too long is looked at again this soon
RESTART_SECONDS = 2.0  # a thread that ended unexpectedly is started again at most this often
DISK_STOP_SECONDS = 5.0  # every disk's thread ends within this once stopped (its stream is broken off)
# The longest ``stop`` takes: a point cancelled, the disks' threads ended, the tracing kept, the status written.
STOP_SECONDS = CANCEL_SECONDS + 0.5 + DISK_STOP_SECONDS + tracing.STOP_SECONDS + 1.0


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass
class Failed:
    """A disk the server asked for that cannot be replicated here (shown with its error, retried)."""

    name: str
    error: MobilityError
    since: float = field(default_factory=time.time)

    def report(self) -> DiskReport:
        return DiskReport(self.name, "STALLED", error=self.error.id, detail=self.error.message[:500])


class Replication:
    def __init__(
        self,
        paths: Paths,
        context: Callable[[], ssl.SSLContext],
        server_host: str,
        *,
        trace_buffer_kb: int = 4096,
        busy_share: float = 0.8,
    ) -> None:
        self.paths = paths
        self.context = context
        self.server_host = server_host
        self.trace_buffer_kb = trace_buffer_kb
        self.busy_share = busy_share
        self.protection: Protection | None = None
        self.replicators: dict[str, DiskReplicator] = {}
        self.failed: dict[str, Failed] = {}
        self.tracer: Tracer | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.point_thread: threading.Thread | None = None
        self._cancel = threading.Event()  # the running point's: set when the agent stops or protection changes
        self._restart_at: dict[str, float] = {}  # monotonic time before which a dead thread is not restarted
        self.last_result: PointResult | None = None
        self.last_point_at = time.monotonic()
        self.freezing = False
        self.points_cut = 0
        self.started = time.time()
        self._requests: list[str] = []
        self._taken: set[str] = set()  # requests a point is being cut for (their files stay until it is done)
        self._next_status = 0.0
        self._ended_shown = True
        self._next_resize = 0.0
        self._next_requests = 0.0
        self._adopt_checked = False
        self.capture_rate = CaptureRate()
        self.next_point: NextPoint | None = None
        self._postponed_shown: str | None = None
        self._lock = threading.Lock()

    # What to protect --------------------------------------------------------------------------------------------

    def apply(self, protection: Protection | None) -> None:
        """The heartbeat answer's protection (None: nothing). Starts, stops and retunes replicators; the status file
        says what changed at the next tick (a disk no longer protected is no longer shown)."""
        previous, self.protection = self.protection, protection
        if protection is None:
            if previous is not None:
                log.info("protection removed: replication stops")
            self._ended_shown = False  # the next tick writes a status without the disks
            self._stop_all()
            forget_tracing_stop(self.paths)
            return
        wanted = list(protection.disks) if not protection.all_disks else all_disks()
        for name in list(self.replicators):
            if name not in wanted:
                log.info("%s is no longer protected", name)
                self._stop_one(name)
                self._next_status = 0.0
        for name in list(self.failed):
            if name not in wanted:
                del self.failed[name]
                self._next_status = 0.0
        address = self._address(protection)
        started = [r for name in wanted if name not in self.replicators and (r := self._make_one(name, address))]
        for r in self.replicators.values():
            self._tune(r, protection, address)
        if started:
            self._next_status = 0.0
            self._retarget()  # tracking is on before the first chunk is read
            self._check_adopted(started)
            for r in started:
                self._run_one(r)

    @staticmethod
    def _tune(r: DiskReplicator, protection: Protection, address: ServerAddress) -> None:
        """The policy onto a disk's thread (it applies them itself: its stream is its own)."""
        r.paused = protection.paused
        r.bandwidth = protection.policy.bandwidth_bps
        r.retarget(address)

    def _address(self, protection: Protection) -> ServerAddress:
        return ServerAddress(protection.process.host or self.server_host, protection.process.port)

    def _start_one(self, name: str, address: ServerAddress, failure: MobilityError | None = None) -> None:
        r = self._make_one(name, address)
        if r is not None:
            if self.protection is not None:
                self._tune(r, self.protection, address)
            if failure is not None:
                r.flag_resync(failure.id, failure.message, from_replica=True)
            self._retarget()
            self._run_one(r)

    def _make_one(self, name: str, address: ServerAddress) -> DiskReplicator | None:
        """The disk's replicator, not started yet (None when the disk cannot be replicated here: ``failed``)."""
        try:
            device = resolve_disk(self.paths, name)
            if self.tracer is None:
                # A clean stop left its tracing on: adopt it (the writes since are in its buffer), once.
                adopt = load_tracing_stop(self.paths)
                forget_tracing_stop(self.paths)
                self.tracer = self._new_tracer(adopt)
            if self.pool is None:
                self.pool = ThreadPoolExecutor(
                    max_workers=POOL_JOBS, thread_name_prefix="replication-io", initializer=lower_priority
                )
            stream = Stream(address, self.context())
            replicator = DiskReplicator(
                device,
                disk_dir(self.paths, name),
                stream,
                self.pool,
                boot_id=boot_id(),
                context=self.context,
                busy_share=self.busy_share,
                kept_tracing=self.tracer.adopted_marker if not self._adopt_checked else None,
            )
        except MobilityError as e:
            if name not in self.failed or self.failed[name].error.id != e.id:
                log.warning("%s cannot be protected: %s: %s", name, e.id, e.message)
            self.failed[name] = Failed(name, e)
            return None
        except OSError as e:
            self.failed[name] = Failed(name, MobilityError(f"{name}: {e.strerror or e}"))
            return None
        self.failed.pop(name, None)
        self.replicators[name] = replicator
        return replicator

    def _new_tracer(self, adopt: str | None = None) -> Tracer:
        tracer = Tracer(instance_name(self.paths.state_dir), self.trace_buffer_kb, self._lost, adopt=adopt)
        tracer.start()
        return tracer

    def _check_adopted(self, started: list[DiskReplicator]) -> None:
        """The first start after a clean stop: every write since must be in the adopted tracing's buffer, or the
        disks that trusted it resync."""
        if self._adopt_checked or self.tracer is None:
            return
        self._adopt_checked = True
        if not self.tracer.adopted:
            return
        if self.tracer.drain(10.0) and self.tracer.continuous:
            log.info("the tracing kept since the last clean stop saw every write: no resync")
            return
        log.warning("the tracing kept since the last clean stop was interrupted: resynchronising")
        for r in started:
            if not r.need_sweep:
                r.tracing_interrupted()

    def _run_one(self, replicator: DiskReplicator) -> None:
        replicator.start()
        log.info(
            "%s protected (%s, %d chunks of %d KiB)",
            replicator.device.name,
            replicator.state,
            replicator.geometry.count,
            replicator.geometry.chunk_size // 1024,
        )

    def _stop_one(self, name: str) -> None:
        self._cancel_point()
        r = self.replicators.pop(name)
        r.stop()
        r.join(timeout=DISK_STOP_SECONDS)
        r.mark_clean_stop()
        release_readers(r.device.path)  # the pool goes on for the other disks: this one's device is let go now
        self._retarget()

    def _stop_all(self, *, keep_tracing: bool = False) -> None:
        """Stop every disk. With ``keep_tracing`` (the agent stops; the disks stay protected) the tracing goes on
        in the kernel and each disk in sync saves its dirty map, so the next start needs no resync; the status file
        then shows the disks as they were at the stop."""
        self._cancel_point()
        stopping = list(self.replicators.values())
        for r in stopping:  # all at once: each ends within a second or two once its stream is broken off
            r.stop()
        deadline = time.monotonic() + DISK_STOP_SECONDS
        for r in stopping:
            r.join(timeout=max(0.0, deadline - time.monotonic()))
        # The disks stay known until the tracer has drained: a loss it reads now still flags them for a resync.
        marker = None
        if self.tracer is not None:
            nonce = uuid.uuid4().hex
            # Every write up to here is in the dirty maps once the tracer has drained; the rest waits in the kernel.
            kept = self.tracer.stop(keep=nonce if keep_tracing and stopping else None)
            marker = nonce if kept else None
            self.tracer = None
        for r in stopping:
            if r.is_alive():
                log.warning("%s did not stop in %.0f s: the next start resyncs it", r.device.name, DISK_STOP_SECONDS)
            r.mark_clean_stop(marker if not r.is_alive() else None)
        if marker is not None:
            save_tracing_stop(self.paths, marker)
        if keep_tracing:
            with contextlib.suppress(OSError):
                self.save_status(time.time())
        self.replicators.clear()
        self.failed.clear()
        self._restart_at.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def _cancel_point(self) -> None:
        """End the point in progress (thawed, its post hooks run) before its disks stop: within CANCEL_SECONDS."""
        if self._point_running() and self.point_thread is not None:
            self._cancel.set()
            self.point_thread.join(timeout=CANCEL_SECONDS + 0.5)
            if self.point_thread.is_alive():
                log.warning("the point in progress did not end within %.0f s of being cancelled", CANCEL_SECONDS)

    def _retarget(self) -> None:
        if self.tracer is None:
            return
        targets: dict[int, TracedDevice] = {}
        for r in self.replicators.values():
            targets[trace_dev(r.device.major, r.device.minor)] = TracedDevice(r.dirty, r.geometry.chunk_size)
            for p in partitions(r.device):
                # Kernels that report partition I/O on the partition: its sectors start at the partition.
                targets[trace_dev(p.major, p.minor)] = TracedDevice(r.dirty, r.geometry.chunk_size, p.start_sector)
        self.tracer.set_targets(targets)

    def _lost(self, error: MobilityError) -> None:
        """The tracer's thread: writes may have gone unseen (``error`` says why); every disk is compared again."""
        for r in list(self.replicators.values()):
            r.flag_resync(error.id, error.message)

    def _supervise(self) -> None:
        """Start again a tracer or a disk's thread that ended without being stopped (a defect): never a dead thread
        that silently stops tracking or sending. What it missed is found by a resync; the disks show REPL-INTERNAL."""
        now = time.monotonic()
        if self.replicators and (self.tracer is None or not self.tracer.is_alive()):
            # No disk is in sync while nothing traces it: each tick flags them until a tracer runs again.
            failure: MobilityError = InternalError("the tracer stopped unexpectedly: writes may have gone unseen")
            for r in self.replicators.values():
                r.flag_resync(failure.id, failure.message)
            if now >= self._restart_at.get("", 0.0):
                self._restart_at[""] = now + RESTART_SECONDS
                log.error("%s: tracing starts again and every protected disk resyncs", failure.message)
                old, self.tracer = self.tracer, None
                if old is not None:
                    old.stop()
                try:
                    self.tracer = self._new_tracer()
                    self._retarget()
                except MobilityError as e:
                    log.error("the tracing cannot start again: %s: %s", e.id, e.message)
                    for r in self.replicators.values():
                        r.flag_resync(e.id, e.message)
        if self.protection is None:
            return
        for name, r in list(self.replicators.items()):
            if r.is_alive() or r.stopping.is_set() or now < self._restart_at.get(name, 0.0):
                continue
            self._restart_at[name] = now + RESTART_SECONDS
            failure = InternalError(f"{name}: its replication thread ended unexpectedly")
            log.error("%s: starting it again; the disk resyncs", failure.message)
            del self.replicators[name]
            r.stream.close()  # its owner is gone: nobody else uses it any more
            self._start_one(name, self._address(self.protection), failure)

    # The daemon's tick ------------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Cheap: supervise the threads, schedule points, pick up requests, notice resized disks, write the status
        file."""
        mono = time.monotonic()
        if self.protection is None and not self.failed:
            if not self._ended_shown and not self.freezing:  # once, after protection ended: no disk any more
                self._ended_shown = True
                self.save_status(now)
            return
        self._supervise()
        if mono >= self._next_resize:
            self._next_resize = mono + RESIZE_CHECK_SECONDS
            self._check_resize()
            for name in list(self.failed):
                if self.protection is not None and time.time() - self.failed[name].since > 30:
                    self._start_one(name, self._address(self.protection))
        if mono >= self._next_requests:
            self._next_requests = mono + REQUEST_POLL_SECONDS
            self.poll_requests()
        due = self.protection is not None and mono - self.last_point_at >= self.protection.policy.interval_seconds
        if due and not self._requests and not self._point_running() and self.replicators:
            plan = self.plan()
            if plan.postponed:
                # Planned, not hoped for: a point whose freeze would be too long waits (and says why) until the
                # measured rates let it fit; it is looked at again every few seconds, not at the next interval.
                if plan.postponed.split(":")[0] != (self._postponed_shown or "").split(":")[0]:
                    log.info("point postponed: %s", plan.postponed)
                self._postponed_shown = plan.postponed
                self.last_point_at = mono - self.protection.policy.interval_seconds + POSTPONE_SECONDS  # type: ignore[union-attr]
                due = False
            else:
                self._postponed_shown = None
        if (due or self._requests) and not self._point_running() and self.replicators:
            requests, self._requests = self._requests, []
            self._taken.update(requests)
            if due or requests:
                self.last_point_at = mono
                self._cancel = threading.Event()
                self.point_thread = threading.Thread(
                    target=self._cut, args=(requests, self._cancel), name="replication-point", daemon=True
                )
                self.point_thread.start()
        if mono >= self._next_status and not self.freezing:
            self._next_status = mono + STATUS_SECONDS
            self.save_status(now)

    def plan(self) -> NextPoint:
        """The next point as the disks' measured rates foresee it (agent/replication/points.py ``plan_point``)."""
        rs = list(self.replicators.values())
        plan = plan_point(
            sum(r.dirty.pending_bytes() for r in rs),
            sum(r.dirty_bps for r in rs),
            sum(r.send_bps for r in rs),
            self.capture_rate,
        )
        self.next_point = plan
        return plan

    def _point_running(self) -> bool:
        return self.point_thread is not None and self.point_thread.is_alive()

    def _cut(self, requests: list[str], cancel: threading.Event) -> None:
        lower_priority()
        replicators = list(self.replicators.values())
        if self.tracer is None or not replicators:
            result = PointResult(False, error="REPL-POINT-FAILED", message="nothing is protected")
        else:
            try:
                result = cut_point(
                    replicators,
                    self.tracer,
                    self.paths,
                    frozen=self._frozen,
                    capture_rate=self.capture_rate,
                    cancel=cancel,
                )
            except Exception as e:  # a defect: the point fails visibly, its requests are answered
                failure = InternalError(f"cutting the point failed: {type(e).__name__}: {e}"[:400])
                log.error("%s", failure.message, exc_info=e)
                result = PointResult(False, error=failure.id, message=failure.message)
            finally:
                self.freezing = False
        self.last_result = result
        if result.ok:
            self.points_cut += 1
            for r in replicators:
                r.save_state()
        for request in requests:
            answer_request(self.paths, request, result.to_json())
            self._taken.discard(request)

    def _frozen(self, frozen: bool) -> None:
        self.freezing = frozen

    def request_point(self) -> None:
        """SIGUSR2 (via the daemon's queue): look for `mobility point` requests now."""
        self.poll_requests()

    def poll_requests(self) -> None:
        for request in pending_requests(self.paths):
            if request not in self._requests and request not in self._taken:
                self._requests.append(request)
        if self._requests and not self.replicators:
            failed = PointResult(False, error="REPL-POINT-FAILED", message="no disk of this machine is protected")
            for request in self._requests:
                answer_request(self.paths, request, failed.to_json())
            self._requests = []

    def _check_resize(self) -> None:
        for r in list(self.replicators.values()):
            try:
                fd = os.open(r.device.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    size = device_size(fd)
                finally:
                    os.close(fd)
            except OSError:
                continue
            if size != r.geometry.size:
                log.warning("%s was resized (%d -> %d bytes): resynchronising", r.device.name, r.geometry.size, size)
                name = r.device.name
                self._stop_one(name)
                if self.protection is not None:
                    self._start_one(name, self._address(self.protection))

    # Reporting --------------------------------------------------------------------------------------------------

    def report(self) -> ReplicationReport:
        disks = [r.report() for r in self.replicators.values()] + [f.report() for f in self.failed.values()]
        last = self.last_result
        ok = last if last is not None and last.ok else None
        last_point = max((r.persisted.last_point or 0 for r in self.replicators.values()), default=0) or None
        plan = self.plan() if self.replicators else None
        if plan is not None and self._postponed_shown:
            plan = NextPoint(plan.expected_freeze_ms, plan.dirty_bps, plan.send_bps, self._postponed_shown)
        return ReplicationReport(
            tuple(sorted(disks, key=lambda d: d.disk)),
            last_point=last_point,
            last_point_id=ok.point_id if ok else None,
            points=self.points_cut,
            freeze_ms=ok.freeze_ms if ok else None,
            next_point=plan,
        )

    def status_doc(self, now: float | None = None) -> dict[str, Any]:
        """The report with what the health check weighs it against (the policy's RPO and interval)."""
        doc: dict[str, Any] = {"updated": now or time.time(), "started": self.started, **self.report().to_json()}
        if self.protection is not None:
            doc["rpo_seconds"] = self.protection.policy.rpo_seconds
            doc["interval_seconds"] = self.protection.policy.interval_seconds
        if self.last_result is not None:
            doc["last_result"] = self.last_result.to_json()
        return doc

    def save_status(self, now: float) -> None:
        try:
            save_status(self.paths, self.status_doc(now))
        except OSError as e:
            log.warning("cannot write the replication status: %s", e.strerror)

    def stop(self) -> None:
        """The agent stops (within STOP_SECONDS): a point in progress is cancelled, replication ends, the tracing of
        the protected disks goes on for the next start."""
        self._stop_all(keep_tracing=True)
