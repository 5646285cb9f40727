"""Delta records of BATCH frames against a real receiver and store (over real TLS): a delta is rebuilt from exactly
the base it names and kept only with the hash the agent computed; a base the server does not have (never sent, or in
a damaged pack) or blocks that do not give that hash are refused, the batch is still acknowledged, and the whole
chunk sent after it is kept: never a wrong chunk."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from agent.errors import RemoteError
from agent.replication.chunks import chunk_hash, zero_hash
from agent.replication.stream import Stream
from agent.shared.replication_wire import (
    Codec,
    Hello,
    Kind,
    ProtocolError,
    Record,
    Welcome,
    batch_payload,
    parse_batch,
)
from tests.server.process.stores import locate
from tests.server.process.test_receiver import CHUNK, HOSTS, receiving

BLOCK = 4096


def with_blocks(base: bytes, blocks: dict[int, bytes]) -> bytes:
    out = bytearray(base)
    for b, data in blocks.items():
        out[b * BLOCK : (b + 1) * BLOCK] = data
    return bytes(out)


def delta(index: int, base: bytes, new: bytes, blocks: list[int], *, base_hash: bytes | None = None) -> Record:
    payload = b"".join(new[b * BLOCK : (b + 1) * BLOCK] for b in blocks)
    mask = sum(1 << b for b in blocks)
    return Record(index, Codec.DELTA, CHUNK, chunk_hash(new), payload, mask, base_hash or chunk_hash(base))


def whole(index: int, data: bytes) -> Record:
    return Record(index, Codec.RAW, CHUNK, chunk_hash(data), data)


class Sender:
    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.refused: dict[int, list[int]] = {}
        self.lock = threading.Lock()

    def batch(self, *records: Record) -> int:
        seq = self.stream.next_seq

        def refused(positions: list[int]) -> None:
            self.refused[seq] = positions

        return self.stream.send(
            Kind.BATCH,
            batch_payload(list(records)),
            size=len(records),
            on_refused=refused,
            deltas=[k for k, r in enumerate(records) if r.delta],
        )


def test_deltas_are_rebuilt_from_their_base_and_refused_without_it(tmp_path: Path) -> None:
    with receiving(tmp_path) as r:
        s = r.stream(HOSTS[0])
        welcome = s.connect(Hello("/dev/sdb", 4 * CHUNK, CHUNK))
        assert welcome.version >= 2 and s.batches
        send = Sender(s)
        a = os.urandom(CHUNK)
        b = with_blocks(a, {3: os.urandom(BLOCK), 15: os.urandom(BLOCK)})
        stranger = os.urandom(CHUNK)
        wrong = with_blocks(a, {5: os.urandom(BLOCK)})
        send.batch(whole(0, a))
        ok = send.batch(delta(0, a, b, [3, 15]))  # over a chunk of this stream, maybe not committed yet
        unknown = send.batch(delta(1, stranger, with_blocks(stranger, {0: os.urandom(BLOCK)}), [0]))
        # Blocks that do not give the hash they claim (a write the agent's map did not show yet): refused.
        lying = send.batch(Record(2, Codec.DELTA, CHUNK, chunk_hash(wrong), wrong[:BLOCK], 1, chunk_hash(bytes(CHUNK))))
        zeros_base = send.batch(delta(3, bytes(CHUNK), with_blocks(bytes(CHUNK), {7: b"x" * BLOCK}), [7]))
        assert s.drain(30)
        assert ok not in send.refused and zeros_base not in send.refused
        assert send.refused == {unknown: [0], lying: [0]}
        row = r.store.disk(HOSTS[0], "/dev/sdb")
        assert row is not None
        head = bytes(r.store.head(row))
        assert head[0:32] == chunk_hash(b)
        assert head[32:64] == zero_hash(CHUNK) and head[64:96] == zero_hash(CHUNK)  # nothing of a refused delta
        assert head[96:128] == chunk_hash(with_blocks(bytes(CHUNK), {7: b"x" * BLOCK}))
        assert r.store.read(chunk_hash(b), CHUNK) == b
        assert row.acked_seq == s.acked  # a batch that kept nothing is durable in sequence all the same
        # The agent's answer to a refusal: the chunk whole.
        send.batch(whole(1, stranger))
        assert s.drain(30)
        row = r.store.disk(HOSTS[0], "/dev/sdb")
        assert row is not None and bytes(r.store.head(row))[32:64] == chunk_hash(stranger)


def test_a_base_in_a_damaged_pack_is_refused_and_the_whole_chunk_then_kept(tmp_path: Path) -> None:
    with receiving(tmp_path) as r:
        s = r.stream(HOSTS[0])
        s.connect(Hello("/dev/sdb", 2 * CHUNK, CHUNK))
        send = Sender(s)
        a = os.urandom(CHUNK)
        send.batch(whole(0, a))
        assert s.drain(30)
        where = locate(r.store, chunk_hash(a))
        assert where is not None
        pack, offset, length = where
        with pack.open("r+b") as f:
            f.seek(offset + length // 2)
            byte = f.read(1)[0]
            f.seek(offset + length // 2)
            f.write(bytes([byte ^ 1]))
        b = with_blocks(a, {1: os.urandom(BLOCK)})
        refused = send.batch(delta(0, a, b, [1]))
        assert s.drain(30)
        assert send.refused == {refused: [0]}
        row = r.store.disk(HOSTS[0], "/dev/sdb")
        assert row is not None and bytes(r.store.head(row))[:32] == chunk_hash(a)  # never the wrong chunk
        send.batch(whole(0, b))
        assert s.drain(30)
        row = r.store.disk(HOSTS[0], "/dev/sdb")
        assert row is not None and bytes(r.store.head(row))[:32] == chunk_hash(b)
        assert r.store.read(chunk_hash(b), CHUNK) == b


def test_a_refusal_whose_check_was_lost_with_the_connection_is_not_taken_for_an_applied_delta(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process server refuses a delta (a base it does not hold), commits its batch, and the connection breaks
    before the agent read the CHECKED that said so: the WELCOME of the next connection says the batch is durable, and
    the agent takes every delta of it as refused (its chunk then goes whole), never as applied."""
    with receiving(tmp_path) as r:
        s = r.stream(HOSTS[0])
        s.connect(Hello("/dev/sdb", 2 * CHUNK, CHUNK))
        send = Sender(s)
        a = os.urandom(CHUNK)
        send.batch(whole(0, a))
        assert s.drain(30)
        stranger = os.urandom(CHUNK)
        with monkeypatch.context() as m:
            m.setattr(s, "pump", lambda wait: s.acked)  # nothing the server answers is read
            changed = with_blocks(stranger, {0: os.urandom(BLOCK)})
            seq = send.batch(whole(0, with_blocks(a, {2: os.urandom(BLOCK)})), delta(1, stranger, changed, [0]))
            s.flush()
            deadline = time.monotonic() + 30
            while (row := r.store.disk(HOSTS[0], "/dev/sdb")) is None or row.acked_seq < seq:
                assert time.monotonic() < deadline, "the batch was not committed"
                time.sleep(0.01)
            s.close()  # its CHECKED and ACK unread
        assert send.refused == {}
        assert s.connect(Hello("/dev/sdb", 2 * CHUNK, CHUNK)).acked_seq == seq
        assert send.refused == {seq: [1]} and not s.window
        assert bytes(r.store.head(row))[32:64] == zero_hash(CHUNK)  # what the agent now knows: not applied


