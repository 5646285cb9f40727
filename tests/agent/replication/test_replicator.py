"""A disk's replication thread (agent/replication/sync.py's DiskReplicator: the initial sync, continuous replication
and a point's closing, over agent/replication/stream.py) against a simulated process server
(tests/agent/replication/simulator.py) that cuts the connection and loses acknowledgements: the replica converges to
the disk, what was durable is never sent again, what was not is, and a point whose frame was lost is not closed.

The disk is an image file read with O_DIRECT, as a block device is; only the two ioctls a regular file does not
answer (its size and sector size) are answered from the file here. No root; the writes a tracer would report are
marked in the dirty map directly. tests/integration/test_replication.py runs the whole path on loop devices."""

from __future__ import annotations

import os
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agent.replication import devices
from agent.replication.chunks import RootHasher, chunk_hash
from agent.replication.devices import BlockDevice
from agent.replication.stream import Stream
from agent.replication.sync import _UNKNOWN as UNKNOWN
from agent.replication.sync import Capture, DiskReplicator, JobResult
from agent.shared.address import ServerAddress
from agent.shared.replication_wire import Kind, Record, parse_batch
from tests.agent.replication.simulator import Faults, ProcessServerSimulator, disk_hashes, simulated, wait

CHUNK = 65536
CHUNKS = 48


@pytest.fixture(autouse=True)
def image_files_answer_as_disks(monkeypatch: pytest.MonkeyPatch) -> None:
    device_size, sector_size = devices.device_size, devices.sector_size

    def size(fd: int) -> int:
        st = os.fstat(fd)
        return st.st_size if stat.S_ISREG(st.st_mode) else device_size(fd)

    def sector(fd: int) -> int:
        return 512 if stat.S_ISREG(os.fstat(fd).st_mode) else sector_size(fd)

    monkeypatch.setattr(devices, "device_size", size)
    monkeypatch.setattr(devices, "sector_size", sector)


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[ProcessServerSimulator]:
    with simulated(tmp_path) as s:
        yield s


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    data = bytearray(os.urandom(CHUNKS * CHUNK))
    data[10 * CHUNK : 20 * CHUNK] = bytes(10 * CHUNK)  # zero chunks travel as ZERO records
    path.write_bytes(data)
    return path


@pytest.fixture
def start(tmp_path: Path, sim: ProcessServerSimulator, image: Path) -> Iterator[Callable[[], DiskReplicator]]:
    pool = ThreadPoolExecutor(2)
    started: list[DiskReplicator] = []

    def run() -> DiskReplicator:
        stream = Stream(ServerAddress("127.0.0.1", sim.port), sim.client_context, timeout=5.0)
        device = BlockDevice("/dev/sdb", image, 0, 0, "sdb")
        r = DiskReplicator(device, tmp_path / "state", stream, pool, boot_id="boot")
        r.start()
        started.append(r)
        return r

    yield run
    for r in started:
        r.stop()
        r.join(10)
    pool.shutdown()


def in_sync(r: DiskReplicator, sim: ProcessServerSimulator, image: Path) -> bool:
    return r.state == "CONTINUOUS" and not r.stream.window and sim.replica_hashes() == disk_hashes(image)


def write(r: DiskReplicator, image: Path, chunks: list[int]) -> None:
    """Change ``chunks`` on the disk and mark them, as the tracer does for a write it saw."""
    with image.open("r+b") as f:
        for i in chunks:
            f.seek(i * CHUNK)
            f.write(os.urandom(CHUNK))
    for i in chunks:
        r.dirty.mark(i, i, r.clock())


def test_the_initial_sync_makes_the_replica_the_disk(
    start: Callable[[], DiskReplicator], sim: ProcessServerSimulator, image: Path
) -> None:
    r = start()
    wait("the replica in sync", lambda: in_sync(r, sim, image))
    assert r.persisted.synced and r.error is None and sim.connections == 1


