"""Change tracking from the kernel's block tracepoints, in user space: a tracefs instance of our own (so nobody
else's tracing is disturbed), the ``block_rq_complete`` event filtered to the protected disks' writes, discards and
write-zeroes, read from the instance's ``trace_pipe`` by one thread that marks the disks' dirty maps.

Why completions and not ``block_bio_queue``: a write is queued before its data reaches the device; a chunk read
between the two would be read old and then never seen again. Every completion that happens after a chunk was
cleared for reading marks it dirty again, so what the replica holds can only be behind, never silently wrong.
Partition I/O is traced on the whole disk (requests carry disk sectors), so partitions need no mapping; the
partition devices are in the filter too for kernels that report them.

Loss is detectable: the ring buffer reports every overrun as ``[LOST n EVENTS]``, and that (like any gap in
reading) means a checksum resync. ``drain`` writes a marker into the instance and waits until the reader has seen
it: every write completed before the call is then in the dirty maps (how a point knows its residual).

A clean stop of the agent keeps the instance tracing (``stop(keep=True)``): the writes made while the agent is down
(an upgrade's restart, a restart by the operator) wait in the kernel's buffer, after a marker with a nonce that the
stopping agent records. The next agent adopts the instance (``adopt``) and reads on; only if it finds that very
marker before its own first drain marker, with nothing lost, did it see every write since the stop, and the disks
need no resync. A removed or recreated instance (a reboot, another tool), a full buffer, or no marker: resync."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import select
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import EventsLost, InternalError, TraceUnparsable, TracingUnavailable
from agent.faults import fault_point
from agent.host.proc import run
from agent.replication.dirtymap import DirtyMap
from agent.shared.errors import MobilityError
from agent.shared.textsafe import shown

log = logging.getLogger("mobility.replication")

TRACEFS = Path("/sys/kernel/tracing")
DEBUGFS = Path("/sys/kernel/debug")
EVENT = "block/block_rq_complete"
SECTOR = 512
_EVENT_RE = re.compile(rb"block_rq_complete: (\d+),(\d+) (\S*) (?:\(.*?\) )?(\d+) \+ (\d+)")
STOP_DRAIN_SECONDS = 3.0  # a stop reads what is in the buffer up to its marker for at most this long...
STOP_JOIN_SECONDS = 1.0  # ...and waits this long for the reader to end (it polls every 0.2 s)
STOP_REMOVE_SECONDS = 1.0  # ...and, when it keeps nothing, this long to remove the instance
STOP_SECONDS = STOP_DRAIN_SECONDS + STOP_JOIN_SECONDS + STOP_REMOVE_SECONDS  # the longest ``stop`` takes
MAX_LINE = 4096  # no line of ours is that long: a longer one is not ours (and counts as not understood)
_MARKER_RE = re.compile(rb"mobility-drain-(\d+)")
_STOPPED_RE = re.compile(rb"mobility-stopped-([0-9a-f]{32})")
_LOST_RE = re.compile(rb"\[LOST (\d+) EVENTS\]")


def trace_dev(major: int, minor: int) -> int:
    """The kernel's internal dev_t, as the tracepoint's ``dev`` field holds it."""
    return (major << 20) | minor


def event_filter(devs: Iterable[int]) -> str:
    """Writes, discards and write-zeroes (rwbs W, D, N) of the given devices; reads never reach us."""
    devices = " || ".join(f"dev == {d}" for d in sorted(set(devs)))
    return f'({devices}) && rwbs ~ "*[WDN]*"' if devices else "dev == 0"


@dataclass(frozen=True)
class Parsed:
    events: list[tuple[int, int, int]]  # (dev, first sector, sectors)
    lost: int
    markers: list[int]
    stopped: list[str] = field(default_factory=list)  # clean-stop markers (their nonces)
    unknown: int = 0  # lines that are none of the above: writes may hide in them
    sample: bytes = b""  # the first of them, for the operator


def parse(chunk: bytes) -> Parsed:
    """The events, lost counts and markers in a run of trace_pipe lines (pure). A line that is neither an event of
    ours, nor a loss report, nor a marker written to the instance counts as ``unknown``: if the kernel's format
    differs, the writes are in such lines, and not seeing them must not look like an idle disk."""
    events: list[tuple[int, int, int]] = []
    markers: list[int] = []
    stopped: list[str] = []
    lost = unknown = 0
    sample = b""
    for line in chunk.split(b"\n"):
        if not line.strip():
            continue
        m = _EVENT_RE.search(line)
        if m is not None:
            major, minor, _rwbs, sector, count = m.groups()
            events.append((trace_dev(int(major), int(minor)), int(sector), int(count)))
            continue
        if b"tracing_mark_write: " in line:  # our markers; anything else written to our instance is no write
            if (d := _MARKER_RE.search(line)) is not None:
                markers.append(int(d.group(1)))
            elif (st := _STOPPED_RE.search(line)) is not None:
                stopped.append(st.group(1).decode())
            continue
        if (lo := _LOST_RE.search(line)) is not None:
            lost += int(lo.group(1))
            continue
        unknown += 1
        sample = sample or line[:300]
    return Parsed(events, lost, markers, stopped, unknown, sample)


def _unparsable(n: int, sample: bytes) -> TraceUnparsable:
    return TraceUnparsable(
        f"{n} trace line{'s' if n > 1 else ''} the agent does not understand (writes may be in them), such as "
        f"{shown(sample.decode(errors='replace'), 160)}"
    )


@dataclass
class TracedDevice:
    """Where a device's writes go: a disk's dirty map (its chunks and sub-blocks), its chunk size, and the sector
    offset of a partition."""

    dirty: DirtyMap
    chunk_size: int
    start_sector: int = 0
    on_lost: Callable[[], None] | None = None


def tracing_root() -> Path:
    """The tracing directory: tracefs, mounted if it is not (debugfs's tracing on kernels without tracefs)."""
    if (TRACEFS / "instances").is_dir():
        return TRACEFS
    with contextlib.suppress(MobilityError):
        run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], timeout=10, check=False)
    if (TRACEFS / "instances").is_dir():
        return TRACEFS
    old = DEBUGFS / "tracing"
    if not (old / "instances").is_dir():
        with contextlib.suppress(MobilityError):
            run(["mount", "-t", "debugfs", "nodev", str(DEBUGFS)], timeout=10, check=False)
    if (old / "instances").is_dir():
        return old
    raise TracingUnavailable("neither tracefs (/sys/kernel/tracing) nor debugfs tracing could be mounted")


