"""The process server's receiving end: a TLS listener (mutual TLS with the machines' certificates) beside the HTTPS
API, one stream per protected disk, every chunk's hash verified before it is kept, and group commits that
acknowledge only what the store has made durable. A stream that reconnects is welcomed with the durable sequence once
the old stream's frames can no longer be committed (marked dead, and the commit under way that may hold some over).

Each stream reads frames on the event loop, verifies chunks in a small thread pool (zstd and BLAKE3 release the
GIL), and hands them in sequence order to one committer thread. The committer takes whatever has queued while the
previous commit was flushing, commits it as one batch (``ChunkStore.commit``), and then acknowledges each stream's
highest committed sequence number. Nothing is acknowledged before its commit returned.

What a client can cost is bounded. A connection counts in the server's ``--max-connections`` from the moment it is
accepted (``server/api/edge.py``'s ``Connections``), and those not yet past their TLS handshake and HELLO may hold only
a quarter of them; the handshake has ``HANDSHAKE_SECONDS``, HELLO ``HELLO_SECONDS`` and a frame's payload
``PAYLOAD_SECONDS``, and TCP keepalive closes a stream whose peer is gone (``KEEPALIVE``). A frame's payload is read
only once it fits both its stream's window (``MAX_INFLIGHT``) and the bytes all streams together may hold
(``MAX_INFLIGHT_TOTAL``); a compressed chunk is decompressed by a bounded reader. A stream stays authorised only as
long as its machine: every ``RECHECK_SECONDS`` (and before every point) the machine's certificate and protection are
checked again, and a revoked, removed or unprotected machine, or a certificate a renewal replaced, ends the stream
with that error."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import zstandard

from agent.replication.chunks import MAX_CHUNKS, Geometry, chunk_hash, zero_hash
from agent.shared.errors import MobilityError
from agent.shared.replication_wire import (
    BATCH_VERSION,
    HASHES_PER_FRAME,
    HEADER,
    Codec,
    Header,
    Hello,
    Kind,
    PointClose,
    ProtocolError,
    StreamError,
    Welcome,
    frame,
    json_frame,
    parse_batch,
    parse_json,
)
from agent.shared.textsafe import printable
from server.api.edge import HANDSHAKE_SECONDS, Connections
from server.api.tls import listener_context, peer_identity
from server.errors import ChunkCorrupt, DiskTooLarge, NotProtected, ReplicationProtocol, StoreFull
from server.process.batches import BatchResult, verify_batch
from server.process.decompress import chunk_decompressor
from server.process.store import ChunkPut, ChunkStore, DiskRow, PointPut

log = logging.getLogger("mobility.process")

HELLO_SECONDS = 10.0  # after the handshake, HELLO must be in
# A stream may send nothing for long while its agent is there (a checksum resync reads a whole disk, hours for a
# large one, before it sends what differs): no timeout between frames. A peer that is gone is found by TCP keepalive.
KEEPALIVE = (60, 10, 6)  # idle seconds before the first probe, seconds between probes, probes: about 2 minutes
PAYLOAD_SECONDS = 120.0  # a frame's payload, once its header came, must be in (16 MiB at a 140 KB/s cap)
CLOSE_SECONDS = 2.0  # a closed stream's TLS goodbye, then its connection is dropped
RECHECK_SECONDS = 3.0  # how often open streams' machines are authorised again, and slow payloads looked for
MAX_INFLIGHT = 64 * 1024 * 1024  # bytes a stream may have received but not yet had acknowledged
MAX_INFLIGHT_TOTAL = 256 * 1024 * 1024  # ... and all streams together
MAX_PIPELINE = 64  # frames a stream verifies ahead of the committer
MAX_STREAMS_PER_HOST = 64
READ_LIMIT = 64 * 1024  # a connection's read buffer before it pushes back (a frame's payload is read on top)
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

Authorize = Callable[[str, str, str], bool]  # (host ID, certificate serial, disk) -> may that machine send it
# Many streams' (host ID, certificate serial, disk) at once -> for each, the error that ends it (None: it goes on)
Recheck = Callable[[Sequence[tuple[str, str, str]]], list[MobilityError | None]]
OnPoint = Callable[[str, str], None]  # (host ID, point ID) once a point of that machine closed on a disk


class _Closed(Exception):
    pass


class _Budget:
    """Bytes received and not yet acknowledged, across every stream: a payload is read only once it fits."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._room = asyncio.Event()

    async def take(self, n: int) -> None:
        while self.used and self.used + n > self.limit:
            self._room.clear()
            await self._room.wait()
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n
        self._room.set()