def test_a_connection_cut_in_the_initial_sync_is_resumed_and_the_replica_converges(
    start: Callable[[], DiskReplicator], sim: ProcessServerSimulator, image: Path
) -> None:
    sim.faults = Faults(cut_at=2, durable_at_cut=False)  # the second frame of chunks never becomes durable
    r = start()
    wait("the replica in sync after the cut", lambda: in_sync(r, sim, image), timeout=30)
    assert sim.connections == 2 and r.error is None
    assert min(sim.seqs(connection=2)) > max(sim.seqs(connection=1))  # what was lost went again, numbered on


def test_continuous_changes_whose_acks_were_lost_are_not_sent_again(
    start: Callable[[], DiskReplicator], sim: ProcessServerSimulator, image: Path
) -> None:
    r = start()
    wait("the replica in sync", lambda: in_sync(r, sim, image))
    sim.faults = Faults(silent=True)  # durable, never acknowledged
    write(r, image, [3, 30])
    wait("the changes durable", lambda: sim.replica_hashes() == disk_hashes(image))
    sim.faults = Faults()
    sim.cut()
    wait("the reconnection", lambda: sim.connections == 2, timeout=30)
    write(r, image, [5])
    wait("the next change", lambda: in_sync(r, sim, image))
    assert sim.chunks(connection=2) == [5]  # the WELCOME settled 3 and 30: they did not go twice


def test_continuous_changes_lost_with_the_connection_are_sent_again(
    start: Callable[[], DiskReplicator], sim: ProcessServerSimulator, image: Path
) -> None:
    r = start()
    wait("the replica in sync", lambda: in_sync(r, sim, image))
    sim.faults = Faults(cut_at=sim.durable + 1)
    write(r, image, [7, 8, 40])
    wait("the replica in sync after the cut", lambda: in_sync(r, sim, image) and sim.connections == 2, timeout=30)
    assert r.persisted.synced


def test_a_delta_refused_in_a_batch_whose_check_was_lost_is_sent_whole_on_the_next_connection(
    start: Callable[[], DiskReplicator], sim: ProcessServerSimulator, image: Path
) -> None:
    """A write of one sub-block of chunk 3 travels as a delta; the server refuses it (its base gone), commits the
    batch, and the connection breaks before the agent reads the CHECKED that says so. The WELCOME settles the batch:
    the chunk is read again and sent whole, and the replica converges. (It kept the chunk's old content while the
    agent believed it current, until a point came back with REPL-POINT-MISMATCH.)"""
    r = start()
    wait("the replica in sync", lambda: in_sync(r, sim, image))
    batch = sim.durable + 1
    sim.faults = Faults(refused={batch: [0]}, cut_at=batch, durable_at_cut=True)
    with image.open("r+b") as f:
        f.seek(3 * CHUNK + 4096)
        f.write(os.urandom(4096))
    r.dirty.mark_bytes([(3 * CHUNK + 4096, 4096)], r.clock())
    wait("the cut and the reconnection", lambda: sim.connections == 2, timeout=30)
    first = [x for x in sim.received if x.connection == 1 and x.header.seq == batch]
    assert first and parse_batch(first[0].payload, 1, CHUNK, CHUNKS)[0].delta  # a delta went, and was refused
    wait("the replica in sync", lambda: in_sync(r, sim, image), timeout=30)
    again = [x for x in sim.received if x.connection == 2 and x.header.kind is Kind.BATCH]
    records = [rec for x in again for rec in parse_batch(x.payload, x.header.size, CHUNK, CHUNKS)]
    assert [(rec.index, rec.delta) for rec in records] == [(3, False)]  # whole, this time
    assert r.refusals == 1


def point(r: DiskReplicator) -> Capture:
    """Cut a point of this one disk as agent/replication/points.py does: capture, label, close."""
    capture = Capture(str(uuid.uuid4()), time.time(), ("/dev/sdb",))
    r.commands.put(capture)  # the disk sends what it read and has it verified, then waits for the freeze
    assert capture.ready.wait(15) and capture.error is None
    r.hashes.hold()  # "frozen": the hash file is not written until the thaw
    capture.go.set()
    try:
        assert capture.captured.wait(10) and capture.error is None
    finally:
        r.hashes.release()
    capture.label = "crash-consistent"
    capture.closing.set()
    assert capture.acked.wait(15)
    return capture


