"""One protected disk on the source: its state machine, the checksum sweep (initial sync and resync), continuous
replication from the dirty map, and its part in cutting a point. Runs in its own thread at a lower CPU and I/O
priority; reading, hashing and compressing run in a small shared pool (BLAKE3 and zstd release the GIL).

States: INITIAL_SYNC (the replica is new: every chunk that is not zero travels), RESYNC_REQUIRED (writes may have
been missed: lost trace events, an agent restart, a reboot, a resize, a replica that lost data), RESYNCING (the
sweep: each chunk's hash is compared with the replica's and only chunks that differ travel), CONTINUOUS (the
dirty map drives), PAUSED (by the operator: changes are tracked, nothing is sent), STALLED (no progress: the
process server is unreachable or refuses data; the message says why)."""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import ssl
import threading
import time
import weakref
from array import array
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from agent.errors import InternalError, ProcessServerUnreachable, RemoteError, ReplicaLost
from agent.faults import fault_point
from agent.replication.chunks import Geometry, RootHasher, chunk_hash, geometry_for, is_zero, zero_hash
from agent.replication.devices import BlockDevice, BusyMeter, DirectReader, full_priority, lower_priority
from agent.replication.dirtymap import FULL, DirtyMap
from agent.replication.hashfile import HashFile
from agent.replication.stream import Stream
from agent.shared.address import ServerAddress
from agent.shared.errors import MobilityError
from agent.shared.fsutil import atomic_write
from agent.shared.replication_wire import (
    HASH_SIZE,
    Codec,
    DiskReport,
    Hello,
    Kind,
    PointClose,
    ProtocolError,
    Record,
    batch_payload,
    full_mask,
    mask_spans,
)

log = logging.getLogger("mobility.replication")

BATCH_BYTES = 1024 * 1024  # one read (and one pool job) covers up to this many bytes of contiguous chunks
PIPELINE_BYTES = 4 * BATCH_BYTES  # bytes of jobs in the pool ahead of the sender (at least one job)
STALL_AFTER = 30.0  # seconds without progress while there is work before the state says STALLED
BUSY_SHARE = 0.8  # the rest of the machine using this share of all CPU makes replication slow down
PREPARE_SECONDS = 10.0  # before a freeze, a disk waits this long for the server to verify what it sent
CHECK_AFTER_THAW = 60.0  # after the thaw, a point waits this long for the server to verify its residual
CAPTURE_ROUNDS = 4  # reads of what a freeze finds changed (deltas refused meanwhile are read again, whole)
# A freeze's residual is kept in memory and sent after the thaw, up to this many bytes of records; what passes it is
# sent while frozen. Part of the daemon's 64 MiB, which a 4 KiB churn takes to 55-59 MiB without it.
CAPTURE_HOLD_BYTES = 8 * 1024 * 1024


_UNKNOWN = b"\xff" * HASH_SIZE  # a hash no chunk has: "the replica may not hold this chunk"


@dataclass
class ChunkOut:
    index: int
    hash: bytes
    codec: Codec
    payload: bytes
    size: int
    mask: int = 0  # a delta's sub-blocks (codec DELTA or DELTA_ZSTD)

    @property
    def delta(self) -> bool:
        return self.codec in (Codec.DELTA, Codec.DELTA_ZSTD)

    @property
    def sent_bytes(self) -> int:
        """The chunk's bytes this record carries, raw: its changed sub-blocks for a delta."""
        return self.delta_raw if self.delta else self.size

    delta_raw: int = 0  # a delta's sub-blocks, raw


@dataclass
class JobResult:
    first: int
    hashes: bytes  # every chunk of the job, in order
    out: list[ChunkOut]  # chunks whose hash differs from what the job was told the replica has
    since: float
    nbytes: int


@dataclass
class Capture:
    """A point being cut: what the coordinator and a disk's thread tell each other."""

    point_id: str
    created: float
    disks: tuple[str, ...]
    ready: threading.Event = field(default_factory=threading.Event)  # the disk sent and had verified all it read
    go: threading.Event = field(default_factory=threading.Event)  # frozen and the tracer drained: take the residual
    captured: threading.Event = field(default_factory=threading.Event)
    closing: threading.Event = field(default_factory=threading.Event)
    acked: threading.Event = field(default_factory=threading.Event)
    label: str | None = None  # set by the coordinator before ``closing``; None aborts the point
    point_ok: bool = False  # the process server acknowledged the point (``acked`` is set either way)
    root: str = ""
    residual: int = 0  # chunks
    residual_bytes: int = 0
    error: MobilityError | None = None
    failure: str | None = None  # why the disk did not close the point after the thaw (its residual not verified)
    phases: dict[str, float] = field(default_factory=dict)  # where the disk's capture spent its time, seconds