def instance_name(state_dir: Path) -> str:
    """One instance per agent state directory: a restarted agent finds and replaces its predecessor's."""
    return "mobility-" + hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]


class Tracer(threading.Thread):
    """Reads the instance's trace_pipe and marks dirty maps; ``on_lost`` is called with the error each time writes
    may have gone unseen (an overrun, lines it does not understand, a failed read or a defect). With ``adopt``
    (the nonce a clean stop left), an instance still tracing is kept and read on from where the last agent
    stopped; ``continuous`` then says whether it saw that stop's marker with nothing lost."""

    def __init__(
        self, name: str, buffer_kb: int, on_lost: Callable[[MobilityError], None], *, adopt: str | None = None
    ) -> None:
        super().__init__(name="replication-tracer", daemon=True)
        self.root = tracing_root()
        self.dir = self.root / "instances" / name
        self.buffer_kb = buffer_kb
        self.on_lost = on_lost
        self.targets: dict[int, TracedDevice] = {}
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._marker = 0
        self._seen = 0
        self._cond = threading.Condition()
        self.lost_total = 0
        self.events_total = 0
        self.fd = -1
        self.adopted = adopt is not None and self._adopt()
        self._expect = adopt if self.adopted else None
        self._stop_seen = False
        self._lost_before_stop = False
        self._targets_set = threading.Event()  # events are read only once the disks they mark are known
        if not self.adopted:
            self._create()

    # The instance -----------------------------------------------------------------------------------------------

    def _adopt(self) -> bool:
        """Keep the instance a clean stop left tracing, if it still is; False to start a new one."""
        try:
            on = (self.dir / "tracing_on").read_text().strip() == "1"
            enabled = (self.dir / "events" / EVENT / "enable").read_text().strip() == "1"
            if not (on and enabled):
                return False
            self.fd = os.open(self.dir / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False
        return True

    @property
    def adopted_marker(self) -> str | None:
        """The clean stop's nonce when its instance was adopted (the disks check their own against it)."""
        return self._expect

    @property
    def continuous(self) -> bool:
        """Whether every write since the last agent's clean stop was seen (meaningful after a ``drain``)."""
        return self.adopted and self._stop_seen and not self._lost_before_stop and not self.lost_total

    def _create(self) -> None:
        if self.dir.exists():
            remove_instance(self.dir)
        try:
            self.dir.mkdir()
            (self.dir / "buffer_size_kb").write_text(f"{self.buffer_kb}\n")
            (self.dir / "events" / EVENT / "filter").write_text(event_filter([]) + "\n")
            (self.dir / "events" / EVENT / "enable").write_text("1\n")
            (self.dir / "tracing_on").write_text("1\n")
            self.fd = os.open(self.dir / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            remove_instance(self.dir)
            raise TracingUnavailable(f"{self.dir}: {e.strerror or e}") from e

    def set_targets(self, targets: dict[int, TracedDevice]) -> None:
        """Trace exactly these devices from now on (the filter swaps atomically in the kernel)."""
        with self._lock:
            self.targets = dict(targets)
        (self.dir / "events" / EVENT / "filter").write_text(event_filter(targets) + "\n")
        self._targets_set.set()

    # Reading ----------------------------------------------------------------------------------------------------

    def run(self) -> None:
        rest = b""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while not self._targets_set.wait(0.2):  # an adopted backlog waits for the maps it belongs to
            if self._halt.is_set():
                return
        while not self._halt.is_set():
            fault_point("replication.trace")  # the suite makes the tracer die here
            try:
                data = os.read(self.fd, 1 << 17)
            except BlockingIOError:
                poller.poll(200)
                continue
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                log.error("trace_pipe read failed: %s; every protected disk needs a resync", e.strerror)
                self._lost(EventsLost(f"reading the kernel's trace events failed: {e.strerror or e}"))
                time.sleep(1)
                continue
            if not data:
                poller.poll(200)
                continue
            buf = rest + data
            cut = buf.rfind(b"\n") + 1
            if not cut:
                rest = buf
                if len(rest) > MAX_LINE:  # not a line of ours: whatever it was, it was not understood
                    self._lost(_unparsable(1, rest[:300]))
                    rest = b""
                continue
            rest = buf[cut:]
            try:
                self._apply(parse(buf[:cut]), time.monotonic())
            except Exception as e:  # a defect: the events of this read are not in the maps, and say so
                log.error("the tracer failed on what it read: %s: %s", type(e).__name__, e, exc_info=e)
                self._lost(InternalError(f"the tracer failed: {type(e).__name__}: {e}"[:400]))

    def _apply(self, parsed: Parsed, now: float) -> None:
        with self._lock:
            targets = self.targets
        writes: dict[int, list[tuple[int, int]]] = {}  # per dirty map: one lock and one pass for a whole read
        maps: dict[int, DirtyMap] = {}
        for dev, sector, count in parsed.events:
            target = targets.get(dev)
            if target is None or count <= 0:
                continue
            key = id(target.dirty)
            maps[key] = target.dirty
            writes.setdefault(key, []).append(((sector + target.start_sector) * SECTOR, count * SECTOR))
        for key, found in writes.items():
            maps[key].mark_bytes(found, now)
        self.events_total += len(parsed.events)
        if self._expect is not None and self._expect in parsed.stopped:
            self._stop_seen = True
        if (parsed.lost or parsed.unknown) and self._expect is not None and not self._stop_seen:
            self._lost_before_stop = True
        if parsed.lost:
            self._lost(EventsLost(f"the kernel dropped {parsed.lost} trace events: writes may have been missed"))
        if parsed.unknown:
            self._lost(_unparsable(parsed.unknown, parsed.sample))
        if parsed.markers:
            with self._cond:
                self._seen = max(self._seen, *parsed.markers)
                self._cond.notify_all()

    def _lost(self, error: MobilityError) -> None:
        self.lost_total += 1
        self.on_lost(error)

    def drain(self, timeout: float, cancel: threading.Event | None = None) -> bool:
        """Wait until every event before this call has been applied (True), or ``timeout`` or ``cancel`` (False)."""
        with self._cond:
            self._marker += 1
            marker = self._marker
        try:
            (self.dir / "trace_marker").write_text(f"mobility-drain-{marker}\n")
        except OSError:
            return False
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._seen < marker:
                left = deadline - time.monotonic()
                if left <= 0 or (cancel is not None and cancel.is_set()) or not self.is_alive():
                    return self._seen >= marker
                self._cond.wait(min(left, 0.05))
        return True

    def stop(self, *, keep: str | None = None) -> bool:
        """Stop reading. Without ``keep``, remove the instance (nothing of ours stays in the kernel). With ``keep``
        (a nonce), read up to now, stop, and leave the instance tracing after a clean-stop marker carrying it; True
        when that worked (the next agent can then adopt it)."""
        drained = keep is not None and self.is_alive() and self.drain(STOP_DRAIN_SECONDS)
        self._halt.set()
        if self.is_alive():
            self.join(timeout=STOP_JOIN_SECONDS)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if drained:
            try:
                (self.dir / "trace_marker").write_text(f"mobility-stopped-{keep}\n")
                return True
            except OSError:
                pass
        remove_instance(self.dir, STOP_REMOVE_SECONDS)
        return False


def remove_instance(path: Path, wait: float = 5.0) -> None:
    """Disable the instance's events and remove it (an instance with readers or enabled events is busy: tried for
    ``wait`` seconds)."""
    with contextlib.suppress(OSError):
        (path / "tracing_on").write_text("0\n")
    with contextlib.suppress(OSError):
        (path / "events" / EVENT / "enable").write_text("0\n")
    for _ in range(max(1, int(wait * 10))):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    log.warning("cannot remove the tracing instance %s (still busy); the next start replaces it", path)


def remove_leftover(state_dir: Path) -> None:
    """Remove the instance a clean stop left tracing for this state directory, if there is one (protection ended
    while the agent was down, or the agent is uninstalled). Mounts nothing."""
    for root in (TRACEFS, DEBUGFS / "tracing"):
        path = root / "instances" / instance_name(state_dir)
        if path.is_dir():
            remove_instance(path)