@dataclass
class _Stream:
    host_id: str
    serial: str
    disk: DiskRow
    loop: asyncio.AbstractEventLoop
    writer: asyncio.StreamWriter
    budget: _Budget
    inflight: int = 0
    acked: int = 0
    failed: MobilityError | None = None
    # Set by the committer at once when a batch of this stream was refused: the stream's later frames must not be
    # committed (the server's durable sequence would then cover frames it never kept), even before ``fail`` has
    # run on the event loop. Also set when the agent reconnected: the old stream's frames are sent again.
    dead: bool = False
    room: asyncio.Event = field(default_factory=asyncio.Event)
    sizes: deque[tuple[int, int]] = field(default_factory=deque)  # (seq, bytes) not yet acknowledged
    payload_since: float | None = None  # while a frame's payload is awaited
    version: int = 1  # the agent's protocol version (its HELLO)
    # Chunks of this stream's batches not acknowledged yet, by hash: where a delta finds a base the store does not
    # hold yet (a chunk changed again while its last frame is still on its way to the disk). Pruned at each ACK.
    recent: dict[bytes, tuple[int, Future[BatchResult]]] = field(default_factory=dict)
    recent_order: deque[tuple[int, list[bytes]]] = field(default_factory=deque)

    def hold(self, seq: int, size: int) -> None:
        """``size`` bytes of frame ``seq`` are held (the budget has them already) until it is acknowledged."""
        self.inflight += size
        self.sizes.append((seq, size))

    def ack(self, seq: int) -> None:
        """On the event loop: every frame up to ``seq`` is durable."""
        if seq <= self.acked or self.failed is not None:
            return
        self.acked = seq
        freed = 0
        while self.sizes and self.sizes[0][0] <= seq:
            freed += self.sizes.popleft()[1]
        while self.recent_order and self.recent_order[0][0] <= seq:
            done, hashes = self.recent_order.popleft()
            for h in hashes:
                if self.recent.get(h, (0,))[0] == done:
                    del self.recent[h]
        self.inflight -= freed
        self.budget.give(freed)
        if not self.writer.is_closing():
            self.writer.write(frame(Kind.ACK, seq=seq))
        self.room.set()

    def grow(self, size: int) -> None:
        """The frame held last holds ``size`` bytes more (a batch's deltas, rebuilt into whole chunks)."""
        seq, held = self.sizes[-1]
        self.sizes[-1] = (seq, held + size)
        self.inflight += size

    def release(self) -> None:
        """The stream failed or ended: what it held goes back to the budget (it will never be acknowledged)."""
        self.sizes.clear()
        self.recent.clear()
        self.recent_order.clear()
        self.budget.give(self.inflight)
        self.inflight = 0

    def fail(self, error: MobilityError) -> None:
        if self.failed is not None:
            return
        self.failed = error
        self.release()  # at once: its connection may take a while to close
        if not self.writer.is_closing():
            self.writer.write(json_frame(Kind.ERROR, StreamError(error.id, error.message, error.fix).to_json()))
            self.writer.close()
        self.room.set()


@dataclass(frozen=True)
class _Applied:
    """A frame that keeps nothing in the store but is applied (a batch whose every delta was refused)."""

    disk_key: int
    seq: int


Item = ChunkPut | PointPut | _Applied


