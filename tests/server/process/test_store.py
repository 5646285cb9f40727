"""server/process/store.py on real files: group commits, dedup, zero markers, crash recovery, points and verify."""

from __future__ import annotations

import os
import random
import re
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest
import zstandard

from agent.replication.chunks import Geometry, RootHasher, chunk_hash, zero_hash
from agent.shared.replication_wire import Codec, PointClose
from server.errors import PointCorrupt, PointIdTaken, PointMismatch, PointNotFound, ReplicationProtocol, StoreFull
from server.process import store as store_module
from server.process.gc import collect
from server.process.store import ChunkPut, ChunkStore, PointPut
from tests.server.process.stores import locate

HOST = "11111111-1111-4111-8111-111111111111"
OTHER = "22222222-2222-4222-8222-222222222222"
CHUNK = 64 * 1024
SMALL = 4096  # the property test's chunks: many frames, little data


def put(key: int, index: int, data: bytes, seq: int, *, compress: bool = False) -> ChunkPut:
    if not any(data):
        return ChunkPut(key, index, zero_hash(len(data)), Codec.ZERO, len(data), b"", seq)
    if compress:
        return ChunkPut(key, index, chunk_hash(data), Codec.ZSTD, len(data), zstandard.compress(data, 1), seq)
    return ChunkPut(key, index, chunk_hash(data), Codec.RAW, len(data), data, seq)


def root_of(disk: list[bytes], size: int) -> str:
    r = RootHasher(Geometry(size, CHUNK))
    r.update(b"".join(chunk_hash(c) for c in disk))
    return r.hexdigest()


def close(point_id: str, root: str, created: float = 1.0) -> PointClose:
    return PointClose(point_id, created, root, "crash-consistent", ("/dev/sdb",), 12.0)


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    return ChunkStore(tmp_path / "process", writer=True, reserve=0)