def job_chunks(geometry: Geometry) -> int:
    """Chunks per read (and per pool job): contiguous chunks up to BATCH_BYTES, and always one whole chunk (above
    1 TiB a chunk is 2 MiB and more, larger than a batch)."""
    return max(1, BATCH_BYTES // geometry.chunk_size)


def job_bytes(geometry: Geometry) -> int:
    """The largest read of a job: what a reader's buffer must hold for this geometry."""
    return job_chunks(geometry) * geometry.chunk_size


def pipeline_depth(geometry: Geometry) -> int:
    """Jobs the sender keeps ahead of itself: PIPELINE_BYTES of them, at least one (memory stays bounded when a job
    is one chunk of 16 MiB)."""
    return max(1, PIPELINE_BYTES // job_bytes(geometry))


_local = threading.local()
# Every reader the pool threads hold, by disk: a disk no longer replicated lets go of its device in every thread
# (release_readers), not only when the pool ends (a removed volume or a detached loop device must not stay open).
_open_readers: dict[Path, weakref.WeakSet[DirectReader]] = {}
_open_lock = threading.Lock()


def _reader(device: BlockDevice, nbytes: int) -> DirectReader:
    """Each pool thread reads each disk through its own descriptor and aligned buffer, large enough for ``nbytes``
    (a reader made for a smaller geometry, before a resize, is replaced; one closed by release_readers, reopened)."""
    readers: dict[Path, DirectReader] = getattr(_local, "readers", {})
    _local.readers = readers
    reader = readers.get(device.path)
    if reader is not None and (reader.closed or reader.capacity < nbytes):
        del readers[device.path]
        reader.close()
        reader = None
    if reader is None:
        reader = readers[device.path] = DirectReader(device.path, nbytes)
        with _open_lock:
            _open_readers.setdefault(device.path, weakref.WeakSet()).add(reader)
    return reader


def release_readers(path: Path) -> None:
    """Close every pool thread's reader of the disk at ``path`` (its replication ended). A read under way finishes
    first; a later job of the disk would open a new reader."""
    with _open_lock:
        readers = list(_open_readers.pop(path, ()))
    for reader in readers:
        reader.close()


def _zero(view: memoryview) -> bool:
    """Whether a chunk read into the buffer is all zero bytes, compared in pieces of at most a batch (a memoryview
    compares item by item, far slower than bytes; a piece's copy stays small whatever the chunk size)."""
    if view[:_PROBE].tobytes() != _ZERO_PROBE[: len(view)]:
        return False  # most data is not zero from its first bytes on: no copy of the chunk to find it
    return all(is_zero(view[i : i + BATCH_BYTES].tobytes()) for i in range(0, len(view), BATCH_BYTES))


_PROBE = 64
_ZERO_PROBE = bytes(_PROBE)


INCOMPRESSIBLE_RUN = 8  # chunks in a row that zstd could not shrink: stop trying...
PROBE_EVERY = 16  # ...but for one chunk in this many, to notice compressible data again


def _worth_compressing(device: BlockDevice) -> bool:
    """Whether to try zstd on this disk's next chunk in this thread: random or encrypted data (a large share of
    some disks) costs the compression's full CPU for nothing, so a run of chunks it did not shrink pauses it."""
    runs: dict[Path, int] = getattr(_local, "incompressible", {})
    _local.incompressible = runs
    run = runs.get(device.path, 0)
    if run < INCOMPRESSIBLE_RUN:
        return True
    runs[device.path] = run + 1
    return (run - INCOMPRESSIBLE_RUN) % PROBE_EVERY == PROBE_EVERY - 1


def _compressed(device: BlockDevice, shrank: bool) -> None:
    runs: dict[Path, int] = getattr(_local, "incompressible", {})
    _local.incompressible = runs
    if shrank:
        runs[device.path] = 0
    elif runs.get(device.path, 0) < INCOMPRESSIBLE_RUN:
        runs[device.path] = runs.get(device.path, 0) + 1


def _compressor() -> zstandard.ZstdCompressor:
    c: zstandard.ZstdCompressor | None = getattr(_local, "cctx", None)
    if c is None:
        c = _local.cctx = zstandard.ZstdCompressor(level=1, write_content_size=True)
    return c


DELTA_SHARE = 0.5  # a chunk changed in more than this share of its sub-blocks travels whole
RUNS_PER_JOB = 1  # a job reads up to this many batches' worth of chunks, in as many runs as they come in
POOL_JOBS = 3  # jobs in the pipeline at once, one per thread of the pool (agent/replication/engine.py)


def _read_runs(
    device: BlockDevice,
    geometry: Geometry,
    runs: list[tuple[int, int, list[int] | None]],
    known: bytes | None,
    since: float,
    compress: bool,
    dirty: DirtyMap | None,
    frozen: bool = False,
) -> list[JobResult]:
    """In the pool: ``read_job`` for each run, one after the other into this thread's buffer (each run's output is
    copied out of it before the next read). ``frozen``: a freeze's capture, at the normal priority meanwhile."""
    if not frozen:
        return [read_job(device, geometry, first, n, known, since, compress, masks, dirty) for first, n, masks in runs]
    full_priority()
    try:
        return [read_job(device, geometry, first, n, known, since, compress, masks, dirty) for first, n, masks in runs]
    finally:
        lower_priority()


def read_job(
    device: BlockDevice,
    geometry: Geometry,
    first: int,
    n: int,
    known: bytes | None,
    since: float,
    compress: bool = True,
    masks: list[int] | None = None,
    dirty: DirtyMap | None = None,
) -> JobResult:
    """In the pool: read ``n`` chunks from ``first``, hash them, and compress those whose hash is not ``known``
    (zstd level 1; raw when that does not shrink it or without ``compress``; zero chunks as markers). With ``masks``
    (the sub-blocks each chunk had changed when it was taken), a chunk changed in few sub-blocks becomes a delta: those
    sub-blocks only, and every sub-block ``dirty`` marked since (a write that completed before this read but was
    marked after the chunk was taken is in what was read: its sub-block must travel with it)."""
    offset = geometry.offset(first)
    length = sum(geometry.length(i) for i in range(first, first + n))
    data = _reader(device, job_bytes(geometry)).read(offset, length)  # a view of this thread's buffer
    if masks is not None and dirty is not None:
        masks = [a | b for a, b in zip(masks, dirty.masks_of(first, n), strict=True)]
    hashes = bytearray()
    out: list[ChunkOut] = []
    pos = 0
    cs = geometry.chunk_size
    for k in range(n):
        i = first + k
        size = geometry.length(i)
        chunk = data[pos : pos + size]
        pos += size
        zero = _zero(chunk)  # memcmp: an empty disk's zeros are never hashed
        digest = zero_hash(size) if zero else chunk_hash(chunk)
        hashes += digest
        if known is not None and known[k * HASH_SIZE : (k + 1) * HASH_SIZE] == digest:
            continue
        if zero:
            out.append(ChunkOut(i, digest, Codec.ZERO, b"", size))
            continue
        mask = masks[k] & full_mask(size, cs) if masks is not None else 0
        if mask and mask != full_mask(size, cs):
            spans = mask_spans(mask, size, cs)
            raw = sum(m for _, m in spans)
            if raw <= DELTA_SHARE * size:
                blocks = b"".join(chunk[a : a + m] for a, m in spans)
                if compress and _worth_compressing(device):
                    small = _compressor().compress(blocks)
                    _compressed(device, len(small) < raw)
                    if len(small) < raw:
                        out.append(ChunkOut(i, digest, Codec.DELTA_ZSTD, small, size, mask, raw))
                        continue
                out.append(ChunkOut(i, digest, Codec.DELTA, blocks, size, mask, raw))
                continue
        packed = None
        if compress and _worth_compressing(device):
            packed = _compressor().compress(chunk)
            _compressed(device, len(packed) < size)
        if packed is not None and len(packed) < size:
            out.append(ChunkOut(i, digest, Codec.ZSTD, packed, size))
        else:
            out.append(ChunkOut(i, digest, Codec.RAW, chunk.tobytes(), size))  # out of the buffer the next read reuses
    return JobResult(first, bytes(hashes), out, since, length)


class DeferredHashes:
    """The hash file, with writes held in memory while a point is being cut: the state directory may be on a
    filesystem that is frozen, and a write to it would block until the thaw. The coordinator holds before it
    freezes and releases after it thawed."""

    def __init__(self, hashes: HashFile) -> None:
        self.file = hashes
        self.held: dict[int, bytes] | None = None
        self.lock = threading.Lock()

    def read(self, first: int, n: int) -> bytes:
        with self.lock:
            data = self.file.read(first, n)
            if not self.held:
                return data
            buf = bytearray(data)
            found = (
                [(i, self.held[i]) for i in range(first, first + n) if i in self.held]
                if n < len(self.held)
                else [(i, h) for i, h in self.held.items() if first <= i < first + n]
            )
            for i, h in found:
                buf[(i - first) * HASH_SIZE : (i - first + 1) * HASH_SIZE] = h
            return bytes(buf)

    def write(self, first: int, hashes: bytes) -> None:
        with self.lock:
            if self.held is None:
                self.file.write(first, hashes)
                return
            for k in range(len(hashes) // HASH_SIZE):
                self.held[first + k] = hashes[k * HASH_SIZE : (k + 1) * HASH_SIZE]

    def hold(self) -> None:
        with self.lock:
            if self.held is None:
                self.held = {}

    def release(self) -> None:
        with self.lock:
            held, self.held = self.held, None
            for i, h in sorted((held or {}).items()):
                self.file.write(i, h)

    def root(self) -> str:
        g = self.file.geometry
        hasher = RootHasher(g)
        step = 32768
        for start in range(0, g.count, step):
            hasher.update(self.read(start, min(step, g.count - start)))
        return hasher.hexdigest()


@dataclass
class DiskState:
    """What survives a restart of the agent (state.json next to the hash file)."""

    disk: str
    size: int = 0
    chunk_size: int = 0
    synced: bool = False  # a sweep completed at least once: the replica exists
    running: bool = False  # set while the agent replicates; found set at start = the agent did not stop cleanly
    boot_id: str = ""
    last_point: float | None = None
    # A clean stop in CONTINUOUS: the nonce of the marker it left in the tracing instance it kept (the dirty map went
    # to ``dirty`` beside this file). The next agent skips the resync only if it adopts that instance.
    clean_marker: str = ""

    @classmethod
    def load(cls, path: Path, disk: str) -> DiskState:
        try:
            doc = json.loads(path.read_text())
            return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})
        except (OSError, ValueError, TypeError):
            return cls(disk)

    def save(self, path: Path) -> None:
        atomic_write(path, json.dumps(self.__dict__, indent=1).encode(), 0o600)


def save_dirty(path: Path, dirty: DirtyMap) -> None:
    """The dirty chunks and their sub-blocks at a clean stop: each chunk's 16-bit mask (zstd: a mostly clean map is
    a few bytes; at most the masks' 2 MiB)."""
    with dirty.lock:
        data = dirty.masks.tobytes() if dirty.dirty else b""
    atomic_write(path, zstandard.compress(data, 3), 0o600)


def load_dirty(path: Path, count: int) -> list[int] | None:
    """The masks ``save_dirty`` wrote, if they are there and are those of ``count`` chunks (else None: resync)."""
    try:
        data = zstandard.ZstdDecompressor().decompress(path.read_bytes(), max_output_size=2 * count)
    except (OSError, zstandard.ZstdError):
        return None
    if not data:
        return []
    if len(data) == count:  # an agent before sub-blocks saved one flag per chunk: each changed chunk whole
        return [FULL if flag else 0 for flag in data]
    if len(data) != 2 * count:
        return None
    masks = array("H")
    masks.frombytes(data)
    return masks.tolist()


class DiskReplicator(threading.Thread):
    def __init__(
        self,
        device: BlockDevice,
        state_dir: Path,
        stream: Stream,
        pool: ThreadPoolExecutor,
        *,
        boot_id: str,
        context: Callable[[], ssl.SSLContext] | None = None,
        busy_share: float = BUSY_SHARE,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        kept_tracing: str | None = None,
    ) -> None:
        super().__init__(name=f"replication {device.name}", daemon=True)
        self.device = device
        self.state_dir = state_dir
        self.stream = stream
        self.pool = pool
        self.clock, self.wall = clock, wall
        self.boot_id = boot_id
        self.context = context  # a fresh TLS context per connection: a renewed certificate is picked up
        self.lock = threading.Lock()
        self.commands: queue.Queue[Capture] = queue.Queue()
        self.stopping = threading.Event()
        self.paused = False  # set by the daemon's thread (the operator's --pause); read here
        self.bandwidth = 0  # the policy's cap in bytes per second (0: none), set by the daemon's thread
        probe = DirectReader(device.path, 4096)
        size = probe.size
        probe.close()
        self.persisted = DiskState.load(state_dir / "state.json", device.name)
        self.geometry = geometry_for(size)
        self.depth = pipeline_depth(self.geometry)
        self.dirty = DirtyMap(self.geometry.count, now=clock(), chunk_size=self.geometry.chunk_size)
        self.hashes = DeferredHashes(HashFile(state_dir / "hashes", self.geometry))
        # Jobs ahead of the sender: the runs of chunks each read (first chunk, count), and the job.
        self.pipeline: deque[tuple[list[tuple[int, int]], Future[list[JobResult]]]] = deque()
        # The state machine.
        self.state = "INITIAL_SYNC"
        self.error: str | None = None
        self.detail: str | None = None
        self.need_sweep = True
        self.need_hashes = True  # the next connection asks the replica's hashes (they refill the hash file)
        self.sweep_gen = 0
        self.cursor = 0
        self.sweep_started: float | None = None
        self.replica_known = False
        self.last_progress = clock()
        self.backoff = 1.0
        # Progress figures.
        self.acked_bytes = 0
        self.rate = 0.0
        self._rate_mark = (clock(), 0)
        self._busy_check = 0.0
        self._slow = 0.0
        self.busy = BusyMeter()
        self.busy_share = busy_share
        self.events_at_capture = 0
        self.refusals = 0  # deltas the process server refused, or whose verdict was lost (sent whole again)
        self.capture_held = 0  # bytes of a freeze's records held in memory to be sent after the thaw
        self.dirty_bps = 0.0  # sub-block bytes the writes change per second, and replication takes to send
        self.send_bps = 0.0
        self._dirty_mark = (clock(), 0, 0)
        self.sent_delta_bytes = 0  # sub-block bytes sent as deltas, and what they stood for (figures for the log)
        self.sent_chunk_bytes = 0
        self.target = stream.address  # where the stream should go (``retarget``)
        self._moved_to: ServerAddress | None = None  # set by ``retarget``, taken by this thread
        self._set_initial_reason(kept_tracing)

    # Reasons to resync --------------------------------------------------------------------------------------------

    def _set_initial_reason(self, kept_tracing: str | None) -> None:
        p = self.persisted
        if not p.synced or p.chunk_size != self.geometry.chunk_size:
            self.state, self.detail = "INITIAL_SYNC", "first synchronisation of this disk"
            return
        self.state = "RESYNC_REQUIRED"
        dirty = load_dirty(self.state_dir / "dirty", self.geometry.count) if p.clean_marker else None
        with contextlib.suppress(OSError):
            (self.state_dir / "dirty").unlink(missing_ok=True)  # used once: a later start finds a new one or none
        if p.boot_id and p.boot_id != self.boot_id:
            self.detail = "the machine rebooted: writes since the agent stopped are unknown"
        elif p.running:
            self.detail = "the agent did not stop cleanly: writes while it was down are unknown"
        elif p.size != self.geometry.size:
            self.detail = f"the disk was resized from {p.size} to {self.geometry.size} bytes"
        elif not p.clean_marker or p.clean_marker != kept_tracing or dirty is None:
            self.detail = "the agent restarted and no tracing went on meanwhile: writes while it was down are unknown"
        else:
            # A clean stop, and the tracing it left kept every write since: where it left off, no resync.
            for i, mask in enumerate(dirty):
                if mask:
                    self.dirty.mark_masked(i, mask)
            self.state, self.need_sweep, self.detail = "CONTINUOUS", False, None

    def tracing_interrupted(self) -> None:
        """The adopted tracing turned out not to hold every write since the clean stop: compare every chunk."""
        self.flag_resync(None, "the tracing the agent left at its stop was interrupted: writes may have been missed")

    def flag_resync(self, error: str | None, detail: str, *, from_replica: bool = False) -> None:
        """From any thread: writes may have been missed; compare every chunk again."""
        with self.lock:
            self.need_sweep = True
            self.need_hashes = self.need_hashes or from_replica
            self.sweep_gen += 1
            self.error, self.detail = error, detail
            if self.state in ("CONTINUOUS", "RESYNCING", "INITIAL_SYNC", "STALLED"):
                self.state = "RESYNC_REQUIRED" if self.persisted.synced else "INITIAL_SYNC"

    # The thread ---------------------------------------------------------------------------------------------------

    def run(self) -> None:
        lower_priority()
        fault_point("replication.thread", disk=self.device.name)  # the suite makes the thread die here
        self.persisted.size, self.persisted.chunk_size = self.geometry.size, self.geometry.chunk_size
        self.persisted.running, self.persisted.boot_id = True, self.boot_id
        self.persisted.clean_marker = ""
        self.save_state()
        while not self.stopping.is_set():
            try:
                self._step()
                self.backoff = 1.0
            except (ProcessServerUnreachable, RemoteError, ProtocolError) as e:
                self._trouble(e)
            except ReplicaLost as e:
                # Resync against what the server holds now: its hashes come with the next connection.
                self.stream.reset()
                self.stream.close()
                self.flag_resync(e.id, e.message, from_replica=True)
            except OSError as e:
                self._trouble(MobilityError(f"{self.device.name}: {e.strerror or e}"))
            except Exception as e:  # a defect: never a dead thread that silently stops replicating the disk
                self._failed(e)
        self._abort_commands("the agent is stopping")
        with contextlib.suppress(Exception):
            self._drain_pipeline()
            self.stream.drain(2.0)
        self._drop_pipeline()  # what could not be sent is changed still
        self.stream.close()
        self.stream.reset()  # and so is what the server did not acknowledge
        self.hashes.release()

    def stop(self) -> None:
        """From another thread: stop soon (a send or wait on the stream is broken off)."""
        self.stopping.set()
        self.stream.interrupt()

    def retarget(self, address: ServerAddress) -> None:
        """From another thread: the process server moved. The disk's own thread closes its stream and connects to
        ``address`` (one thread owns a stream); a send or wait on the old one is broken off meanwhile."""
        with self.lock:
            if (address.host, address.port) == (self.target.host, self.target.port):
                return
            self.target = self._moved_to = address
        self.stream.interrupt()

    def _move(self) -> None:
        with self.lock:
            address, self._moved_to = self._moved_to, None
        if address is not None and (address.host, address.port) != (self.stream.address.host, self.stream.address.port):
            self._drop_pipeline()
            self.stream.close()
            self.stream.reset()  # what the old server did not acknowledge goes again, to the new one
            self.stream.address = address

    def _failed(self, e: Exception) -> None:
        """An unexpected exception in this disk's thread: the disk shows REPL-INTERNAL and starts over (what it was
        doing may have taken chunks from the dirty map that never went out: every chunk is compared again)."""
        failure = InternalError(f"{self.device.name}: replication failed: {type(e).__name__}: {e}"[:400])
        log.error("%s (restarting the disk's replication)", failure.message, exc_info=e)
        with contextlib.suppress(Exception):
            self._abort_commands(f"{failure.id}: {failure.message}")
        with contextlib.suppress(Exception):
            self._drop_pipeline()
        with contextlib.suppress(Exception):
            self.stream.close()
            self.stream.reset()
        self.flag_resync(failure.id, failure.message, from_replica=True)
        self._nap(self.backoff)
        self.backoff = min(self.backoff * 2, 30.0)

    def _nap(self, seconds: float) -> None:
        """Wait before trying again; a stop or a new process server address ends the wait."""
        deadline = time.monotonic() + seconds
        while not self.stopping.is_set() and self._moved_to is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.stopping.wait(min(left, 0.2))

    def _trouble(self, e: MobilityError | Exception) -> None:
        error_id = getattr(e, "id", "REPL-UNREACHABLE")
        message = getattr(e, "message", str(e))
        if error_id in ("REPL-CHUNK-CORRUPT", "REPL-POINT-MISMATCH", "REPL-PROTOCOL"):
            # The replica refused what we sent: start over from its own hashes.
            self.stream.reset()
            self.flag_resync(error_id, message, from_replica=True)
        self._drop_pipeline()
        self.stream.close()
        self._abort_commands(f"{error_id}: {message}")
        with self.lock:
            if self.error != error_id:
                log.warning("%s: %s: %s", self.device.name, error_id, message)
            self.error, self.detail = error_id, message
            if self.clock() - self.last_progress > STALL_AFTER or error_id == "PS-STORE-FULL":
                self.state = "STALLED"
        self._nap(self.backoff)
        self.backoff = min(self.backoff * 2, 30.0)

    def _step(self) -> None:
        fault_point("replication.step", disk=self.device.name)
        if self._moved_to is not None:
            self._move()
        self.stream.bucket.rate = self.bandwidth
        if self.paused:
            self.state = "PAUSED"
            self._abort_commands("replication is paused")
            self.stream.close()
            self.stopping.wait(1.0)
            return
        if self.state == "PAUSED":
            self.state = "RESYNC_REQUIRED" if self.need_sweep else "CONTINUOUS"
        if not self.stream.connected:
            self._connect()
        if self.need_sweep:
            self._sweep()
        else:
            self._continuous()

    def _connect(self) -> None:
        want = self.need_hashes
        hello = Hello(self.device.name, self.geometry.size, self.geometry.chunk_size, want_hashes=want)

        def store(first: int, hashes: bytes) -> None:
            if first + len(hashes) // HASH_SIZE > self.geometry.count:
                raise ProtocolError("more replica hashes than the disk has chunks")
            self.hashes.write(first, hashes)

        if self.context is not None:
            self.stream.context = self.context()
        welcome = self.stream.connect(hello, store if want else None)
        self.replica_known = welcome.known
        if want:
            self.need_hashes = False
        if not welcome.known and self.persisted.synced:
            # Not the replica this agent sent (a new store, or one `store repair` rebuilt from its points): compare
            # every chunk with what it holds, whose hashes came just now or come with the next connection.
            lost = ReplicaLost(f"the process server does not hold the replica of {self.device.name} it had any more")
            if not want:
                raise lost
            self.flag_resync(lost.id, lost.message)
        with self.lock:
            if self.state == "STALLED":
                self.state = "RESYNC_REQUIRED" if self.need_sweep else "CONTINUOUS"
            # What a stream that opened disproves (a renewal's new certificate ends the streams of the old one).
            if self.error in ("REPL-UNREACHABLE", "PS-STORE-FULL", "SERVER-ERROR", "CERT-SUPERSEDED"):
                self.error = None
        self.last_progress = self.clock()

    # The sweep: initial sync and checksum resync ------------------------------------------------------------------

    def _sweep(self) -> None:
        with self.lock:
            gen = self.sweep_gen
            initial = not self.persisted.synced or not self.replica_known
            self.state = "INITIAL_SYNC" if initial else "RESYNCING"
            self.sweep_started = self.wall()
        g = self.geometry
        per_job = job_chunks(g)
        self.cursor = 0
        log.info("%s: %s (%s)", self.device.name, "initial sync" if initial else "checksum resync", self.detail)
        for first in range(0, g.count, per_job):
            if self.stopping.is_set() or self.paused or self.sweep_gen != gen:
                self._drain_pipeline()
                return
            self._handle_commands(in_sweep=True)
            n = min(per_job, g.count - first)
            self.dirty.clear(first, first + n - 1)  # read now: later writes mark them again
            known = self.hashes.read(first, n)
            self._submit(first, n, known, self.clock())
            self.cursor = first + n
            self._throttle()
        self._drain_pipeline()
        self._wait_acked()
        with self.lock:
            if self.sweep_gen != gen:
                return
            self.need_sweep = False
            self.replica_known = True
            self.state = "CONTINUOUS"
            self.error = None
            self.detail = None
            self.sweep_started = None
        self.persisted.synced = True
        self.save_state()
        log.info("%s: in sync; continuous replication", self.device.name)

    # Continuous replication ---------------------------------------------------------------------------------------

    def _continuous(self) -> None:
        self._handle_commands()
        per_job = job_chunks(self.geometry)
        taken = self.dirty.take_masked(per_job * 8)
        if not taken:
            self._drain_pipeline()
            self.stream.flush()
            self.stream.pump(0.05)
            self.last_progress = self.clock()
            return
        self._submit_runs(_runs(taken, per_job))
        self._throttle()

    def _submit_runs(self, runs: list[tuple[int, int, float, list[int]]], *, compress: bool = True) -> None:
        """Submit runs taken from the dirty map (with their sub-block masks), many runs to a job (and so to a frame:
        scattered small writes make runs of one chunk). The chunks of runs not submitted when the stream breaks go
        back into the dirty map: they were taken from it, and nothing else would ever read them again (the replica
        kept its old chunk while the point's root, from the hash file, agreed)."""
        limit = job_chunks(self.geometry) * RUNS_PER_JOB
        jobs: list[list[tuple[int, int, float, list[int]]]] = [[]]
        for run in runs:
            if jobs[-1] and sum(r[1] for r in jobs[-1]) + run[1] > limit:
                jobs.append([])
            jobs[-1].append(run)
        for k, job in enumerate(jobs):
            if not job:
                continue
            try:
                self._submit_job(job, compress=compress)
            except BaseException:
                now = self.clock()
                for f, m, _, _ in (r for later in jobs[k:] for r in later):
                    self.dirty.mark(f, f + m - 1, now)
                raise

    def _submit(self, first: int, n: int, known: bytes | None, since: float) -> None:
        """A sweep's run: whole chunks compared with what the replica is known to hold."""
        job = self.pool.submit(_read_runs, self.device, self.geometry, [(first, n, None)], known, since, True, None)
        self._queue_job([(first, n)], job)

    def _submit_job(self, runs: list[tuple[int, int, float, list[int]]], *, compress: bool = True) -> None:
        deltas = self.stream.batches  # a process server of version 1 takes whole chunks only
        job = self.pool.submit(
            _read_runs,
            self.device,
            self.geometry,
            [(first, n, masks if deltas else None) for first, n, _, masks in runs],
            None,
            min(since for _, _, since, _ in runs),
            compress,
            self.dirty if deltas else None,
        )
        self._queue_job([(first, n) for first, n, _, _ in runs], job)

    def _queue_job(self, runs: list[tuple[int, int]], job: Future[list[JobResult]]) -> None:
        self.pipeline.append((runs, job))
        # Bounded in chunks (memory), whatever the runs per job: PIPELINE_BYTES of reads ahead, and as many jobs as
        # the pool has threads (jobs of many runs would otherwise leave one job at a time, one thread reading).
        limit = max(self.depth * job_chunks(self.geometry), POOL_JOBS * job_chunks(self.geometry) * RUNS_PER_JOB)
        while len(self.pipeline) > 1 and sum(n for rs, _ in self.pipeline for _, n in rs) > limit:
            self._send(self.pipeline[0][1].result())  # taken off only once sent: a failure leaves it to be marked
            self.pipeline.popleft()
        self.stream.pump(0)

    def _drain_pipeline(self) -> None:
        while self.pipeline:
            self._send(self.pipeline[0][1].result())
            self.pipeline.popleft()
        self.stream.flush()

    def _wait_acked(self) -> None:
        """Until the process server acknowledged every frame sent (ProcessServerUnreachable if it stops)."""
        last, mark = self.stream.acked, self.clock()
        while self.stream.window and not self.stopping.is_set():
            self.stream.pump(0.5)
            if self.stream.acked != last:
                last, mark = self.stream.acked, self.clock()
            elif self.clock() - mark > self.stream.timeout:
                self.stream.close()
                raise ProcessServerUnreachable(
                    f"{self.device.name}: no acknowledgement for {self.stream.timeout:.0f} s"
                )

    def _drop_pipeline(self) -> None:
        """Jobs read but not sent: their chunks were taken from the dirty map, so they go back into it."""
        for runs, fut in self.pipeline:
            fut.cancel()
            for first, n in runs:
                self.dirty.mark(first, first + n - 1, self.clock())
        self.pipeline.clear()

    def _send(self, results: list[JobResult]) -> None:
        """Queue a job's changed chunks, in order (one BATCH frame, or a CHUNK frame each to a server of version 1);
        the hash file learns what the replica will hold. A delta goes over the hash the hash file holds for its
        chunk, which is what the replica holds once the frames before it are applied; a chunk whose entry is
        spoiled (sent whole after a lost connection or a refused delta, and not acknowledged yet) has no base it
        can name: it is marked to be read and sent whole."""
        records: list[Record] = []
        writes: list[tuple[int, bytes]] = []
        for result in results:
            writes += self._records(result, records)
        self._send_records(records, min((r.since for r in results), default=0.0))
        for first, hashes in writes:
            self.hashes.write(first, hashes)
        self.last_progress = self.clock()

    def _send_records(self, records: list[Record], since: float) -> None:
        """One job's records: one BATCH frame, or a CHUNK frame each to a server of version 1."""
        if records and self.stream.batches:
            self._send_batch(records, since)
        else:
            for r in records:
                self.stream.send(
                    Kind.CHUNK,
                    bytes(r.payload),
                    flags=r.codec,
                    offset=self.geometry.offset(r.index),
                    size=r.size,
                    digest=r.hash,
                    since=since,
                    on_ack=self._acked_cb([r]),
                    on_lost=self._lost_cb([r.index]),
                )

    def _records(self, result: JobResult, records: list[Record]) -> list[tuple[int, bytes]]:
        """A run's changed chunks as records (appended to ``records``); the hash file's writes for the run."""
        current = self.hashes.read(result.first, len(result.hashes) // HASH_SIZE)
        hashes = bytearray(result.hashes)
        # An entry spoiled since the job was given its hashes (a delta refused, frames lost with a connection) stays
        # spoiled unless this job sends the chunk: the job's own hash is what it read, not what the replica holds, and
        # taking it would make the chunk's next read look already held: a point of a replica that lacks it, refused.
        for k in range(len(result.hashes) // HASH_SIZE):
            if current[k * HASH_SIZE : (k + 1) * HASH_SIZE] == _UNKNOWN:
                hashes[k * HASH_SIZE : (k + 1) * HASH_SIZE] = _UNKNOWN
        for chunk in result.out:
            k = chunk.index - result.first
            base = current[k * HASH_SIZE : (k + 1) * HASH_SIZE]
            if base == chunk.hash:
                continue  # the replica holds this already (the same data written again)
            if chunk.delta and base == _UNKNOWN:
                hashes[k * HASH_SIZE : (k + 1) * HASH_SIZE] = base
                self.dirty.mark(chunk.index, chunk.index, self.clock())
                continue
            records.append(
                Record(
                    chunk.index,
                    chunk.codec,
                    chunk.size,
                    chunk.hash,
                    chunk.payload,
                    chunk.mask,
                    base if chunk.delta else bytes(HASH_SIZE),
                )
            )
            hashes[k * HASH_SIZE : (k + 1) * HASH_SIZE] = chunk.hash  # what the replica holds once this is applied
            if chunk.delta:
                self.sent_delta_bytes += chunk.delta_raw
            else:
                self.sent_chunk_bytes += chunk.size
        return [(result.first, bytes(hashes))] if hashes != current else []

    def _send_batch(self, records: list[Record], since: float) -> None:
        indexes = [r.index for r in records]

        def refused(positions: list[int]) -> None:
            """The server did not apply these deltas (no such base, or not the hash they claimed; or its answer was
            lost with the connection after the batch was made durable): send whole."""
            self.refusals += len(positions)
            self._lost_cb([indexes[p] for p in positions if p < len(indexes)])()

        self.stream.send(
            Kind.BATCH,
            batch_payload(records),
            size=len(records),
            since=since,
            on_ack=self._acked_cb(records),
            on_lost=self._lost_cb(indexes),
            on_refused=refused,
            deltas=[k for k, r in enumerate(records) if r.delta],
        )

    def _acked_cb(self, records: list[Record]) -> Callable[[], None]:
        size = sum(r.size for r in records)

        def acked() -> None:
            self.acked_bytes += size

        return acked

    def _lost_cb(self, indexes: list[int]) -> Callable[[], None]:
        """The connection went before the server made these chunks durable: read them again and send them whole
        (their hash entries are spoiled, so that an unchanged chunk is not taken for one the replica already holds,
        and no delta names a base the replica may not have)."""

        def lost() -> None:
            now = self.clock()
            for index in indexes:
                self.hashes.write(index, _UNKNOWN)
                self.dirty.mark(index, index, now)

        return lost

    def _throttle(self) -> None:
        """Slow down while the rest of the machine keeps its CPUs busy (nice and ionice already yield to it; this
        also leaves it the headroom): a pause per job of 20 ms past the threshold, 100 ms near saturation."""
        now = self.clock()
        if now - self._busy_check > 1.0:
            self._busy_check = now
            others = self.busy.update()
            self._slow = 0.0 if others < self.busy_share else 0.02 if others < 0.95 else 0.1
        if self._slow:
            self.stopping.wait(self._slow)

    # Points -------------------------------------------------------------------------------------------------------

    def _handle_commands(self, in_sweep: bool = False) -> None:
        while True:
            try:
                capture = self.commands.get_nowait()
            except queue.Empty:
                return
            if in_sweep or self.need_sweep:
                capture.error = MobilityError(f"{self.device.name} is in {self.state}, not CONTINUOUS")
                capture.ready.set()
                capture.captured.set()
                continue
            self._capture(capture)

    def _capture(self, capture: Capture) -> None:
        """A point on this disk. Before the freeze (``ready``): send what was read and have the process server verify
        it. Frozen (``go``): read the residual, hash it and keep its records in memory; the coordinator thaws as soon as
        every disk has. Then send them, wait until the process server has verified every batch up to them, and close
        the point. A delta refused after the thaw (its base gone) fails the point, never makes a wrong one: its chunk
        is read and sent whole, as any refused delta, and the next point has it. Nothing here waits for the process
        server while the disk is frozen, unless the residual's records pass CAPTURE_HOLD_BYTES (those beyond are sent
        while frozen)."""
        try:
            # Before the freeze: what was read goes out, and the process server verifies every batch sent. A delta it
            # refuses now is read again in the freeze; none can be refused after it, the residual's own aside (read
            # frozen, after the tracer drained, its sub-block masks are exact).
            self._drain_pipeline()
            if self.stream.batches:
                self.stream.wait_checked(PREPARE_SECONDS)
        except BaseException as e:
            capture.error = MobilityError(f"{self.device.name}: could not prepare the point: {e}"[:400])
            capture.ready.set()
            capture.captured.set()
            raise
        full_priority()  # from the freeze to the thaw the applications wait for this thread: woken at once by ``go``
        capture.ready.set()
        deadline = self.clock() + 60
        while not capture.go.wait(0.05):
            if capture.closing.is_set() or self.stopping.is_set() or self.clock() > deadline:
                lower_priority()
                capture.acked.set()
                return  # the point was abandoned before its freeze (or the agent stops)
        t0 = self.clock()
        held: list[tuple[list[Record], float]] = []  # each job's records and its oldest change, in frame order
        self.capture_held = 0
        events = self.dirty.events
        residual = self.dirty.pending_bytes()
        chunks = 0
        try:
            while self.pipeline:  # read before the freeze: their records go first, after the thaw
                self._hold(self.pipeline[0][1].result(), held)
                self.pipeline.popleft()
            t1 = self.clock()
            for _ in range(CAPTURE_ROUNDS):
                # Refusals until now marked their chunks (whole): they are in what is taken here. One after the last
                # take fails the point: its chunk's record in the point would be missing.
                seen = self.refusals
                taken = self.dirty.take_all()
                if not taken:
                    break
                chunks += len(taken)
                self._read_held(_runs(taken, job_chunks(self.geometry)), held)
            else:
                capture.error = MobilityError(
                    f"{self.device.name}: deltas were refused again and again during the freeze"
                )
        except BaseException as e:
            self._release_held(held)
            capture.error = MobilityError(f"{self.device.name}: the residual could not be captured: {e}"[:400])
            capture.captured.set()  # the coordinator thaws at once, not at its deadline
            lower_priority()
            raise
        capture.residual = chunks
        capture.residual_bytes = residual
        capture.phases = {"read before": t1 - t0, "read": self.clock() - t1}
        self.events_at_capture = events
        capture.captured.set()  # the coordinator may thaw now; nothing below reads the disk before the point
        lower_priority()
        capture.root = self.hashes.root()
        try:
            self._send_held(held)
            self.stream.flush()
            if self.stream.batches and not self.stream.wait_checked(CHECK_AFTER_THAW):
                capture.failure = f"{self.device.name}: the process server did not verify the point's residual in time"
            elif self.refusals != seen:
                capture.failure = (
                    f"{self.device.name}: the process server refused {self.refusals - seen} delta(s) sent before the "
                    "point's root was taken (their chunks are sent whole; the next point has them)"
                )
        except BaseException:
            self._release_held(held)  # not sent: changed still, and not held by the replica
            capture.failure = f"{self.device.name}: the stream broke while the point's residual was sent"
            capture.acked.set()
            raise
        deadline = self.clock() + 60
        while not capture.closing.wait(0.5) and not self.stopping.is_set() and self.clock() < deadline:
            pass
        if not capture.closing.is_set() or capture.label is None or capture.failure is not None:
            capture.acked.set()
            return  # aborted, or not the frozen state: the chunks went anyway, the point does not
        close = PointClose(capture.point_id, capture.created, capture.root, capture.label, capture.disks, None)

        def acked() -> None:
            capture.point_ok = True
            capture.acked.set()

        self.stream.send(Kind.POINT, json.dumps(close.to_json()).encode(), on_ack=acked, on_lost=capture.acked.set)
        self.stream.flush()

    def _read_held(self, runs: list[tuple[int, int, float, list[int]]], held: list[tuple[list[Record], float]]) -> None:
        """In a freeze: read ``runs`` in the pool (whole chunks hashed, nothing compressed: the applications wait),
        a few jobs ahead, and keep their records in ``held``. The runs not read when something fails go back into the
        dirty map."""
        deltas = self.stream.batches
        limit = job_chunks(self.geometry) * RUNS_PER_JOB
        jobs: list[list[tuple[int, int, float, list[int]]]] = [[]]
        for run in runs:
            if jobs[-1] and sum(r[1] for r in jobs[-1]) + run[1] > limit:
                jobs.append([])
            jobs[-1].append(run)
        jobs = [j for j in jobs if j]
        ahead: deque[Future[list[JobResult]]] = deque()
        done = 0  # jobs whose records are held
        try:
            for k, job in enumerate(jobs):
                ahead.append(self._submit_read(job, deltas))
                while ahead and (len(ahead) > POOL_JOBS or k == len(jobs) - 1):
                    self._hold(ahead.popleft().result(), held)
                    done += 1
        except BaseException:
            for fut in ahead:
                fut.cancel()
            now = self.clock()
            for f, m, _, _ in (r for job in jobs[done:] for r in job):
                self.dirty.mark(f, f + m - 1, now)
            raise

    def _submit_read(self, job: list[tuple[int, int, float, list[int]]], deltas: bool) -> Future[list[JobResult]]:
        return self.pool.submit(
            _read_runs,
            self.device,
            self.geometry,
            [(first, n, masks if deltas else None) for first, n, _, masks in job],
            None,
            min(since for _, _, since, _ in job),
            False,
            self.dirty if deltas else None,
            True,
        )

    def _hold(self, results: list[JobResult], held: list[tuple[list[Record], float]]) -> None:
        """A job's records kept for after the thaw (the hash file learns what the replica will hold, as ``_send``
        does; its writes are held in memory during the freeze); past CAPTURE_HOLD_BYTES, what is held goes now."""
        records: list[Record] = []
        writes: list[tuple[int, bytes]] = []
        for result in results:
            writes += self._records(result, records)
        for first, hashes in writes:
            self.hashes.write(first, hashes)
        if records:
            held.append((records, min((r.since for r in results), default=0.0)))
            self.capture_held += sum(len(r.payload) for r in records)
        if self.capture_held > CAPTURE_HOLD_BYTES:
            self._send_held(held)

    def _send_held(self, held: list[tuple[list[Record], float]]) -> None:
        """Send held records in order; each leaves ``held`` once queued (what is left of it when the stream breaks is
        handed back by ``_release_held``)."""
        while held:
            records, since = held[0]
            self._send_records(records, since)
            self.capture_held -= sum(len(r.payload) for r in records)
            held.pop(0)
        self.last_progress = self.clock()

    def _release_held(self, held: list[tuple[list[Record], float]]) -> None:
        """Held records that will not be sent: their chunks are changed still, and the hash file must not claim the
        replica holds them (as for a frame lost with its connection)."""
        self._lost_cb([r.index for records, _ in held for r in records])()
        held.clear()
        self.capture_held = 0

    def _abort_commands(self, why: str) -> None:
        while True:
            try:
                capture = self.commands.get_nowait()
            except queue.Empty:
                return
            capture.error = MobilityError(why)
            capture.ready.set()
            capture.captured.set()

    # State --------------------------------------------------------------------------------------------------------

    def save_state(self) -> None:
        try:
            self.persisted.save(self.state_dir / "state.json")
        except OSError as e:
            log.warning("%s: cannot record replication state: %s", self.device.name, e.strerror)

    def mark_clean_stop(self, marker: str | None = None) -> None:
        """After the thread ended: not running any more. With ``marker`` (the tracing was kept, and every write up
        to the stop is in the dirty map) and the disk in sync, the dirty map is saved so the next start goes on from
        it; otherwise the next start resyncs."""
        in_sync = not self.need_sweep and self.persisted.synced
        self.persisted.running = False
        self.persisted.clean_marker = ""
        if marker and in_sync:
            try:
                save_dirty(self.state_dir / "dirty", self.dirty)
                self.persisted.clean_marker = marker
            except OSError as e:
                log.warning("%s: cannot save its dirty map (%s): the next start resyncs", self.device.name, e.strerror)
        self.save_state()

    def report(self) -> DiskReport:
        now, wall = self.clock(), self.wall()
        t0, b0 = self._rate_mark
        if now - t0 >= 2.0:
            instant = (self.acked_bytes - b0) / (now - t0)
            self.rate = instant if not self.rate else 0.5 * self.rate + 0.5 * instant
            self._rate_mark = (now, self.acked_bytes)
        t1, marked1, taken1 = self._dirty_mark
        if now - t1 >= 2.0:
            marked, taken = self.dirty.marked_bytes, self.dirty.taken_bytes
            dirty_bps, send_bps = (marked - marked1) / (now - t1), (taken - taken1) / (now - t1)
            self.dirty_bps = dirty_bps if not self.dirty_bps else 0.5 * self.dirty_bps + 0.5 * dirty_bps
            self.send_bps = send_bps if not self.send_bps else 0.5 * self.send_bps + 0.5 * send_bps
            self._dirty_mark = (now, marked, taken)
        g = self.geometry
        left = self.dirty.pending_bytes() + self.stream.window_size
        if self.state in ("INITIAL_SYNC", "RESYNCING"):
            left += max(0, g.count - self.cursor) * g.chunk_size
        lag: float | None = None
        if self.state in ("CONTINUOUS", "PAUSED", "STALLED") and not self.need_sweep:
            # Both the dirty map and the window keep monotonic times of when a change was first seen.
            oldest = [t for t in (self.dirty.oldest(), self.stream.oldest_unacked()) if t]
            lag = max(0.0, now - min(oldest)) if oldest else 0.0
        elif self.sweep_started is not None and self.persisted.synced:
            lag = max(0.0, wall - self.sweep_started)
        eta = left / self.rate if self.rate > 0 and left else (0.0 if not left else None)
        return DiskReport(
            disk=self.device.name,
            state=self.state,
            size=g.size,
            bytes_left=left,
            lag_seconds=lag,
            throughput_bps=round(self.rate, 1),
            eta_seconds=eta,
            last_point=self.persisted.last_point,
            error=self.error,
            detail=self.detail[:500] if self.detail else None,  # the wire bounds it: a longer one spoils the report
        )


def _runs(taken: list[tuple[int, float, int]], limit: int) -> list[tuple[int, int, float, list[int]]]:
    """Dirty chunks as runs of contiguous indexes (first, count, oldest change, their sub-block masks), at most
    ``limit`` long."""
    runs: list[tuple[int, int, float, list[int]]] = []
    for index, since, mask in sorted(taken):
        if runs:
            first, n, oldest, masks = runs[-1]
            if index == first + n and n < limit:
                masks.append(mask)
                runs[-1] = (first, n + 1, min(oldest, since), masks)
                continue
        runs.append((index, 1, since, [mask]))
    return runs
