"""agent/replication/stream.py against a simulated process server (tests/agent/replication/simulator.py): what
the window settles, hands back and refuses when acknowledgements are dropped, delayed, reordered or duplicated, when
the connection is cut before or after a frame is durable, and when the server errs, refuses a batch's records or lost
what it had acknowledged. Real TLS on loopback, no root, milliseconds each."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.errors import ProcessServerUnreachable, RemoteError, ReplicaLost
from agent.replication.chunks import zero_hash
from agent.replication.stream import Stream
from agent.shared.address import ServerAddress
from agent.shared.replication_wire import (
    HASH_SIZE,
    Codec,
    Hello,
    Kind,
    PointClose,
    ProtocolError,
    Record,
    StreamError,
    batch_payload,
)
from tests.agent.replication.simulator import Faults, ProcessServerSimulator, simulated

HELLO = Hello("/dev/sdb", 64 * 65536, 65536)
BATCH = b"".join(bytes(p) for p in batch_payload([Record(0, Codec.ZERO, 65536, zero_hash(65536), b"")]))
POINT = json.dumps(
    PointClose(str(uuid.uuid4()), time.time(), "0" * 64, "crash-consistent", ("/dev/sdb",)).to_json()
).encode()


@dataclass
class Ledger:
    """What each frame's acknowledgement, loss or refusal settled, in the order it happened."""

    acked: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    refused: dict[int, list[int]] = field(default_factory=dict)

    def send(self, stream: Stream, n: int, kind: Kind = Kind.CHUNK, deltas: tuple[int, ...] = ()) -> list[int]:
        seqs = []
        for _ in range(n):
            seq = stream.next_seq
            seqs.append(
                stream.send(
                    kind,
                    BATCH if kind is Kind.BATCH else POINT if kind is Kind.POINT else b"x" * 100,
                    flags=Codec.RAW if kind is Kind.CHUNK else 0,
                    size=100 if kind is Kind.CHUNK else 1 if kind is Kind.BATCH else 0,
                    since=time.time(),
                    on_ack=lambda s=seq: self.acked.append(s),
                    on_lost=lambda s=seq: self.lost.append(s),
                    on_refused=lambda positions, s=seq: self.refused.__setitem__(s, positions),
                    deltas=deltas,
                )
            )
        return seqs


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[ProcessServerSimulator]:
    with simulated(tmp_path) as s:
        yield s


def stream_to(sim: ProcessServerSimulator, **options: float) -> Stream:
    return Stream(ServerAddress("127.0.0.1", sim.port), sim.client_context, **options)  # type: ignore[arg-type]


def test_each_frame_is_settled_once_in_order_whatever_order_and_how_often_acks_come(
    sim: ProcessServerSimulator,
) -> None:
    sim.faults = Faults(reorder=4, duplicate=True)  # ACKs come four at a time, newest first, each twice
    stream, ledger = stream_to(sim), Ledger()
    stream.connect(HELLO)
    seqs = ledger.send(stream, 20)
    assert seqs == list(range(1, 21))
    assert stream.drain(5.0)
    assert ledger.acked == seqs and ledger.lost == []
    assert (stream.acked, len(stream.window), stream.window_size) == (20, 0, 0)
    assert stream.oldest_unacked() is None


def test_a_lost_ack_is_covered_by_a_later_one(sim: ProcessServerSimulator) -> None:
    sim.faults = Faults(drop_acks=set(range(1, 10)))  # only the ACK of frame 10 arrives: it covers 1 to 9 too
    stream, ledger = stream_to(sim), Ledger()
    stream.connect(HELLO)
    ledger.send(stream, 10)
    assert stream.drain(5.0)
    assert ledger.acked == list(range(1, 11)) and ledger.lost == []


def test_frames_durable_but_never_acknowledged_are_settled_by_the_next_welcome_not_sent_again(
    sim: ProcessServerSimulator,
) -> None:
    """The lost-ack path: the server made 1 to 6 durable and its ACKs were lost with the connection; the WELCOME of
    the next one says so, and nothing is handed back to be sent again."""
    sim.faults = Faults(silent=True)
    stream, ledger = stream_to(sim), Ledger()
    stream.connect(HELLO)
    ledger.send(stream, 6)
    stream.flush()
    sim.wait_for_frames(6)
    sim.cut()
    with pytest.raises(ProcessServerUnreachable):
        stream.drain(5.0)
    assert ledger.acked == [] and not stream.connected
    sim.faults = Faults()
    welcome = stream.connect(HELLO)
    assert welcome.acked_seq == 6
    assert ledger.acked == list(range(1, 7)) and ledger.lost == []
    assert ledger.send(stream, 1) == [7]  # numbering goes on past what the server holds