def test_chunks_are_kept_once_and_read_back_verified(store: ChunkStore) -> None:
    row, known = store.open_disk(HOST, "/dev/sdb", 3 * CHUNK, CHUNK)
    assert not known
    a, b = os.urandom(CHUNK), b"text " * (CHUNK // 5) + b"x" * (CHUNK % 5)
    outcomes = store.commit([put(row.disk_key, 0, a, 1), put(row.disk_key, 1, b, 2, compress=True)])
    assert outcomes == [None, None]
    size_after_first = store.usage().store_bytes
    store.commit([put(row.disk_key, 2, a, 3)])  # the same data again: deduplicated
    assert store.usage().store_bytes == size_after_first and store.usage().chunks == 2
    assert store.read(chunk_hash(a), CHUNK) == a and store.read(chunk_hash(b), CHUNK) == b
    head = store.head(store.open_disk(HOST, "/dev/sdb", 3 * CHUNK, CHUNK)[0])
    assert bytes(head) == chunk_hash(a) + chunk_hash(b) + chunk_hash(a)
    assert store.disk(HOST, "/dev/sdb").acked_seq == 3  # type: ignore[union-attr]


def test_zero_chunks_are_markers_and_a_short_last_chunk_has_its_own_zero_hash(store: ChunkStore) -> None:
    size = 2 * CHUNK + 512
    row, _ = store.open_disk(HOST, "/dev/sdb", size, CHUNK)
    data = os.urandom(CHUNK)
    store.commit([put(row.disk_key, 1, data, 1)])
    store.commit([put(row.disk_key, 1, bytes(CHUNK), 2)])  # zeroed again: back to a marker
    head = store.head(row)
    assert bytes(head) == zero_hash(CHUNK) * 2 + zero_hash(512)
    assert store.read(zero_hash(512), 512) == bytes(512)


def test_a_point_is_closed_only_when_the_source_root_matches(store: ChunkStore) -> None:
    size = 2 * CHUNK
    row, _ = store.open_disk(HOST, "/dev/sdb", size, CHUNK)
    a, b = os.urandom(CHUNK), os.urandom(CHUNK)
    good, bad = str(uuid.uuid4()), str(uuid.uuid4())
    outcomes = store.commit(
        [
            put(row.disk_key, 0, a, 1),
            put(row.disk_key, 1, b, 2),
            PointPut(row.disk_key, close(good, root_of([a, b], size)), 3),
            PointPut(row.disk_key, close(bad, root_of([b, a], size)), 4),
        ]
    )
    assert outcomes[:3] == [None, None, None] and isinstance(outcomes[3], PointMismatch)
    point = store.resolve_point(HOST, "latest")
    assert point.point_id == good and point.complete and point.consistency == "crash-consistent"
    assert store.manifest(point.disks[0]) == chunk_hash(a) + chunk_hash(b)
    with pytest.raises(PointNotFound):
        store.resolve_point(HOST, bad)


def test_retention_keeps_the_newest_points(store: ChunkStore) -> None:
    row, _ = store.open_disk(HOST, "/dev/sdb", CHUNK, CHUNK)
    ids = []
    for seq in range(1, 6):
        data = os.urandom(CHUNK)
        ids.append(str(uuid.uuid4()))
        store.commit(
            [
                put(row.disk_key, 0, data, 2 * seq),
                PointPut(row.disk_key, close(ids[-1], root_of([data], CHUNK), seq), 2 * seq + 1),
            ]
        )
    assert store.prune(HOST, 2) == 3
    assert [p.point_id for p in store.points(HOST)] == ids[-2:]
    collect(store)  # the dropped points' manifests go with the collection, off the ingest path
    assert len(list(store.manifests_dir.glob("*.zst"))) == 2


def test_an_unindexed_pack_tail_is_cut_when_the_writer_reopens(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "process", writer=True, reserve=0)
    row, _ = store.open_disk(HOST, "/dev/sdb", CHUNK, CHUNK)
    data = os.urandom(CHUNK)
    store.commit([put(row.disk_key, 0, data, 1)])
    pack = next(store.packs_dir.glob("*.pack"))
    good = pack.stat().st_size
    store.close()
    with pack.open("ab") as f:  # what a batch killed between its flush and its index commit leaves
        f.write(os.urandom(5000))
    store = ChunkStore(tmp_path / "process", writer=True, reserve=0)
    assert pack.stat().st_size == good
    assert store.read(chunk_hash(data), CHUNK) == data


def test_a_writer_reopens_with_a_look_up_per_pack_never_a_walk_of_every_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cutting the packs' unindexed tails read every chunk's row (a scan of the index, then a look-up of each row):
    a server over ten million chunks took minutes to start. Each statement a reopening writer runs on the chunks
    must search an index, never scan one, and every pack's tail is still cut."""
    monkeypatch.setattr(store_module, "PACK_MAX", 3 * CHUNK)  # several packs
    store = ChunkStore(tmp_path / "process", writer=True, reserve=0)
    row, _ = store.open_disk(HOST, "/dev/sdb", 8 * CHUNK, CHUNK)
    chunks = [os.urandom(CHUNK) for _ in range(8)]
    for i, data in enumerate(chunks):
        store.commit([put(row.disk_key, i, data, i + 1)])
    packs = sorted(store.packs_dir.glob("*.pack"))
    assert len(packs) >= 3
    sizes = [p.stat().st_size for p in packs]
    store.close()
    for pack in (packs[0], packs[-1]):
        with pack.open("ab") as f:
            f.write(os.urandom(5000))
    statements: list[str] = []
    connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        db = connect(*args, **kwargs)
        db.set_trace_callback(statements.append)
        return db

    monkeypatch.setattr(sqlite3, "connect", traced)
    store = ChunkStore(tmp_path / "process", writer=True, reserve=0)
    monkeypatch.setattr(sqlite3, "connect", connect)
    assert [p.stat().st_size for p in packs] == sizes
    on_chunks = [s for s in statements if re.search(r"\bFROM chunks\b", s)]
    assert on_chunks
    plans = [d for s in on_chunks for (*_, d) in store.db.execute(f"EXPLAIN QUERY PLAN {s}")]
    assert not [d for d in plans if d.startswith("SCAN")], plans
    for data in chunks:
        assert store.read(chunk_hash(data), CHUNK) == data


def test_a_flipped_bit_in_a_pack_is_found(store: ChunkStore) -> None:
    row, _ = store.open_disk(HOST, "/dev/sdb", CHUNK, CHUNK)
    data = os.urandom(CHUNK)
    store.commit([put(row.disk_key, 0, data, 1)])
    where = locate(store, chunk_hash(data))
    assert where is not None
    path, offset, _ = where
    with path.open("r+b") as f:
        f.seek(offset + 100)
        byte = f.read(1)[0]
        f.seek(offset + 100)
        f.write(bytes([byte ^ 0x10]))
    with pytest.raises(PointCorrupt, match="does not match its hash"):
        store.read(chunk_hash(data), CHUNK)


def test_the_reserve_refuses_a_batch_whole(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    store = ChunkStore(tmp_path / "process", writer=True, reserve=st.f_bavail * st.f_frsize)
    row, _ = store.open_disk(HOST, "/dev/sdb", CHUNK, CHUNK)
    with pytest.raises(StoreFull):
        store.commit([put(row.disk_key, 0, os.urandom(CHUNK), 1)])
    assert store.usage().chunks == 0 and store.disk(HOST, "/dev/sdb").acked_seq == 0  # type: ignore[union-attr]


def test_a_resized_disk_keeps_what_both_sizes_share(store: ChunkStore) -> None:
    row, _ = store.open_disk(HOST, "/dev/sdb", 4 * CHUNK, CHUNK)
    chunks = [os.urandom(CHUNK) for _ in range(4)]
    store.commit([put(row.disk_key, i, c, i + 1) for i, c in enumerate(chunks)])
    row, known = store.open_disk(HOST, "/dev/sdb", 3 * CHUNK, CHUNK)
    assert known
    assert bytes(store.head(row)) == chunk_hash(chunks[0]) + chunk_hash(chunks[1]) + zero_hash(CHUNK)
    row, known = store.open_disk(HOST, "/dev/sdb", 3 * CHUNK, 2 * CHUNK)
    assert not known and bytes(store.head(row)) == zero_hash(2 * CHUNK) + zero_hash(CHUNK)


def test_a_store_that_is_not_there_or_cannot_be_written_fails_with_its_id(tmp_path: Path) -> None:
    """The read-only commands on a data directory without a store get PS-STORE-DAMAGED; a pack that cannot be
    written (an I/O error) gets PS-STORE-WRITE-FAILED, and nothing of the batch is indexed or acknowledged."""
    from server.errors import StoreDamaged, StoreWriteFailed

    with pytest.raises(StoreDamaged):
        ChunkStore(tmp_path / "nothing-here")
    store = ChunkStore(tmp_path / "process", writer=True, reserve=0)
    try:
        row, _ = store.open_disk(HOST, "/dev/sdb", 2 * CHUNK, CHUNK)
        os.close(store.pack_fd)
        store.pack_fd = os.open(os.devnull, os.O_RDONLY)  # writes to it fail with EBADF, as an I/O error would
        with pytest.raises(StoreWriteFailed):
            store.commit([put(row.disk_key, 0, os.urandom(CHUNK), 1)])
        assert store.usage().chunks == 0 and store.disk(HOST, "/dev/sdb").acked_seq == 0  # type: ignore[union-attr]
    finally:
        store.close()


# Frames apply in sequence order --------------------------------------------------------------------------------


def _frames_for(rng: random.Random, disk_key: int, count: int, n: int) -> list[ChunkPut | PointPut]:
    """``n`` frames of one disk as a stream sends them, through the receiver's own verification: data (raw or zstd),
    zero markers, discards (a chunk that reads back as zeros, sent as data), and points closed on what the source
    has at that moment (so each must match the replica)."""
    from agent.shared.replication_wire import Header, Kind
    from server.process.receiver import _verify

    size = count * SMALL
    disk = [bytes(SMALL)] * count  # the source disk as the frames so far leave it
    out: list[ChunkPut | PointPut] = []
    for seq in range(1, n + 1):
        kind = rng.choice(("data", "data", "zero", "discard", "point"))
        if kind == "point":
            close = PointClose(str(uuid.uuid4()), float(seq), _root(disk, size), "crash-consistent", ("/dev/sdb",))
            out.append(PointPut(disk_key, close, seq))
            continue
        index = rng.randrange(count)  # a few chunks: frames for one chunk overlap in every batch
        if kind == "data":
            data = rng.randbytes(SMALL // 2) + bytes(SMALL // 2)
            codec = rng.choice((Codec.RAW, Codec.ZSTD))
            payload = data if codec is Codec.RAW else zstandard.compress(data, 1)
        else:
            data, codec = bytes(SMALL), Codec.ZERO if kind == "zero" else Codec.RAW
            payload = b"" if codec is Codec.ZERO else data
        disk[index] = data
        header = Header(Kind.CHUNK, codec, len(payload), seq, index * SMALL, SMALL, chunk_hash(data))
        out.append(_verify(disk_key, index, header, payload))
    return out


def _root(disk: list[bytes], size: int) -> str:
    r = RootHasher(Geometry(size, SMALL))
    r.update(b"".join(chunk_hash(c) for c in disk))
    return r.hexdigest()


def _replica(store: ChunkStore) -> tuple[list[bytes], list[list[tuple[str, bytes]]]]:
    heads = [bytes(store.head(row)) for row in store.disks()]
    points = [[(p.point_id, store.manifest(p.disks[0])) for p in store.points(h)] for h in (HOST, OTHER)]
    return heads, points


def test_any_interleaving_of_frames_in_group_commits_gives_the_replica_of_one_commit_per_frame(
    tmp_path: Path,
) -> None:
    """Property test (seeded): two machines' streams of data, zero and discard frames for the same few chunks, with
    points between them, are committed in batches cut at random places and interleaved at random; the replica and
    the points are those of committing each frame alone, and every point matches (a point of the source's disk is
    refused with REPL-POINT-MISMATCH when a batch applied its frames out of order)."""
    rng = random.Random(2024)  # noqa: S311 - reproducible test data, not secrets
    for trial in range(10):
        one = ChunkStore(tmp_path / f"one-{trial}", writer=True, reserve=0)
        grouped = ChunkStore(tmp_path / f"grouped-{trial}", writer=True, reserve=0)
        keys = [
            [store.open_disk(h, "/dev/sdb", 4 * SMALL, SMALL)[0].disk_key for h in (HOST, OTHER)]
            for store in (one, grouped)
        ]
        assert keys[0] == keys[1]
        streams = [_frames_for(rng, key, 4, 30) for key in keys[0]]
        for frames in streams:
            for item in frames:
                assert one.commit([item]) == [None]
        pending = [list(frames) for frames in streams]  # each stream's frames stay in order; the streams interleave
        while any(pending):
            batch: list[ChunkPut | PointPut] = []
            for _ in range(rng.randint(1, 30)):
                live = [p for p in pending if p]
                if not live:
                    break
                batch.append(rng.choice(live).pop(0))
            assert grouped.commit(batch) == [None] * len(batch), f"trial {trial}"
        assert _replica(grouped) == _replica(one), f"trial {trial}"
        assert [row.acked_seq for row in grouped.disks()] == [row.acked_seq for row in one.disks()]
        one.close()
        grouped.close()


# Points belong to a machine -------------------------------------------------------------------------------------


def test_a_point_id_of_another_machine_is_refused_and_changes_nothing_of_its_point(store: ChunkStore) -> None:
    """Machine B closes a point with machine A's point ID (in the same batch as A's own frames, and again later):
    REPL-POINT-ID-TAKEN for B's point and the frames of B's disk after it, and A's point, its manifest and the bytes
    a failover of it reads are A's. B's frames before the point are kept; A's stream is not touched."""
    a_row, _ = store.open_disk(HOST, "/dev/sdb", 2 * CHUNK, CHUNK)
    b_row, _ = store.open_disk(OTHER, "/dev/sdb", 2 * CHUNK, CHUNK)
    a_disk, b_disk = [os.urandom(CHUNK), os.urandom(CHUNK)], [os.urandom(CHUNK), os.urandom(CHUNK)]
    taken = str(uuid.uuid4())
    outcomes = store.commit(
        [
            put(a_row.disk_key, 0, a_disk[0], 1),
            put(a_row.disk_key, 1, a_disk[1], 2),
            PointPut(a_row.disk_key, close(taken, root_of(a_disk, 2 * CHUNK)), 3),
            put(b_row.disk_key, 0, b_disk[0], 1),
            put(b_row.disk_key, 1, b_disk[1], 2),
            PointPut(b_row.disk_key, close(taken, root_of(b_disk, 2 * CHUNK)), 3),
            put(b_row.disk_key, 0, a_disk[0], 4),  # after B's refused point: not kept
            put(a_row.disk_key, 0, a_disk[1], 4),  # A's stream goes on
        ]
    )
    assert outcomes[:5] == [None] * 5 and outcomes[7] is None
    assert isinstance(outcomes[5], PointIdTaken) and outcomes[6] is outcomes[5]
    assert store.disk(OTHER, "/dev/sdb").acked_seq == 2  # type: ignore[union-attr]
    assert bytes(store.head(b_row)) == chunk_hash(b_disk[0]) + chunk_hash(b_disk[1])
    again = store.commit([PointPut(b_row.disk_key, close(taken, root_of(b_disk, 2 * CHUNK)), 5)])
    assert isinstance(again[0], PointIdTaken)
    point = store.resolve_point(HOST, taken)
    assert [d.disk for d in point.disks] == ["/dev/sdb"] and point.disks[0].root == root_of(a_disk, 2 * CHUNK)
    manifest = store.manifest(point.disks[0])
    assert [store.read(manifest[i * 32 : (i + 1) * 32], CHUNK) for i in range(2)] == a_disk
    assert store.points(OTHER, complete_only=False) == []
    with pytest.raises(PointNotFound):
        store.resolve_point(OTHER, taken)
    assert store.find_point(taken) == point
    # A closed point never changes, not even by its own machine.
    changed = store.commit([PointPut(a_row.disk_key, close(taken, root_of([a_disk[1], a_disk[1]], 2 * CHUNK)), 5)])
    assert isinstance(changed[0], PointIdTaken) and store.resolve_point(HOST, taken) == point


def test_the_index_of_version_1_is_migrated_points_keyed_by_machine_and_times_brought_inside_bounds(
    tmp_path: Path,
) -> None:
    """An index written by version 1 (points keyed by their ID alone, a `created` of 1e300 that a listing could not
    turn into a date) opens as the current version: its points belong to their machine, with a time a listing can
    show."""
    import sqlite3

    from server.process.store import MIGRATIONS, SCHEMA_VERSION

    root = tmp_path / "process"
    root.mkdir()
    db = sqlite3.connect(root / "index.db")
    db.executescript(MIGRATIONS[0])
    db.execute("PRAGMA user_version = 1")
    pid = str(uuid.uuid4())
    db.execute("INSERT INTO points VALUES (?, ?, 1e300, 'crash-consistent', '/dev/sdb', -5.0)", (pid, HOST))
    db.execute(
        "INSERT INTO point_disks VALUES (?, '/dev/sdb', 65536, 65536, ?, ?, 1.0, 'crash-consistent')",
        (pid, "a" * 64, "b" * 64),
    )
    db.commit()
    db.close()
    store = ChunkStore(root, writer=True, reserve=0)
    try:
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 2
        (point,) = store.points(HOST)
        assert (point.point_id, point.created, point.freeze_ms, point.complete) == (pid, float(1 << 32), None, True)
        assert point.disks[0].root == "a" * 64 and store.points(OTHER) == []
        from agent.shared import timefmt

        assert timefmt.shown(point.created).startswith("2106-")
    finally:
        store.close()


# One bad item harms one stream ----------------------------------------------------------------------------------


def test_an_item_out_of_bounds_fails_its_disk_alone_and_leaves_no_pack_bytes(store: ChunkStore) -> None:
    """A sequence of 2^63 (SQLite's integers stop at 2^63 - 1: it failed the whole batch with an OverflowError and
    left its chunk in the pack) fails that disk's items from there on; the other disk's are kept, and the pack holds
    exactly what the index names."""
    good, bad = (
        store.open_disk(HOST, "/dev/sdb", 2 * CHUNK, CHUNK)[0],
        store.open_disk(OTHER, "/dev/sdb", 2 * CHUNK, CHUNK)[0],
    )
    a, b, c = os.urandom(CHUNK), os.urandom(CHUNK), os.urandom(CHUNK)
    outcomes = store.commit(
        [
            put(good.disk_key, 0, a, 1),
            put(bad.disk_key, 0, b, 1 << 63),
            put(good.disk_key, 1, a, 2),
            put(bad.disk_key, 1, c, (1 << 63) + 1),
        ]
    )
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], ReplicationProtocol) and outcomes[3] is outcomes[1]
    assert bytes(store.head(good)) == chunk_hash(a) * 2 and store.disk(HOST, "/dev/sdb").acked_seq == 2  # type: ignore[union-attr]
    assert bytes(store.head(bad)) == zero_hash(CHUNK) * 2 and store.disk(OTHER, "/dev/sdb").acked_seq == 0  # type: ignore[union-attr]
    assert locate(store, chunk_hash(b)) is None and locate(store, chunk_hash(c)) is None
    pack = next(store.packs_dir.glob("*.pack"))
    assert (
        pack.stat().st_size
        == store.pack_size
        == store.db.execute("SELECT MAX(offset + stored) FROM chunks").fetchone()[0]
    )


def test_a_batch_that_fails_midway_leaves_no_pack_bytes_behind(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever breaks a batch after its chunks were written (here closing its point), the pack is cut back: the
    next batch's records follow the last indexed one, and a restart finds nothing to cut."""
    row, _ = store.open_disk(HOST, "/dev/sdb", CHUNK, CHUNK)
    first = os.urandom(CHUNK)
    store.commit([put(row.disk_key, 0, first, 1)])
    before = store.pack_size

    def broken(*_: object) -> None:
        raise RuntimeError("a bug in closing a point")

    monkeypatch.setattr(store, "_close_point", broken)
    data = os.urandom(CHUNK)
    with pytest.raises(RuntimeError):
        store.commit([put(row.disk_key, 0, data, 2), PointPut(row.disk_key, close(str(uuid.uuid4()), "0" * 64), 3)])
    assert store.pack_size == before == next(store.packs_dir.glob("*.pack")).stat().st_size
    assert locate(store, chunk_hash(data)) is None and store.disk(HOST, "/dev/sdb").acked_seq == 1  # type: ignore[union-attr]
