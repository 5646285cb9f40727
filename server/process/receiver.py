"""The process server's receiving end: a TLS listener (mutual TLS with the machines' certificates) beside the HTTPS
API, one stream per protected disk, every chunk's hash verified before it is kept, and group commits that
acknowledge only what the store has made durable.

Each stream reads frames on the event loop, verifies chunks in a small thread pool (zstd and BLAKE3 release the
GIL), and hands them in sequence order to one committer thread. The committer takes whatever has queued while the
previous commit was flushing, commits it as one batch (``ChunkStore.commit``), and then acknowledges each stream's
highest committed sequence number. Nothing is acknowledged before its commit returned."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import zstandard

from agent.replication.chunks import Geometry, chunk_hash, zero_hash
from agent.shared.errors import MobilityError
from agent.shared.replication_wire import (
    HASH_SIZE,
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
    parse_json,
)
from agent.shared.textsafe import printable
from server.errors import ChunkCorrupt, NotProtected, ReplicationProtocol, StoreFull
from server.process.store import ChunkPut, ChunkStore, DiskRow, PointPut

log = logging.getLogger("mobility.process")

HELLO_TIMEOUT = 30.0
MAX_INFLIGHT = 64 * 1024 * 1024  # bytes a stream may have received but not yet had acknowledged
MAX_PIPELINE = 64  # frames a stream verifies ahead of the committer
MAX_STREAMS_PER_HOST = 64

Authorize = Callable[[str, str, str], bool]  # (host ID, certificate serial, disk) -> may that machine send it
OnPoint = Callable[[str, str], None]  # (host ID, point ID) once a point of that machine closed on a disk


class _Closed(Exception):
    pass


@dataclass
class _Stream:
    host_id: str
    disk: DiskRow
    loop: asyncio.AbstractEventLoop
    writer: asyncio.StreamWriter
    inflight: int = 0
    acked: int = 0
    failed: MobilityError | None = None
    # Set by the committer at once when a batch of this stream was refused: the stream's later frames must not be
    # committed (the server's durable sequence would then cover frames it never kept), even before ``fail`` has
    # run on the event loop.
    dead: bool = False
    room: asyncio.Event = field(default_factory=asyncio.Event)
    sizes: deque[tuple[int, int]] = field(default_factory=deque)  # (seq, bytes) not yet acknowledged

    def ack(self, seq: int) -> None:
        """On the event loop: every frame up to ``seq`` is durable."""
        if seq <= self.acked or self.failed is not None:
            return
        self.acked = seq
        while self.sizes and self.sizes[0][0] <= seq:
            self.inflight -= self.sizes.popleft()[1]
        if not self.writer.is_closing():
            self.writer.write(frame(Kind.ACK, seq=seq))
        self.room.set()

    def fail(self, error: MobilityError) -> None:
        if self.failed is not None:
            return
        self.failed = error
        if not self.writer.is_closing():
            self.writer.write(json_frame(Kind.ERROR, StreamError(error.id, error.message, error.fix).to_json()))
            self.writer.close()
        self.room.set()


class Committer(threading.Thread):
    """The one thread that writes the store: group commit, then acknowledge."""

    def __init__(self, store: ChunkStore, on_point: OnPoint | None = None) -> None:
        super().__init__(name="process-committer", daemon=True)
        self.store = store
        self.on_point = on_point
        self._pending: list[tuple[_Stream, ChunkPut | PointPut]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self.commits = 0
        self.last_error: MobilityError | None = None

    def submit(self, stream: _Stream, item: ChunkPut | PointPut) -> None:
        """Queue a verified frame; it is committed with whatever else queued meanwhile."""
        with self._cond:
            self._pending.append((stream, item))
            self._cond.notify()

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
            self._commit(batch)

    def _commit(self, batch: list[tuple[_Stream, ChunkPut | PointPut]]) -> None:
        live = [(s, i) for s, i in batch if s.failed is None and not s.dead]
        if not live:
            return
        try:
            outcomes = self.store.commit([i for _, i in live])
        except MobilityError as e:
            if self.last_error is None or self.last_error.id != e.id:
                log.warning("store refused a batch: %s: %s", e.id, e.message)
            self.last_error = e
            for stream in {id(s): s for s, _ in live}.values():
                stream.dead = True
                stream.loop.call_soon_threadsafe(stream.fail, e)
            return
        except Exception:
            log.exception("commit failed")
            for stream in {id(s): s for s, _ in live}.values():
                stream.dead = True
                err = ReplicationProtocol("the process server failed to commit; the agent resends")
                stream.loop.call_soon_threadsafe(stream.fail, err)
            return
        self.commits += 1
        self.last_error = None
        acks: dict[int, tuple[_Stream, int]] = {}
        for (stream, item), outcome in zip(live, outcomes, strict=True):
            if isinstance(outcome, MobilityError):
                log.warning("%s: %s: %s", stream.host_id, outcome.id, outcome.message)
                stream.dead = True
                stream.loop.call_soon_threadsafe(stream.fail, outcome)
                continue
            if id(stream) not in acks or acks[id(stream)][1] < item.seq:
                acks[id(stream)] = (stream, item.seq)
            if isinstance(item, PointPut) and self.on_point is not None:
                try:
                    self.on_point(stream.host_id, item.close.point_id)
                except Exception:
                    log.exception("after point %s", item.close.point_id)
        for stream, seq in acks.values():
            stream.loop.call_soon_threadsafe(stream.ack, seq)


class Receiver:
    """Accepts streams and feeds the committer. ``authorize`` says whether a machine's disk is protected."""

    def __init__(self, store: ChunkStore, authorize: Authorize, on_point: OnPoint | None = None) -> None:
        self.store = store
        self.authorize = authorize
        self.committer = Committer(store, on_point)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="process-verify")
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int, context: ssl.SSLContext) -> int:
        self.committer.start()
        self._server = await asyncio.start_server(self._serve, host, port, ssl=context, limit=1 << 20, backlog=256)
        sockets = self._server.sockets
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for stream in list(self._streams.values()):
                stream.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.to_thread(self.committer.stop)
        self.pool.shutdown(wait=True, cancel_futures=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        stream: _Stream | None = None
        peer = writer.get_extra_info("peername")
        try:
            host_id, serial = _peer_certificate(writer)
            stream = await self._open(host_id, serial, reader, writer)
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
            log.exception("stream from %s failed", peer)
            _refuse(writer, ReplicationProtocol("the process server failed on this stream"), stream)
        finally:
            if stream is not None and self._streams.get((stream.host_id, stream.disk.disk)) is stream:
                del self._streams[(stream.host_id, stream.disk.disk)]
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5)
            if task is not None:
                self._tasks.discard(task)

    async def _open(
        self, host_id: str, serial: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> _Stream:
        header, payload = await asyncio.wait_for(_read_frame(reader), HELLO_TIMEOUT)
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
        if Geometry(hello.size, hello.chunk_size).count > (1 << 24):
            raise ProtocolError("more than 16 Mi chunks in one disk")
        if sum(1 for h, _ in self._streams if h == host_id) >= MAX_STREAMS_PER_HOST:
            raise ProtocolError(f"more than {MAX_STREAMS_PER_HOST} streams from one machine")
        row, known = await asyncio.to_thread(self.store.open_disk, host_id, hello.disk, hello.size, hello.chunk_size)
        old = self._streams.get((host_id, hello.disk))
        if old is not None:  # the agent reconnected: the old stream is dead to it
            old.writer.close()
        stream = _Stream(host_id, row, asyncio.get_running_loop(), writer, acked=row.acked_seq)
        self._streams[(host_id, hello.disk)] = stream
        writer.write(json_frame(Kind.WELCOME, Welcome(row.acked_seq, known).to_json()))
        if hello.want_hashes:
            head = await asyncio.to_thread(self.store.head, row)
            step = HASHES_PER_FRAME * HASH_SIZE
            for start in range(0, len(head), step):
                writer.write(frame(Kind.HASHES, bytes(head[start : start + step]), offset=start // HASH_SIZE))
                await writer.drain()
            writer.write(frame(Kind.HASHES_END, offset=row.geometry.count))
        await writer.drain()
        return stream

    async def _receive(self, stream: _Stream, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        geometry = stream.disk.geometry
        last = stream.acked
        pipeline: asyncio.Queue[tuple[int, int, Future[ChunkPut] | PointPut] | None] = asyncio.Queue(MAX_PIPELINE)
        forward = asyncio.create_task(self._forward(stream, pipeline))
        try:
            while stream.failed is None:
                header, payload = await _read_frame(reader)
                if header.kind not in (Kind.CHUNK, Kind.POINT):
                    raise ProtocolError(f"unexpected {header.kind.name} frame on a stream")
                if header.seq <= last:
                    raise ProtocolError(f"sequence {header.seq} after {last}: frames must be sent in order")
                last = header.seq
                while stream.inflight > MAX_INFLIGHT and stream.failed is None:
                    stream.room.clear()
                    await stream.room.wait()
                size = HEADER.size + len(payload)
                stream.inflight += size
                stream.sizes.append((header.seq, size))
                if header.kind is Kind.POINT:
                    close = PointClose.from_json(parse_json(payload, "POINT"))
                    if stream.disk.disk not in close.disks:
                        raise ProtocolError("a point closed on a disk it does not name")
                    await pipeline.put((header.seq, size, PointPut(stream.disk.disk_key, close, header.seq)))
                    continue
                index, rest = divmod(header.offset, geometry.chunk_size)
                if rest or index >= geometry.count or header.size != geometry.length(index):
                    raise ProtocolError(f"chunk at offset {header.offset} of {header.size} bytes is not a chunk")
                check = loop.run_in_executor(self.pool, _verify, stream.disk.disk_key, index, header, payload)
                await pipeline.put((header.seq, size, check))  # type: ignore[arg-type]
            raise _Closed
        finally:
            await pipeline.put(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(forward, 10)

    async def _forward(self, stream: _Stream, pipeline: asyncio.Queue[Any]) -> None:
        """Hand verified frames to the committer in sequence order."""
        while (entry := await pipeline.get()) is not None:
            _seq, _size, item = entry
            if stream.failed is not None:
                continue
            try:
                put = item if isinstance(item, PointPut) else await item
            except MobilityError as e:
                stream.fail(e)
                continue
            self.committer.submit(stream, put)


def _verify(disk_key: int, index: int, header: Header, payload: bytes) -> ChunkPut:
    """In the verify pool: decompress (bounded by the chunk's size) and check the hash before anything is kept."""
    if header.flags == Codec.ZERO:
        if header.hash != zero_hash(header.size):
            raise ChunkCorrupt(f"a zero chunk at {header.offset} claims a non-zero hash")
        return ChunkPut(disk_key, index, header.hash, Codec.ZERO, header.size, b"", header.seq)
    data = payload
    if header.flags == Codec.ZSTD:
        try:
            data = _decompressor().decompress(payload, max_output_size=header.size)
        except zstandard.ZstdError as e:
            raise ChunkCorrupt(f"chunk at {header.offset} does not decompress: {e}") from e
        if len(data) != header.size:
            raise ChunkCorrupt(f"chunk at {header.offset} decompresses to {len(data)} bytes, not {header.size}")
    if chunk_hash(data) != header.hash:
        raise ChunkCorrupt(f"chunk at {header.offset} (sequence {header.seq}) does not match its hash")
    if header.hash == zero_hash(header.size):
        return ChunkPut(disk_key, index, header.hash, Codec.ZERO, header.size, b"", header.seq)
    return ChunkPut(disk_key, index, header.hash, Codec(header.flags), header.size, payload, header.seq)


_threads = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_threads, "dctx", None)
    if d is None:
        d = _threads.dctx = zstandard.ZstdDecompressor()
    return d


async def _read_frame(reader: asyncio.StreamReader) -> tuple[Header, bytes]:
    header = Header.unpack(await reader.readexactly(HEADER.size))
    payload = await reader.readexactly(header.length) if header.length else b""
    return header, payload


def _peer_certificate(writer: asyncio.StreamWriter) -> tuple[str, str]:
    """The CN and serial number of the verified client certificate (the TLS layer checked it against our CA)."""
    cert = writer.get_extra_info("peercert")
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value), str(cert.get("serialNumber", ""))
    raise ProtocolError("no client certificate")


def _refuse(writer: asyncio.StreamWriter, error: MobilityError, stream: _Stream | None) -> None:
    if stream is not None:
        stream.fail(error)
        return
    log.info("stream refused: %s: %s", error.id, printable(error.message, 200))
    if not writer.is_closing():
        writer.write(json_frame(Kind.ERROR, StreamError(error.id, error.message, error.fix).to_json()))


def stream_tls_context(ca_cert: str, cert: str, key: str) -> ssl.SSLContext:
    """The stream listener's TLS: the server's certificate, and a client certificate from our CA required."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=ca_cert)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
