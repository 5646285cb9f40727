"""server/process/receiver.py's frame handling, seen from the agent's side of one stream (agent/replication/
stream.py's Stream, real TLS, a real chunk store, no root): frames apply in sequence order and out-of-order ones
end the stream, a chunk must be a chunk of the disk and match its hash, what is refused is never kept, and a
reconnection is welcomed with exactly what was made durable and the replica's hashes."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.errors import ProcessServerUnreachable, RemoteError
from agent.replication.chunks import chunk_hash, zero_hash
from agent.shared.replication_wire import HASH_SIZE, Codec, Hello, Kind
from server.process.store import ChunkPut, PointPut
from tests.server.process.test_receiver import CHUNK, HOSTS, Running, receiving

DISK = "/dev/sdb"
CHUNKS = 8
HELLO = Hello(DISK, CHUNKS * CHUNK, CHUNK)


def send_chunk(stream: object, index: int, data: bytes, digest: bytes | None = None, offset: int | None = None) -> int:
    return stream.send(  # type: ignore[attr-defined,no-any-return]
        Kind.CHUNK,
        data,
        flags=Codec.RAW,
        offset=index * CHUNK if offset is None else offset,
        size=len(data),
        digest=chunk_hash(data) if digest is None else digest,
    )


def replica_hashes(r: Running) -> tuple[int, bytes]:
    """What a new connection is welcomed with: the durable count and the replica's chunk hashes."""
    got: list[bytes] = []
    stream = r.stream(HOSTS[0])
    welcome = stream.connect(Hello(DISK, CHUNKS * CHUNK, CHUNK, want_hashes=True), lambda _, h: got.append(h))
    stream.close()
    return welcome.acked_seq, b"".join(got)


def refused(r: Running, send: object) -> RemoteError:
    """The error the receiver ends a stream with after ``send(stream)``."""
    stream = r.stream(HOSTS[0], timeout=10.0)
    stream.connect(HELLO)
    with pytest.raises(RemoteError) as e:
        send(stream)  # type: ignore[operator]
        stream.drain(10.0)
    return e.value


def test_chunks_are_kept_acknowledged_and_welcomed_back_with_the_replica_hashes(tmp_path: Path) -> None:
    data = [os.urandom(CHUNK) for _ in range(3)]
    with receiving(tmp_path) as r:
        stream = r.stream(HOSTS[0])
        assert stream.connect(HELLO).acked_seq == 0
        for i, d in enumerate(data):
            send_chunk(stream, i, d)
        assert stream.drain(10.0) and stream.acked == 3
        stream.close()
        acked, hashes = replica_hashes(r)
    assert acked == 3
    assert hashes == b"".join(chunk_hash(d) for d in data) + zero_hash(CHUNK) * (CHUNKS - 3)


def test_a_frame_out_of_sequence_ends_the_stream_and_is_not_kept(tmp_path: Path) -> None:
    first, second = os.urandom(CHUNK), os.urandom(CHUNK)

    def backwards(stream: object) -> None:
        send_chunk(stream, 0, first)
        stream.drain(10.0)  # type: ignore[attr-defined]
        stream.next_seq = 1  # type: ignore[attr-defined]  # the same number again
        send_chunk(stream, 1, second)

    with receiving(tmp_path) as r:
        error = refused(r, backwards)
        acked, hashes = replica_hashes(r)
    assert error.id == "REPL-PROTOCOL" and "frames must be sent in order" in error.message
    assert acked == 1 and hashes[HASH_SIZE : 2 * HASH_SIZE] == zero_hash(CHUNK)


