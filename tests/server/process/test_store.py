"""server/process/store.py on real files: group commits, dedup, zero markers, crash recovery, points and verify."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import zstandard

from agent.replication.chunks import Geometry, RootHasher, chunk_hash, zero_hash
from agent.shared.replication_wire import Codec, PointClose
from server.errors import PointCorrupt, PointMismatch, PointNotFound, StoreFull
from server.process.store import ChunkPut, ChunkStore, PointPut

HOST = "11111111-1111-4111-8111-111111111111"
CHUNK = 64 * 1024


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


def test_a_flipped_bit_in_a_pack_is_found(store: ChunkStore) -> None:
    row, _ = store.open_disk(HOST, "/dev/sdb", CHUNK, CHUNK)
    data = os.urandom(CHUNK)
    store.commit([put(row.disk_key, 0, data, 1)])
    where = store.locate(chunk_hash(data))
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
