"""server/process/receiver.py in this process, over real TLS with certificates of a test CA and a real chunk store:
the committer isolates one stream's failure, a compressed chunk is decompressed within its size and alone, the bytes
all streams hold are capped, and connections that do nothing are counted and closed."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
import ssl
import struct
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import uvloop
import zstandard
from cryptography import x509

from agent.lifecycle.identity import new_key_and_csr
from agent.replication.chunks import Geometry, RootHasher, chunk_hash
from agent.replication.stream import Stream
from agent.shared.address import ServerAddress
from agent.shared.replication_wire import HEADER, Codec, Header, Hello, Kind, PointClose, frame
from server.api import pki
from server.api.edge import Connections
from server.errors import ChunkCorrupt, ReplicationProtocol, StoreFull
from server.process import receiver as receiver_module
from server.process.receiver import Committer, Receiver, _Budget, _Stream, _verify, stream_tls_context
from server.process.store import ChunkPut, ChunkStore, DiskRow, PointPut

CHUNK = 64 * 1024
HOSTS = [str(uuid.UUID(int=n + 1, version=4)) for n in range(3)]


# The committer -------------------------------------------------------------------------------------------------


class Writer:
    """The stream's socket, as the committer's acknowledgements reach it (the transport boundary)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def write(self, data: bytes) -> None:
        self.sent.append(data)


class FullOnce:
    """A store whose first commit finds the disk full (a later, smaller batch would fit)."""

    def __init__(self) -> None:
        self.committed: list[int] = []
        self.calls = 0

    def commit(self, items: Sequence[ChunkPut | PointPut]) -> list[Exception | None]:
        self.calls += 1
        if self.calls == 1:
            raise StoreFull("full")
        self.committed += [i.seq for i in items]
        return [None] * len(items)


def zero(seq: int) -> ChunkPut:
    return ChunkPut(1, seq, bytes(32), Codec.ZERO, 4096, b"", seq)


def test_frames_after_a_refused_batch_are_not_committed_before_the_stream_fails() -> None:
    loop = asyncio.new_event_loop()
    try:
        store = FullOnce()
        committer = Committer(store)  # type: ignore[arg-type]
        writer: Any = Writer()
        writer.closing = True
        budget = _Budget(1 << 30)
        stream = _Stream("h", "1", DiskRow(1, "h", "/dev/sdb", 1 << 20, 4096, 0), loop, writer, budget)
        other = _Stream("g", "2", DiskRow(2, "g", "/dev/sdb", 1 << 20, 4096, 0), loop, writer, budget)
        committer._commit([(stream, zero(1)), (stream, zero(2))])  # refused: the disk is full
        committer._commit([(stream, zero(3)), (other, zero(4))])  # the stream's fail() has not run on its loop yet
        assert store.committed == [4]  # frame 3 would have made the durable sequence cover 1 and 2
    finally:
        loop.close()