@pytest.mark.parametrize(
    ("offset", "size"),
    [(CHUNK // 2, CHUNK), (CHUNKS * CHUNK, CHUNK), (0, CHUNK // 2)],
    ids=["not on a chunk boundary", "past the disk's end", "shorter than its chunk"],
)
def test_a_chunk_that_is_not_a_chunk_of_the_disk_ends_the_stream(tmp_path: Path, offset: int, size: int) -> None:
    data = os.urandom(size)
    with receiving(tmp_path) as r:
        error = refused(r, lambda stream: send_chunk(stream, 0, data, offset=offset))
        acked, hashes = replica_hashes(r)
    assert error.id == "REPL-PROTOCOL" and "is not a chunk" in error.message
    assert acked == 0 and hashes == zero_hash(CHUNK) * CHUNKS


def test_a_chunk_that_does_not_match_its_hash_is_refused_and_nothing_after_it_is_kept(tmp_path: Path) -> None:
    good, bad, later = os.urandom(CHUNK), os.urandom(CHUNK), os.urandom(CHUNK)

    def corrupt(stream: object) -> None:
        send_chunk(stream, 0, good)
        stream.drain(10.0)  # type: ignore[attr-defined]
        send_chunk(stream, 1, bad, digest=chunk_hash(b"something else"))
        send_chunk(stream, 2, later)

    with receiving(tmp_path) as r:
        error = refused(r, corrupt)
        acked, hashes = replica_hashes(r)
    assert error.id == "REPL-CHUNK-CORRUPT" and "does not match its hash" in error.message
    assert acked == 1
    assert hashes[:HASH_SIZE] == chunk_hash(good) and hashes[HASH_SIZE:] == zero_hash(CHUNK) * (CHUNKS - 1)


def test_a_frame_only_the_server_sends_ends_the_stream(tmp_path: Path) -> None:
    with receiving(tmp_path) as r:
        error = refused(r, lambda stream: stream.send(Kind.ACK, b""))
    assert error.id == "REPL-PROTOCOL" and "unexpected ACK" in error.message


def test_a_reconnection_replaces_the_old_stream_and_numbering_goes_on(tmp_path: Path) -> None:
    """The agent reconnects while its old connection still looks open to the server: the new stream is welcomed with
    what was durable, the old one is closed, and the frames of the new one (numbered on) are kept."""
    a, b = os.urandom(CHUNK), os.urandom(CHUNK)
    with receiving(tmp_path) as r:
        old = r.stream(HOSTS[0])
        old.connect(HELLO)
        send_chunk(old, 0, a)
        assert old.drain(10.0)
        new = r.stream(HOSTS[0])
        new.next_seq = old.next_seq
        assert new.connect(HELLO).acked_seq == 1
        send_chunk(new, 1, b)
        assert new.drain(10.0) and new.acked == 2
        with pytest.raises(ProcessServerUnreachable):  # closed under it
            old.pump(5.0)
        new.close()
        acked, hashes = replica_hashes(r)
    assert acked == 2 and hashes[: 2 * HASH_SIZE] == chunk_hash(a) + chunk_hash(b)


@pytest.mark.parametrize("old_gone_first", [False, True], ids=["old-stream-open", "old-connection-ended-first"])
def test_a_reconnection_is_welcomed_only_once_the_old_streams_frames_can_no_longer_be_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old_gone_first: bool
) -> None:
    """The agent reconnects while a commit holding a frame of its old stream is under way (slowed here at the store's
    boundary): the WELCOME must say what is durable once that commit is over, not what was durable when the HELLO
    came, and nothing of the old stream may be committed after it. (The WELCOME said 1, then the old stream's frame 2
    was committed: the durable sequence ran ahead of what the new stream was told.) Also when the server saw the old
    connection end before the HELLO came (a killed agent): its stream is gone from the server's table then, but not
    its frames from the commit under way."""
    a, b, c = os.urandom(CHUNK), os.urandom(CHUNK), os.urandom(CHUNK)
    with receiving(tmp_path) as r:
        old = r.stream(HOSTS[0])
        old.connect(HELLO)
        send_chunk(old, 0, a)
        assert old.drain(10.0)
        entered, release = threading.Event(), threading.Event()
        commit = r.store.commit

        def slow(items: Sequence[ChunkPut | PointPut]) -> list[Exception | None]:
            if any(i.seq == 2 for i in items):
                entered.set()
                release.wait(30)
            return commit(items)

        monkeypatch.setattr(r.store, "commit", slow)
        send_chunk(old, 0, b)
        old.flush()
        assert entered.wait(10), "frame 2 did not reach the store"
        if old_gone_first:
            old.close()
            deadline = time.monotonic() + 10
            while r.call(lambda: len(r.receiver._streams)):
                assert time.monotonic() < deadline, "the server never saw the old connection end"
                time.sleep(0.01)
        timer = threading.Timer(1.0, release.set)  # the commit ends a second from now
        timer.start()
        new = r.stream(HOSTS[0])
        new.next_seq = old.next_seq
        welcome = new.connect(HELLO)
        timer.join()
        deadline = time.monotonic() + 10
        while (row := r.store.disk(HOSTS[0], DISK)) is None or row.acked_seq < 2:
            assert time.monotonic() < deadline, "frame 2 was never committed"
            time.sleep(0.01)
        assert welcome.acked_seq == row.acked_seq == 2
        send_chunk(new, 0, c)
        assert new.drain(10.0) and new.acked == 3
        new.close()
        acked, hashes = replica_hashes(r)
    assert acked == 3 and hashes[:HASH_SIZE] == chunk_hash(c)