def test_a_cut_before_frames_are_durable_hands_them_back_once_and_numbering_goes_on(
    sim: ProcessServerSimulator,
) -> None:
    """The resend path: frames 1 to 3 are durable and acknowledged; the link dies as frame 4 arrives (not durable):
    4 and 5 are handed back (``on_lost``, once each) when the stream reconnects, and what is sent again gets new
    numbers above everything the server saw, so it can never be taken for the lost frames."""
    sim.faults = Faults(cut_at=4, durable_at_cut=False)
    stream, ledger = stream_to(sim), Ledger()
    stream.connect(HELLO)
    ledger.send(stream, 3)
    assert stream.drain(5.0)
    ledger.send(stream, 2)
    with pytest.raises(ProcessServerUnreachable):
        stream.drain(5.0)
    assert ledger.acked == [1, 2, 3] and ledger.lost == []  # handed back only once the server says what it holds
    stream.connect(HELLO)
    assert ledger.lost == [4, 5]
    assert ledger.send(stream, 2) == [6, 7]
    assert stream.drain(5.0)
    assert ledger.acked == [1, 2, 3, 6, 7] and ledger.lost == [4, 5]
    assert sim.seqs(connection=2) == [6, 7]


def test_a_cut_after_the_frame_is_durable_settles_it_on_reconnection(sim: ProcessServerSimulator) -> None:
    sim.faults = Faults(cut_at=3, durable_at_cut=True)
    stream, ledger = stream_to(sim), Ledger()
    stream.connect(HELLO)
    ledger.send(stream, 4)
    with pytest.raises(ProcessServerUnreachable):
        stream.drain(5.0)
    stream.connect(HELLO)
    assert ledger.acked == [1, 2, 3] and ledger.lost == [4]


def test_a_point_in_flight_when_the_link_dies_is_abandoned(sim: ProcessServerSimulator) -> None:
    """A POINT frame is settled like any other: its loss is handed back (the point is cut afresh), and a point whose
    frame was durable is acknowledged by the next WELCOME."""
    sim.faults = Faults(cut_at=2)
    stream, ledger = stream_to(sim), Ledger()
    stream.connect(HELLO)
    ledger.send(stream, 1)
    (point,) = ledger.send(stream, 1, Kind.POINT)
    with pytest.raises(ProcessServerUnreachable):
        stream.drain(5.0)
    stream.connect(HELLO)
    assert ledger.lost == [point] and point not in ledger.acked
    sim.faults = Faults(silent=True)
    (again,) = ledger.send(stream, 1, Kind.POINT)
    stream.flush()
    sim.wait_for_frames(3)
    sim.cut()
    sim.faults = Faults()
    with pytest.raises(ProcessServerUnreachable):
        stream.drain(5.0)
    stream.connect(HELLO)
    assert again in ledger.acked and again not in ledger.lost
    assert len(sim.points) == 1  # the durable one only


def test_a_full_window_without_acknowledgements_fails_within_the_timeout(sim: ProcessServerSimulator) -> None:
    sim.faults = Faults(silent=True)
    stream, ledger = stream_to(sim, window_bytes=1000, timeout=0.2), Ledger()
    stream.connect(HELLO)
    started = time.monotonic()
    with pytest.raises(ProcessServerUnreachable, match="no acknowledgement for 0 s"):
        ledger.send(stream, 50)
    assert time.monotonic() - started < 2.0
    assert not stream.connected and ledger.acked == []


def test_delayed_acknowledgements_are_waited_for_within_the_bound(sim: ProcessServerSimulator) -> None:
    sim.faults = Faults(ack_delay=0.3)
    stream, ledger = stream_to(sim), Ledger()
    stream.connect(HELLO)
    ledger.send(stream, 1)
    assert not stream.drain(0.05)  # not yet: still in the window
    assert stream.oldest_unacked() is not None
    assert stream.drain(5.0) and ledger.acked == [1]


def test_a_server_that_lost_acknowledged_frames_is_reported_and_its_count_taken(
    sim: ProcessServerSimulator,
) -> None:
    stream, ledger = stream_to(sim), Ledger()
    stream.connect(HELLO)
    ledger.send(stream, 5)
    assert stream.drain(5.0)
    sim.cut()
    sim.faults = Faults(welcome_acked=2)  # restored from an old backup
    with pytest.raises(ReplicaLost, match="acknowledged up to 5 before and now holds only 2"):
        stream.connect(HELLO)
    assert stream.acked == 2
    stream.connect(HELLO)  # the next connection does not say so again
    assert ledger.send(stream, 1) == [6]