class Held:
    """A store whose first commit waits until it is released."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.committed: list[int] = []

    def commit(self, items: Sequence[ChunkPut | PointPut]) -> list[Exception | None]:
        self.entered.set()
        assert self.release.wait(10)
        self.committed += [i.seq for i in items]
        return [None] * len(items)


def test_after_the_round_under_way_a_stream_marked_dead_has_nothing_committed() -> None:
    """What a reconnection waits for: the round under way (which may hold the old stream's frames) is over, and no
    later round commits a frame of a stream marked dead before the wait."""
    loop = asyncio.new_event_loop()
    store = Held()
    committer = Committer(store)  # type: ignore[arg-type]
    try:
        writer: Any = Writer()
        stream = _Stream("h", "1", DiskRow(1, "h", "/dev/sdb", 1 << 20, 4096, 0), loop, writer, _Budget(1 << 30))
        idle: list[str] = []
        committer.after_round(lambda: idle.append("at once"))
        assert idle == ["at once"]  # nothing under way
        committer.start()
        committer.submit(stream, zero(1))
        assert store.entered.wait(10)
        committer.submit(stream, zero(2))  # queued behind the round under way
        stream.dead = True
        over = threading.Event()
        committer.after_round(over.set)
        assert not over.wait(0.2)
        store.release.set()
        assert over.wait(10)
        assert store.committed == [1]
        committer.submit(stream, zero(3))
        committer.stop()
        assert store.committed == [1]  # frames 2 and 3 of the dead stream: never
    finally:
        store.release.set()
        committer.stop()
        loop.close()


def test_a_point_is_acknowledged_before_anything_that_follows_it_runs(tmp_path: Path) -> None:
    """What follows a point (retention, then collection: the maintenance thread's) never delays its batch: the
    committer acknowledges first. Here it waits as long as it likes, and the stream has its acknowledgement already.
    (The committer pruned and collected before it acknowledged: every agent in the batch waited, and timed out.)"""
    store = ChunkStore(tmp_path / "process", writer=True, reserve=0)
    loop = asyncio.new_event_loop()
    release, running = threading.Event(), threading.Event()
    acked_while_waiting: list[int] = []

    def after_point(host: str, point_id: str) -> None:
        running.set()
        loop.run_until_complete(asyncio.sleep(0))  # the acknowledgements the committer scheduled so far
        acked_while_waiting.append(stream.acked)
        release.wait(10)

    try:
        committer = Committer(store, after_point)
        row, _ = store.open_disk(HOSTS[0], "/dev/sdb", CHUNK, CHUNK)
        stream = _Stream(HOSTS[0], "1", row, loop, Writer(), _Budget(1 << 30))  # type: ignore[arg-type]
        data = os.urandom(CHUNK)
        root = RootHasher(row.geometry)
        root.update(chunk_hash(data))
        close = PointClose(str(uuid.uuid4()), 1.0, root.hexdigest(), "crash-consistent", ("/dev/sdb",))
        committer._commit(
            [
                (stream, ChunkPut(row.disk_key, 0, chunk_hash(data), Codec.RAW, CHUNK, data, 1)),
                (stream, PointPut(row.disk_key, close, 2)),
            ]
        )
        assert running.is_set() and acked_while_waiting == [2]
        assert frame(Kind.ACK, seq=2) in stream.writer.sent  # type: ignore[attr-defined]
    finally:
        release.set()
        loop.close()
        store.close()


@pytest.mark.parametrize("bad", ["a sequence of 2^63", "a point whose closing fails"])
def test_one_bad_stream_in_a_group_commit_fails_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    """One batch holds a good stream's chunks and a bad stream's frame: a sequence SQLite cannot hold (it failed the
    whole batch with an OverflowError, every machine's stream with it), or a frame whose commit breaks in a way the
    store does not expect. The good stream is acknowledged and its data is in the replica; the bad one ends with
    REPL-PROTOCOL, and the pack holds no byte the index does not name."""
    store = ChunkStore(tmp_path / "process", writer=True, reserve=0)
    loop = asyncio.new_event_loop()
    try:
        committer = Committer(store)
        good_row, _ = store.open_disk(HOSTS[0], "/dev/sdb", 2 * CHUNK, CHUNK)
        bad_row, _ = store.open_disk(HOSTS[1], "/dev/sdb", 2 * CHUNK, CHUNK)
        budget = _Budget(1 << 30)
        good = _Stream(HOSTS[0], "1", good_row, loop, Writer(), budget)  # type: ignore[arg-type]
        worse = _Stream(HOSTS[1], "2", bad_row, loop, Writer(), budget)  # type: ignore[arg-type]
        a, b, c = os.urandom(CHUNK), os.urandom(CHUNK), os.urandom(CHUNK)
        if bad == "a sequence of 2^63":
            bad_item: ChunkPut | PointPut = ChunkPut(bad_row.disk_key, 0, chunk_hash(c), Codec.RAW, CHUNK, c, 1 << 63)
        else:
            root = RootHasher(Geometry(2 * CHUNK, CHUNK))
            root.update(chunk_hash(c) * 2)
            close = PointClose(str(uuid.uuid4()), 1.0, root.hexdigest(), "crash-consistent", ("/dev/sdb",))
            bad_item = PointPut(bad_row.disk_key, close, 2)
            real = store._close_point

            def breaks_for_the_bad_disk(db: Any, put: PointPut, now: float, gens: Any) -> Exception | None:
                if put.disk_key == bad_row.disk_key:
                    raise RuntimeError("something the store did not expect")
                return real(db, put, now, gens)

            monkeypatch.setattr(store, "_close_point", breaks_for_the_bad_disk)
        committer._commit(
            [
                (good, ChunkPut(good_row.disk_key, 0, chunk_hash(a), Codec.RAW, CHUNK, a, 1)),
                (worse, ChunkPut(bad_row.disk_key, 1, chunk_hash(c), Codec.RAW, CHUNK, c, 1)),
                (worse, bad_item),
                (good, ChunkPut(good_row.disk_key, 1, chunk_hash(b), Codec.RAW, CHUNK, b, 2)),
            ]
        )
        loop.run_until_complete(asyncio.sleep(0))  # the acknowledgements and failures the committer scheduled
        assert good.failed is None and good.acked == 2 and frame(Kind.ACK, seq=2) in good.writer.sent  # type: ignore[attr-defined]
        assert isinstance(worse.failed, ReplicationProtocol) and worse.acked == 0
        assert bytes(store.head(store.disk(HOSTS[0], "/dev/sdb"))) == chunk_hash(a) + chunk_hash(b)  # type: ignore[arg-type]
        assert store.read(chunk_hash(b), CHUNK) == b
        pack = next(store.packs_dir.glob("*.pack"))
        indexed = store.db.execute("SELECT MAX(offset + stored) FROM chunks").fetchone()[0]
        assert pack.stat().st_size == store.pack_size == indexed
    finally:
        loop.close()
        store.close()


# A compressed chunk ---------------------------------------------------------------------------------------------


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from the current one


def chunk_header(payload: bytes, data: bytes, codec: Codec = Codec.ZSTD) -> Header:
    return Header(Kind.CHUNK, codec, len(payload), 1, 0, len(data), chunk_hash(data))


def test_a_zstd_chunk_is_one_frame_of_its_size_decompressed_by_a_bounded_reader() -> None:
    """A 32 KiB frame that declares 1 GiB took 1 GiB (python-zstandard trusts a declared size over
    max_output_size); skippable frames or bytes after the frame were kept in the pack with the chunk (128 times its
    size); a frame without its size, or with a window larger than any chunk, is not one the agent sends."""
    data = os.urandom(CHUNK // 2) + bytes(CHUNK // 2)
    good = zstandard.ZstdCompressor(level=1).compress(data)
    assert _verify(1, 0, chunk_header(good, data), good).data == good
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(1 << 30))
    assert len(bomb) < 64 * 1024
    skippable = struct.pack("<II", 0x184D2A50, 1 << 20) + bytes(1 << 20)
    unsized = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(data)
    huge_window = zstandard.ZstdCompressor(
        compression_params=zstandard.ZstdCompressionParameters.from_level(1, window_log=27)
    ).compress(data)
    _reset_peak()
    before = psutil.Process().memory_info().rss
    for name, payload in (
        ("a frame declaring 1 GiB", bomb),
        ("skippable frames after it", good + skippable),
        ("skippable frames before it", skippable + good),
        ("trailing bytes", good + b"\0"),
        ("two frames", good + good),
        ("no declared size", unsized),
        ("a truncated frame", good[:-2]),
        ("not zstd", os.urandom(200)),
    ):
        with pytest.raises(ChunkCorrupt):
            _verify(1, 0, chunk_header(payload, data), payload)
        assert _peak_rss() - before < 32 << 20, name
    if zstandard.get_frame_parameters(huge_window).window_size > 16 << 20:  # not single-segment: a real window
        with pytest.raises(ChunkCorrupt):
            _verify(1, 0, chunk_header(huge_window, data), huge_window)


# A receiver in this process --------------------------------------------------------------------------------------


@dataclass
class Running:
    receiver: Receiver
    store: ChunkStore
    port: int
    loop: asyncio.AbstractEventLoop
    contexts: dict[str, ssl.SSLContext]

    def stream(self, host: str, timeout: float = 30.0) -> Stream:
        return Stream(ServerAddress("127.0.0.1", self.port), self.contexts[host], timeout=timeout)

    def call(self, fn: Any) -> Any:
        """``fn()`` on the receiver's loop (its state belongs to that thread)."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)


@contextlib.contextmanager
def receiving(tmp_path: Path, **options: Any) -> Iterator[Running]:
    now = dt.datetime.now(dt.UTC)
    ca = pki.create_ca("test CA", now)
    (tmp_path / "ca.pem").write_bytes(pki.cert_pem(ca.cert))
    key, cert = pki.issue_server_cert(ca, ["127.0.0.1"], now)
    (tmp_path / "server.pem").write_bytes(pki.cert_pem(cert))
    (tmp_path / "server.key").write_bytes(pki.key_pem(key))
    contexts = {}
    for host in HOSTS:
        client_key, csr = new_key_and_csr(host)
        client = pki.issue_client_cert(ca, x509.load_pem_x509_csr(csr), host, now)
        (tmp_path / f"{host}.pem").write_bytes(pki.cert_pem(client))
        (tmp_path / f"{host}.key").write_bytes(pki.key_pem(client_key))
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        ctx.load_cert_chain(tmp_path / f"{host}.pem", tmp_path / f"{host}.key")
        contexts[host] = ctx
    store = ChunkStore(tmp_path / "process", writer=True, reserve=0)
    receiver = Receiver(store, lambda host, serial, disk: True, **options)
    loop = uvloop.new_event_loop()  # as `serve` runs it
    started: list[int] = []
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    context = stream_tls_context(str(tmp_path / "ca.pem"), str(tmp_path / "server.pem"), str(tmp_path / "server.key"))
    started.append(asyncio.run_coroutine_threadsafe(receiver.start("127.0.0.1", 0, context), loop).result(10))
    try:
        yield Running(receiver, store, started[0], loop, contexts)
    finally:
        asyncio.run_coroutine_threadsafe(receiver.close(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        store.close()


def test_the_bytes_all_streams_hold_are_capped_and_all_come_through(tmp_path: Path) -> None:
    """Six streams send while the store cannot commit (its write lock held here): each stream would hold up to its
    own 64 MiB window, and together they held all they sent; with the cap across streams, the receiver holds at
    most the cap (plus one frame) and reads nothing more until acknowledgements free room. Then everything is
    acknowledged and in the replica."""
    cap = 4 << 20
    frames, disks = 100, ("/dev/sdb", "/dev/sdc")
    with receiving(tmp_path, max_inflight_total=cap) as r:
        streams = {(h, d): r.stream(h) for h in HOSTS for d in disks}
        for (_, disk), s in streams.items():
            s.connect(Hello(disk, frames * CHUNK, CHUNK))
        sent: dict[tuple[str, str], list[bytes]] = {key: [] for key in streams}
        errors: list[BaseException] = []

        def send(key: tuple[str, str]) -> None:
            try:
                for i in range(frames):
                    data = os.urandom(CHUNK)
                    sent[key].append(data)
                    streams[key].send(
                        Kind.CHUNK, data, flags=Codec.RAW, offset=i * CHUNK, size=CHUNK, digest=chunk_hash(data)
                    )
                assert streams[key].drain(60), "not everything was acknowledged"
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=send, args=(key,)) for key in streams]
        held = []
        with r.store.write_lock:  # the committer waits: nothing is acknowledged meanwhile
            for t in threads:
                t.start()
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:
                held.append(r.call(lambda: sum(s.inflight for s in r.receiver._streams.values())))
                time.sleep(0.1)
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert max(held) >= cap // 2  # the streams did fill what they were allowed
        assert max(held) <= cap + HEADER.size + CHUNK, f"{max(held) >> 20} MiB held across streams"
        assert r.call(lambda: r.receiver.budget.used) == 0
        for (host, disk), data in sent.items():
            row = r.store.disk(host, disk)
            assert row is not None and bytes(r.store.head(row)) == b"".join(chunk_hash(d) for d in data)


def test_connections_that_do_nothing_are_counted_and_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection counts from its accept: past the share of connections not yet through their handshake and
    HELLO, one is closed at once; one that never starts TLS and one that never sends HELLO are each closed after
    their time, and so is one whose frame's payload does not come. A stream that sends nothing stays (its agent may
    be reading a whole disk for a resync), with TCP keepalive to find a peer that is gone; the counts go back to
    zero."""
    monkeypatch.setattr(receiver_module, "HANDSHAKE_SECONDS", 1.0)
    monkeypatch.setattr(receiver_module, "HELLO_SECONDS", 1.0)
    monkeypatch.setattr(receiver_module, "PAYLOAD_SECONDS", 1.0)
    monkeypatch.setattr(receiver_module, "RECHECK_SECONDS", 0.2)
    connections = Connections(12)  # a quarter, 3, may be unverified at once
    with receiving(tmp_path, connections=connections) as r:

        def closed_within(sock: socket.socket, seconds: float) -> float:
            start = time.monotonic()
            sock.settimeout(seconds + 5)
            with contextlib.suppress(ConnectionResetError, ssl.SSLError):
                while sock.recv(65536):
                    pass
            return time.monotonic() - start

        idle = [socket.create_connection(("127.0.0.1", r.port)) for _ in range(3)]
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", r.port))
        assert closed_within(extra, 0.5) < 0.5  # refused at its accept, before any handshake
        assert r.call(lambda: (connections.streams, connections.streams_unverified, connections.refused)) == (3, 3, 1)
        assert all(closed_within(s, 1.0) < 2.5 for s in idle)  # no TLS handshake within HANDSHAKE_SECONDS
        silent = r.contexts[HOSTS[0]].wrap_socket(
            socket.create_connection(("127.0.0.1", r.port)), server_hostname="127.0.0.1"
        )
        assert closed_within(silent, 1.0) < 2.5  # no HELLO within HELLO_SECONDS
        silent.close()
        quiet, trickle = r.stream(HOSTS[0]), r.stream(HOSTS[1])
        quiet.connect(Hello("/dev/sdb", CHUNK, CHUNK))
        trickle.connect(Hello("/dev/sdb", CHUNK, CHUNK))
        counted(r, lambda: (r.receiver.streams, connections.streams, connections.streams_unverified), (2, 2, 0))
        assert trickle.sock is not None and quiet.sock is not None
        trickle.sock.sendall(Header(Kind.CHUNK, Codec.RAW, CHUNK, 1, 0, CHUNK, bytes(32)).pack() + bytes(100))
        assert closed_within(trickle.sock, 1.0) < 2.5  # its payload did not come within PAYLOAD_SECONDS
        time.sleep(2.0)
        assert r.call(lambda: r.receiver.streams) == 1 and quiet.pump(0) == 0  # the quiet one is still there
        keepalive = r.call(
            lambda: [
                (
                    s.writer.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    s.writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                )
                for s in r.receiver._streams.values()
            ]
        )
        assert keepalive == [(1, receiver_module.KEEPALIVE[0])]
        for s in (*idle, extra):
            s.close()
        quiet.close()
        trickle.close()
        counted(r, lambda: (r.receiver.streams, connections.streams, connections.streams_unverified), (0, 0, 0))


def counted(r: Running, what: Any, expected: tuple[int, ...]) -> None:
    deadline = time.monotonic() + 5
    while (got := r.call(what)) != expected:
        assert time.monotonic() < deadline, f"counted {got}, not {expected}"
        time.sleep(0.1)