def test_an_agent_of_version_1_sends_chunks_and_may_not_send_batches(tmp_path: Path) -> None:
    with receiving(tmp_path) as r:
        s = r.stream(HOSTS[1])
        s.connect(Hello("/dev/sdb", 2 * CHUNK, CHUNK, version=1))
        a = os.urandom(CHUNK)
        s.send(Kind.CHUNK, a, flags=Codec.RAW, offset=0, size=CHUNK, digest=chunk_hash(a))
        assert s.drain(30)
        s.send(Kind.BATCH, batch_payload([whole(1, a)]), size=1)
        with pytest.raises(RemoteError) as refused:
            s.drain(30)
        assert refused.value.id == "REPL-PROTOCOL" and "unexpected BATCH" in refused.value.message
    # A server of version 1 says nothing of its version: the agent sends it CHUNK frames.
    assert Welcome.from_json({"acked_seq": 3, "known": True}).version == 1


def packed(*records: Record) -> bytes:
    return b"".join(bytes(p) for p in batch_payload(list(records)))


def test_batch_records_are_bounded_where_they_are_parsed() -> None:
    a = os.urandom(CHUNK)
    good = packed(whole(0, a), delta(1, a, a, [2]))
    assert [r.index for r in parse_batch(good, 2, CHUNK, 2)] == [0, 1]
    cases = {
        "past the frame|ends inside": (good[:-10], 2),
        "after a batch": (good + b"x", 2),
        "not a chunk of this disk": (b"".join(bytes(p) for p in batch_payload([whole(5, a)])), 1),
        "sub-block mask": (
            b"".join(bytes(p) for p in batch_payload([Record(0, Codec.DELTA, CHUNK, a[:32], b"", 0)])),
            1,
        ),
        "not its sub-blocks": (
            b"".join(bytes(p) for p in batch_payload([Record(0, Codec.DELTA, CHUNK, a[:32], a[:100], 1)])),
            1,
        ),
        "only a delta": (
            b"".join(bytes(p) for p in batch_payload([Record(0, Codec.RAW, CHUNK, a[:32], a, 0, b"b" * 32)])),
            1,
        ),
    }
    for match, (payload, count) in cases.items():
        with pytest.raises(ProtocolError, match=match):
            parse_batch(payload, count, CHUNK, 2)