def test_an_error_from_the_server_ends_the_stream_with_its_id_and_fix(sim: ProcessServerSimulator) -> None:
    sim.faults = Faults(error_at=(2, StreamError("PS-STORE-FULL", "the store is full", "free space")))
    stream, ledger = stream_to(sim), Ledger()
    stream.connect(HELLO)
    ledger.send(stream, 2)
    with pytest.raises(RemoteError) as e:
        stream.drain(5.0)
    assert (e.value.id, e.value.fix) == ("PS-STORE-FULL", "free space")
    assert not stream.connected and ledger.acked == [1]


def test_records_a_batch_check_refuses_are_handed_to_the_batch_which_is_still_acknowledged(
    sim: ProcessServerSimulator,
) -> None:
    sim.faults = Faults(refused={2: [0, 3]})
    stream, ledger = stream_to(sim), Ledger()
    stream.connect(HELLO)
    ledger.send(stream, 3, Kind.BATCH)
    assert stream.wait_checked(5.0) and stream.drain(5.0)
    assert ledger.refused == {2: [0, 3]} and ledger.acked == [1, 2, 3]
    assert stream.batches and stream.last_batch == 3


def test_a_batch_made_durable_whose_check_was_lost_has_every_delta_taken_as_refused(
    sim: ProcessServerSimulator,
) -> None:
    """The server verified batch 3 (refusing a delta) and committed it, and the connection broke before the agent
    read its CHECKED: the next WELCOME settles the batch, and nobody will ever name the delta it refused. Every delta
    of such a batch is handed back as refused (its chunk is sent whole); a batch whose CHECKED came, or that carries
    no delta, is settled as it is. (The refused delta was settled as applied: the replica kept the chunk's old
    content while the agent believed it current.)"""
    sim.faults = Faults(silent=True, refused={3: [1]}, drop_checked={2, 3})
    stream, ledger = stream_to(sim), Ledger()
    stream.connect(HELLO)
    ledger.send(stream, 1, Kind.BATCH, deltas=(0,))  # answered: nothing refused
    ledger.send(stream, 1, Kind.BATCH)  # no delta
    ledger.send(stream, 1, Kind.BATCH, deltas=(0, 1, 4))
    stream.flush()
    sim.wait_for_frames(3)
    deadline = time.monotonic() + 5
    while stream.checked < 1:
        assert time.monotonic() < deadline, "the CHECKED of batch 1 did not come"
        stream.pump(0.1)
    sim.cut()
    with pytest.raises(ProcessServerUnreachable):
        stream.drain(5.0)
    assert ledger.refused == {} and ledger.acked == []
    sim.faults = Faults()
    assert stream.connect(HELLO).acked_seq == 3
    assert ledger.acked == [1, 2, 3] and ledger.lost == []
    assert ledger.refused == {3: [0, 1, 4]}


def test_the_replica_hashes_arrive_with_their_offsets_and_bad_ones_are_refused(sim: ProcessServerSimulator) -> None:
    hashes = bytes(range(HASH_SIZE)) * 10
    sim.faults = Faults(hashes=hashes)
    stream = stream_to(sim)
    got: list[tuple[int, bytes]] = []
    stream.connect(Hello("/dev/sdb", 64 * 65536, 65536, want_hashes=True), lambda first, h: got.append((first, h)))
    assert [first for first, _ in got] == [0, 4, 8] and b"".join(h for _, h in got) == hashes
    assert sim.hellos[-1].want_hashes
    sim.cut()
    sim.faults = Faults(bad_hashes=True)
    with pytest.raises(ProtocolError, match="expected HASHES"):
        stream.connect(Hello("/dev/sdb", 64 * 65536, 65536, want_hashes=True), lambda first, h: None)
    assert not stream.connected


def test_a_server_that_closes_the_stream_is_unreachable_and_nothing_waits(sim: ProcessServerSimulator) -> None:
    stream = stream_to(sim)
    stream.connect(HELLO)
    sim.cut()
    with pytest.raises(ProcessServerUnreachable):
        stream.pump(5.0)
    assert not stream.connected
    with pytest.raises(ProcessServerUnreachable, match="not connected"):
        stream.pump(0)


def test_no_server_listening_is_unreachable(tmp_path: Path) -> None:
    sim = ProcessServerSimulator(tmp_path / "tls")
    port = sim.port
    sim.close()
    stream = Stream(ServerAddress("127.0.0.1", port), sim.client_context)
    with pytest.raises(ProcessServerUnreachable):
        stream.connect(HELLO)