def test_a_point_closes_with_the_root_of_the_disk_as_the_replica_holds_it(
    start: Callable[[], DiskReplicator], sim: ProcessServerSimulator, image: Path
) -> None:
    r = start()
    wait("the replica in sync", lambda: in_sync(r, sim, image))
    write(r, image, [1, 2])  # the residual the capture takes
    capture = point(r)
    root = RootHasher(r.geometry)
    root.update(disk_hashes(image))
    assert capture.point_ok and capture.residual == 2
    assert [p.point_id for p in sim.points] == [capture.point_id]
    assert sim.points[0].root == capture.root == root.hexdigest()
    assert sim.replica_hashes() == disk_hashes(image)


def test_a_point_whose_frame_is_lost_with_the_connection_is_not_closed(
    start: Callable[[], DiskReplicator], sim: ProcessServerSimulator, image: Path
) -> None:
    r = start()
    wait("the replica in sync", lambda: in_sync(r, sim, image))
    sim.faults = Faults(cut_at=sim.durable + 1)  # the POINT frame: nothing changed, it is the next one
    capture = point(r)
    assert not capture.point_ok and sim.points == []
    assert [rec.header.kind for rec in sim.received][-1] is Kind.POINT
    wait("the reconnection", lambda: sim.connections == 2, timeout=30)
    again = point(r)  # the next point closes
    assert again.point_ok and [p.point_id for p in sim.points] == [again.point_id]


def test_a_process_server_that_moved_gets_what_the_old_one_did_not_acknowledge(
    start: Callable[[], DiskReplicator], sim: ProcessServerSimulator, image: Path, tmp_path: Path
) -> None:
    """The engine's retarget (a heartbeat named another process server): the disk's thread breaks off its stream,
    connects to the new address, and since the new server holds less than the old one acknowledged, resyncs the
    disk against the new one's replica until it is the disk."""
    r = start()
    wait("the replica in sync", lambda: in_sync(r, sim, image))
    sim.faults = Faults(silent=True)  # the old one stops answering
    write(r, image, [4, 44])
    with simulated(tmp_path / "new") as moved:
        r.context = lambda: moved.client_context  # the new server's CA, as a renewed context would carry
        r.retarget(ServerAddress("127.0.0.1", moved.port))
        wait("the new replica in sync", lambda: in_sync(r, moved, image), timeout=30)
        assert set(moved.chunks(connection=1)) | set(moved.chunks(connection=2)) >= {4, 44}
        assert r.stream.address.port == moved.port


def test_a_chunk_spoiled_while_its_job_ran_stays_spoiled(
    tmp_path: Path, sim: ProcessServerSimulator, image: Path
) -> None:
    """A job was told the replica holds chunk 3 as the disk has it and so found nothing to send; before its result
    was sent, a delta of chunk 3 was refused (the entry spoiled). The job's hashes must not cover that up: had they,
    the chunk's next read would look already held, and the next point would be refused for a root hash the
    replica does not have (seen on a VM under pgbench: REPL-POINT-MISMATCH, then a checksum resync of the disk)."""
    stream = Stream(ServerAddress("127.0.0.1", sim.port), sim.client_context, timeout=5.0)
    with ThreadPoolExecutor(1) as pool:
        r = DiskReplicator(BlockDevice("/dev/sdb", image, 0, 0, "sdb"), tmp_path / "state", stream, pool, boot_id="b")
        data = image.read_bytes()
        read = b"".join(chunk_hash(data[i * CHUNK : (i + 1) * CHUNK]) for i in range(8))
        r.hashes.write(0, read)  # what the job was told the replica holds: all of it
        r.hashes.write(3, UNKNOWN)  # a refused delta of chunk 3, while the job ran
        records: list[Record] = []
        for first, hashes in r._records(JobResult(0, read, [], 0.0, 8 * CHUNK), records):
            r.hashes.write(first, hashes)
        assert records == []
        assert r.hashes.read(3, 1) == UNKNOWN  # read again and sent whole, as the refusal asked
        assert r.hashes.read(0, 3) == read[: 3 * len(UNKNOWN)] and r.hashes.read(4, 4) == read[4 * len(UNKNOWN) :]