class Committer(threading.Thread):
    """The one thread that writes the store: group commit, then acknowledge."""

    def __init__(self, store: ChunkStore, on_point: OnPoint | None = None) -> None:
        super().__init__(name="process-committer", daemon=True)
        self.store = store
        self.on_point = on_point
        self._pending: list[tuple[_Stream, Item]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False  # a round is being committed
        self._after: list[Callable[[], object]] = []  # called once the round under way is over
        self.commits = 0
        self.last_error: MobilityError | None = None

    def submit(self, stream: _Stream, item: ChunkPut | PointPut) -> None:
        """Queue a verified frame; it is committed with whatever else queued meanwhile."""
        self.submit_many(stream, [item])

    def submit_many(self, stream: _Stream, items: Sequence[Item]) -> None:
        """Queue a verified batch's chunks, in order, at once."""
        with self._cond:
            self._pending.extend((stream, item) for item in items)
            self._cond.notify()

    def applied(self, stream: _Stream, seq: int) -> None:
        """A batch that keeps nothing (every delta in it refused) still moves the stream's durable sequence: queued
        as a frame, so that it is recorded in order with the stream's others and acknowledged after them."""
        self.submit_many(stream, [_Applied(stream.disk.disk_key, seq)])

    def after_round(self, done: Callable[[], object]) -> None:
        """Call ``done`` once the round being committed now, if any, is over (from the committer's thread; at once
        when none is). A stream marked dead before this call then has no frame committed any more: a later round
        leaves the frames of a dead stream out."""
        with self._cond:
            if self._busy:
                self._after.append(done)
                return
        done()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self.join(timeout=30)

    def run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._pending:
                    return
                batch, self._pending = self._pending, []
                self._busy = True
            try:
                self._commit(batch)
            finally:
                with self._cond:
                    self._busy = False
                    after, self._after = self._after, []
                for done in after:
                    try:
                        done()
                    except Exception:  # a waiter's loop closed: the committer goes on for the others
                        log.exception("after a commit round")

    def _commit(self, batch: list[tuple[_Stream, Item]]) -> None:
        live = [(s, i) for s, i in batch if s.failed is None and not s.dead]
        if not live:
            return
        streams = list({id(s): s for s, _ in live}.values())
        try:
            outcomes = self._store_commit([i for _, i in live])
        except MobilityError as e:  # the store itself refused (full, an I/O error): nothing of the batch was kept
            if self.last_error is None or self.last_error.id != e.id:
                log.warning("store refused a batch: %s: %s", e.id, e.message)
            self.last_error = e
            for stream in streams:
                _end(stream, e)
            return
        except Exception:
            if len(streams) > 1:
                # Something of one stream broke the batch (the store undid it whole): each stream's frames are
                # committed alone, so that only the stream that carried it fails.
                log.exception("a batch of %d streams failed: committing each stream alone", len(streams))
                for stream in streams:
                    self._commit([(s, i) for s, i in live if s is stream])
                return
            log.exception("%s: commit failed", streams[0].host_id)
            _end(streams[0], ReplicationProtocol("the process server failed to commit this stream; the agent resends"))
            return
        self.commits += 1
        self.last_error = None
        acks: dict[int, tuple[_Stream, int]] = {}
        points: list[tuple[str, str]] = []
        for (stream, item), outcome in zip(live, outcomes, strict=True):
            if isinstance(outcome, MobilityError):
                if not stream.dead:
                    log.warning("%s: %s: %s", stream.host_id, outcome.id, outcome.message)
                _end(stream, outcome)
                continue
            if id(stream) not in acks or acks[id(stream)][1] < item.seq:
                acks[id(stream)] = (stream, item.seq)
            if isinstance(item, PointPut):
                points.append((stream.host_id, item.close.point_id))
        for stream, seq in acks.values():
            if not stream.dead:
                stream.loop.call_soon_threadsafe(stream.ack, seq)
        # Acknowledged first: what follows a point (retention, collection) is the maintenance thread's, never the
        # batch's (server/process/maintenance.py).
        if self.on_point is not None:
            for host_id, point_id in points:
                try:
                    self.on_point(host_id, point_id)
                except Exception:
                    log.exception("after point %s", point_id)

    def _store_commit(self, items: list[Item]) -> list[Exception | None]:
        """The store's group commit; a batch that kept nothing moves its disk's durable sequence in the same turn, when
        nothing later of that disk in this commit does (``ChunkStore.advance``)."""
        kept: list[ChunkPut | PointPut] = [i for i in items if not isinstance(i, _Applied)]
        outcomes = iter(self.store.commit(kept) if kept else [])
        result: list[Exception | None] = [None if isinstance(i, _Applied) else next(outcomes) for i in items]
        last: dict[int, int] = {}
        failed = {i.disk_key for i, o in zip(items, result, strict=True) if o is not None}
        for put in kept:
            last[put.disk_key] = max(last.get(put.disk_key, 0), put.seq)
        for item in items:
            if isinstance(item, _Applied) and item.disk_key not in failed and item.seq > last.get(item.disk_key, 0):
                self.store.advance(item.disk_key, item.seq)
                last[item.disk_key] = item.seq
        return result


def _end(stream: _Stream, error: MobilityError) -> None:
    """From the committer: the stream's later frames are not committed, and it is failed on its loop."""
    stream.dead = True
    stream.loop.call_soon_threadsafe(stream.fail, error)


class Receiver:
    """Accepts streams and feeds the committer. ``authorize`` says whether a machine's disk is protected (raising
    the certificate's error when it is no longer good), ``recheck`` says it for every open stream at once."""

    def __init__(
        self,
        store: ChunkStore,
        authorize: Authorize,
        on_point: OnPoint | None = None,
        *,
        recheck: Recheck | None = None,
        connections: Connections | None = None,
        max_inflight_total: int = MAX_INFLIGHT_TOTAL,
    ) -> None:
        self.store = store
        self.authorize = authorize
        self.recheck = recheck
        self.connections = connections or Connections(1 << 20)
        self.budget = _Budget(max_inflight_total)
        self.committer = Committer(store, on_point)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="process-verify")
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int, context: ssl.SSLContext) -> int:
        self.committer.start()
        # Its own accept loop: a connection is counted, or refused, as it is accepted (a listener with TLS built in
        # hands over only connections past their handshake), and TLS then takes it over with a deadline.
        loop = asyncio.get_running_loop()
        family, _, _, _, address = (
            await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        )[0]
        self._listener = socket.create_server(address, family=family, backlog=256)
        self._listener.setblocking(False)
        self._accepting = asyncio.create_task(self._accept(self._listener, context))
        self._watch = asyncio.create_task(self._watch_streams())
        return int(self._listener.getsockname()[1])

    async def close(self) -> None:
        for job in (self._watch, self._accepting):
            if job is not None:
                job.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await job
        if self._listener is not None:
            self._listener.close()
            for stream in list(self._streams.values()):
                stream.writer.close()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=5)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await asyncio.to_thread(self.committer.stop)
        self.pool.shutdown(wait=True, cancel_futures=True)

    @property
    def streams(self) -> int:
        """Streams past their HELLO."""
        return len(self._streams)

    async def _accept(self, listener: socket.socket, context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        c = self.connections
        failing = False
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as e:  # out of descriptors (EMFILE): the connections held go on; retry shortly
                if not failing:
                    log.warning("cannot accept replication connections: %s", e.strerror or e)
                failing = True
                await asyncio.sleep(0.5)
                continue
            failing = False
            if c.full() or c.streams_unverified >= c.max_anonymous:
                c.refused += 1
                sock.close()  # before TLS: nothing to say, and nothing held
                continue
            c.streams += 1
            c.streams_unverified += 1
            _keepalive(sock)
            task = loop.create_task(self._serve(sock, context))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        """One connection: its TLS handshake, its HELLO, then its frames."""
        c = self.connections
        unverified = True
        try:
            opened = await _start_tls(sock, context)
            if opened is None:
                return
            reader, writer = opened
            stream: _Stream | None = None
            try:
                host_id, serial = _peer_certificate(writer)
                stream = await self._open(host_id, serial, reader, writer)
                unverified = False
                c.streams_unverified -= 1
                await self._receive(stream, reader)
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, _Closed, TimeoutError):
                pass
            except ProtocolError as e:
                _refuse(writer, ReplicationProtocol(str(e)), stream)
            except MobilityError as e:
                _refuse(writer, e, stream)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("stream from %s failed", writer.get_extra_info("peername"))
                _refuse(writer, ReplicationProtocol("the process server failed on this stream"), stream)
            finally:
                if stream is not None:
                    # Its connection is gone, and with it every acknowledgement still owed: what it sent and was not
                    # committed yet never will be (the agent sends it again), so that a reconnection's WELCOME, read
                    # after the commit under way, says all that will ever be durable of it.
                    stream.dead = True
                    stream.release()
                    if self._streams.get((stream.host_id, stream.disk.disk)) is stream:
                        del self._streams[(stream.host_id, stream.disk.disk)]
                writer.close()
                try:
                    await asyncio.wait_for(writer.wait_closed(), CLOSE_SECONDS)
                except Exception:  # a peer that does not answer TLS's close: its descriptor is not held for it
                    writer.transport.abort()
        finally:
            c.streams -= 1
            if unverified:
                c.streams_unverified -= 1

    async def _open(
        self, host_id: str, serial: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> _Stream:
        header, payload = await asyncio.wait_for(_read_frame(reader), HELLO_SECONDS)
        if header.kind is not Kind.HELLO:
            raise ProtocolError(f"a stream starts with HELLO, not {header.kind.name}")
        hello = Hello.from_json(parse_json(payload, "HELLO"))
        if not await asyncio.to_thread(self.authorize, host_id, serial, hello.disk):
            raise NotProtected(f"{hello.disk} of machine {host_id} is not protected")
        usage = await asyncio.to_thread(self.store.usage)
        if not usage.accepting:
            raise StoreFull(
                f"the process server keeps {usage.reserve_bytes >> 20} MiB free and has {usage.free_bytes >> 20} MiB: "
                "new data is refused until space is freed"
            )
        geometry = Geometry(hello.size, hello.chunk_size)
        if geometry.count > MAX_CHUNKS:
            raise DiskTooLarge(
                f"{hello.disk}: {hello.size} bytes in chunks of {hello.chunk_size} are {geometry.count} chunks, more "
                f"than the {MAX_CHUNKS} a replica keeps"
            )
        if sum(1 for h, _ in self._streams if h == host_id) >= MAX_STREAMS_PER_HOST:
            raise ProtocolError(f"more than {MAX_STREAMS_PER_HOST} streams from one machine")
        key = (host_id, hello.disk)
        while True:
            old = self._streams.get(key)
            if old is not None:  # the agent reconnected: the old stream is dead to it, and so are its frames
                old.dead = True
                old.writer.close()
            # A commit under way may hold frames of an earlier stream of this disk still (the one just marked dead,
            # or one whose connection ended before this HELLO): the durable sequence is read once that commit is
            # over, or the WELCOME would say less than is durable and those frames be kept after it.
            await self._round_over()
            row, known = await asyncio.to_thread(
                self.store.open_disk, host_id, hello.disk, hello.size, hello.chunk_size
            )
            current = self._streams.get(key)
            if current is None or current is old:
                break  # (else a connection of the same disk opened meanwhile: that one is the old stream now)
        loop = asyncio.get_running_loop()
        stream = _Stream(host_id, serial, row, loop, writer, self.budget, acked=row.acked_seq, version=hello.version)
        self._streams[key] = stream
        writer.write(json_frame(Kind.WELCOME, Welcome(row.acked_seq, known).to_json()))
        if hello.want_hashes:
            # Slice by slice from the index, never the whole list at once (32 MiB for a disk of 1 Mi chunks).
            count = row.geometry.count
            for first in range(0, count, HASHES_PER_FRAME):
                hashes = await asyncio.to_thread(self.store.head_slice, row, first, HASHES_PER_FRAME)
                writer.write(frame(Kind.HASHES, hashes, offset=first))
                await writer.drain()
            writer.write(frame(Kind.HASHES_END, offset=count))
            await writer.drain()
            await asyncio.to_thread(self.store.replica_sent, row)  # the agent resyncs against them
        await writer.drain()
        return stream

    async def _round_over(self) -> None:
        """Until the committer's round under way now, if any, is over (nothing waits in a thread meanwhile)."""
        loop = asyncio.get_running_loop()
        over = loop.create_future()

        def done() -> None:
            if not over.done():
                over.set_result(None)

        self.committer.after_round(lambda: loop.call_soon_threadsafe(done))
        await over

    async def _receive(self, stream: _Stream, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        geometry = stream.disk.geometry
        last = stream.acked
        pipeline: asyncio.Queue[tuple[int, int, Any] | None] = asyncio.Queue(MAX_PIPELINE)
        forward = asyncio.create_task(self._forward(stream, pipeline))
        kinds = (Kind.CHUNK, Kind.POINT, Kind.BATCH) if stream.version >= BATCH_VERSION else (Kind.CHUNK, Kind.POINT)
        try:
            while stream.failed is None:
                header = Header.unpack(await reader.readexactly(HEADER.size))
                if header.kind not in kinds:
                    raise ProtocolError(f"unexpected {header.kind.name} frame on a stream")
                if header.seq <= last:
                    raise ProtocolError(f"sequence {header.seq} after {last}: frames must be sent in order")
                last = header.seq
                if header.kind is Kind.CHUNK:
                    index, rest = divmod(header.offset, geometry.chunk_size)
                    if rest or index >= geometry.count or header.size != geometry.length(index):
                        raise ProtocolError(f"chunk at offset {header.offset} of {header.size} bytes is not a chunk")
                size = HEADER.size + header.length
                while stream.inflight and stream.inflight + size > MAX_INFLIGHT and stream.failed is None:
                    stream.room.clear()
                    await stream.room.wait()
                await self.budget.take(size)
                stream.hold(header.seq, size)  # from here on the stream gives it back (acknowledged, or at its end)
                stream.payload_since = loop.time()
                payload = await reader.readexactly(header.length) if header.length else b""
                stream.payload_since = None
                if header.kind is Kind.POINT:
                    close = PointClose.from_json(parse_json(payload, "POINT"))
                    if stream.disk.disk not in close.disks:
                        raise ProtocolError("a point closed on a disk it does not name")
                    # A point is listed only for a machine that may send it now, not at its HELLO.
                    if not await asyncio.to_thread(self.authorize, stream.host_id, stream.serial, stream.disk.disk):
                        raise NotProtected(f"{stream.disk.disk} of machine {stream.host_id} is no longer protected")
                    await pipeline.put((header.seq, size, PointPut(stream.disk.disk_key, close, header.seq)))
                    continue
                if header.kind is Kind.BATCH:
                    await pipeline.put((header.seq, size, await self._batch(stream, header, payload)))
                    continue
                check = loop.run_in_executor(self.pool, _verify, stream.disk.disk_key, index, header, payload)
                await pipeline.put((header.seq, size, check))
            raise _Closed
        finally:
            stream.payload_since = None
            await pipeline.put(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(forward, 10)

    async def _batch(self, stream: _Stream, header: Header, payload: bytes) -> asyncio.Future[BatchResult]:
        """A BATCH frame's records parsed (every field bounded) and its deltas' rebuilt chunks counted in what the
        stream holds, then verified in the pool (one job for the frame)."""
        g = stream.disk.geometry
        records = parse_batch(payload, header.size, g.chunk_size, g.count)
        for r in records:
            if r.size != g.length(r.index):
                raise ProtocolError(f"batch record for chunk {r.index} of {r.size} bytes is not a chunk")
        extra = sum(r.size for r in records if r.delta)  # what the deltas become: their chunks, whole
        if extra:
            await self.budget.take(extra)
            stream.grow(extra)
        deps = {r.base: stream.recent[r.base][1] for r in records if r.delta and r.base in stream.recent}
        job: Future[BatchResult] = self.pool.submit(
            verify_batch,
            stream.disk.disk_key,
            g.chunk_size,
            header.seq,
            records,
            deps,
            self._read_base,
            _decompress_bytes,
        )
        made = [r.hash for r in records]
        for h in made:
            stream.recent[h] = (header.seq, job)
        stream.recent_order.append((header.seq, made))
        return asyncio.wrap_future(job)

    def _read_base(self, digest: bytes, length: int) -> bytes | None:
        """A delta's base from the store (None when it is not there); the rebuilt chunk's hash is what is verified."""
        return self.store.read(digest, length, verify=False)

    async def _forward(self, stream: _Stream, pipeline: asyncio.Queue[Any]) -> None:
        """Hand verified frames to the committer in sequence order; a batch is answered CHECKED at once, with its
        refused deltas (before the batch's ACK, which follows its commit)."""
        while (entry := await pipeline.get()) is not None:
            seq, _size, item = entry
            if stream.failed is not None:
                continue
            try:
                put = item if isinstance(item, PointPut) else await item
            except MobilityError as e:
                stream.fail(e)
                continue
            if isinstance(put, BatchResult):
                if not stream.writer.is_closing():
                    refused = struct.pack(f"<{len(put.refused)}I", *put.refused)
                    stream.writer.write(frame(Kind.CHECKED, refused, seq=seq))
                if put.puts:
                    self.committer.submit_many(stream, put.puts)
                else:
                    self.committer.applied(stream, seq)
                continue
            self.committer.submit(stream, put)

    async def _watch_streams(self) -> None:
        """Every RECHECK_SECONDS: close streams whose frame's payload does not come, and end those whose machine may
        no longer send (one batched look-up for all of them)."""
        loop = asyncio.get_running_loop()
        failing = False
        while True:
            await asyncio.sleep(RECHECK_SECONDS)
            now = loop.time()
            streams = [s for s in self._streams.values() if s.failed is None]
            for s in streams:
                if s.payload_since is not None and now - s.payload_since > PAYLOAD_SECONDS:
                    # It holds its share of the bytes all streams may hold: a trickle must not keep them.
                    log.info(
                        "%s %s: a frame's payload took over %.0f s: stream closed",
                        s.host_id,
                        s.disk.disk,
                        PAYLOAD_SECONDS,
                    )
                    s.writer.transport.abort()  # no goodbye that a trickling client could hold up too
            if self.recheck is None or not streams:
                continue
            try:
                verdicts = await asyncio.to_thread(self.recheck, [(s.host_id, s.serial, s.disk.disk) for s in streams])
            except Exception as e:  # the database away: HELLO and every point check again
                if not failing:
                    log.warning("cannot authorise the open streams again: %s", getattr(e, "message", e))
                failing = True
                continue
            failing = False
            for s, error in zip(streams, verdicts, strict=True):
                if error is not None and s.failed is None:
                    log.info("%s %s: %s: stream ended", s.host_id, s.disk.disk, error.id)
                    s.dead = True
                    s.fail(error)


def _verify(disk_key: int, index: int, header: Header, payload: bytes) -> ChunkPut:
    """In the verify pool: decompress (bounded by the chunk's size) and check the hash before anything is kept."""
    if header.flags == Codec.ZERO:
        if header.hash != zero_hash(header.size):
            raise ChunkCorrupt(f"a zero chunk at {header.offset} claims a non-zero hash")
        return ChunkPut(disk_key, index, header.hash, Codec.ZERO, header.size, b"", header.seq)
    data = _decompress(header, payload) if header.flags == Codec.ZSTD else payload
    if chunk_hash(data) != header.hash:
        raise ChunkCorrupt(f"chunk at {header.offset} (sequence {header.seq}) does not match its hash")
    if header.hash == zero_hash(header.size):
        return ChunkPut(disk_key, index, header.hash, Codec.ZERO, header.size, b"", header.seq)
    return ChunkPut(disk_key, index, header.hash, Codec(header.flags), header.size, payload, header.seq)


def _decompress(header: Header, payload: bytes) -> bytes:
    return _decompress_bytes(payload, header.size, f"chunk at {header.offset}")


def _decompress_bytes(payload: bytes | memoryview, size: int, where: str) -> bytes:
    """One zstd frame (a chunk, or a delta's sub-blocks), decompressed by a reader that stops at ``size``. The frame
    must declare exactly that size (python-zstandard allocates what a frame declares, whatever it is told) and nothing
    may follow it (skippable frames or trailing bytes would be kept in the pack with the chunk)."""
    if payload[:4] != ZSTD_MAGIC:
        raise ChunkCorrupt(f"{where} is not a zstd frame")
    try:
        declared = zstandard.frame_content_size(payload)
        end = _frame_end(payload, size)
    except (zstandard.ZstdError, IndexError) as e:
        raise ChunkCorrupt(f"{where} is not a zstd frame: {e}") from e
    if declared != size:
        raise ChunkCorrupt(f"{where} declares {declared} bytes, not its {size}")
    if end != len(payload):
        raise ChunkCorrupt(f"{where} carries {len(payload) - end} bytes after its zstd frame")
    try:
        with chunk_decompressor().stream_reader(payload, read_across_frames=False) as reader:
            data = reader.read(size + 1)
    except zstandard.ZstdError as e:
        raise ChunkCorrupt(f"{where} does not decompress: {e}") from e
    if len(data) != size:
        raise ChunkCorrupt(f"{where} decompresses to {len(data)} bytes, not {size}")
    return data


def _frame_end(payload: bytes | memoryview, size: int) -> int:
    """Where the zstd frame at the start of ``payload`` ends (RFC 8878: header, blocks, optional checksum), walking
    no more blocks than a chunk of ``size`` bytes can take (an encoder's blocks hold up to 128 KiB each)."""
    at = zstandard.frame_header_size(payload)
    checksum = 4 if payload[4] & 0x04 else 0
    for _ in range(size // 1024 + 8):
        if at + 3 > len(payload):
            raise ChunkCorrupt("a zstd frame ends inside a block header")
        block = int.from_bytes(payload[at : at + 3], "little")
        kind, length = (block >> 1) & 3, block >> 3
        if kind == 3:
            raise ChunkCorrupt("a zstd block of the reserved type")
        at += 3 + (1 if kind == 1 else length)  # an RLE block carries its one byte
        if block & 1:
            return at + checksum
    raise ChunkCorrupt(f"a zstd frame of more blocks than {size} bytes need")


def _keepalive(sock: socket.socket) -> None:
    idle, interval, count = KEEPALIVE
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


async def _start_tls(
    sock: socket.socket, context: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """The server's side of the TLS handshake on an accepted connection, within HANDSHAKE_SECONDS (None when it
    failed: the loop closed the connection)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_LIMIT, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    try:
        transport, _ = await loop.connect_accepted_socket(
            lambda: protocol, sock, ssl=context, ssl_handshake_timeout=HANDSHAKE_SECONDS
        )
    except (OSError, ssl.SSLError, TimeoutError) as e:
        log.debug("TLS handshake failed: %s", e)
        return None
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def _read_frame(reader: asyncio.StreamReader) -> tuple[Header, bytes]:
    header = Header.unpack(await reader.readexactly(HEADER.size))
    payload = await reader.readexactly(header.length) if header.length else b""
    return header, payload


def _peer_certificate(writer: asyncio.StreamWriter) -> tuple[str, str]:
    """The CN and serial number of the verified client certificate (the TLS layer checked it against our CA)."""
    identity = peer_identity(writer.get_extra_info("peercert"))
    if identity is None:
        raise ProtocolError("no client certificate")
    return identity


def _refuse(writer: asyncio.StreamWriter, error: MobilityError, stream: _Stream | None) -> None:
    if stream is not None:
        stream.fail(error)
        return
    log.info("stream refused: %s: %s", error.id, printable(error.message, 200))
    if not writer.is_closing():
        writer.write(json_frame(Kind.ERROR, StreamError(error.id, error.message, error.fix).to_json()))


def stream_tls_context(ca_cert: str, cert: str, key: str) -> ssl.SSLContext:
    """The stream listener's TLS: the server's certificate, and a client certificate from our CA required."""
    return listener_context(cert, key, ca_cert, ssl.CERT_REQUIRED)
