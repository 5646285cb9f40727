"""Stores for the process server's tests: a source that writes, rewrites and zeroes chunks through the store's own
group commit and cuts points, and the checks of a store against what its heads and points reference."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

from agent.replication.chunks import Geometry, RootHasher, chunk_hash, zero_hash
from agent.shared.replication_wire import HASH_SIZE, Codec, PointClose
from server.process import references
from server.process.failover import verify_point
from server.process.store import ChunkPut, ChunkStore, PointDisk, PointPut

SMALL = 4096
CHUNK = 64 * 1024


def locate(store: ChunkStore, digest: bytes) -> tuple[Path, int, int] | None:
    """Where a chunk's stored bytes are (pack file, offset, length), from the index: a test damages them there."""
    row = store.reader_db.execute("SELECT pack, offset, stored FROM chunks WHERE hash = ?", (digest,)).fetchone()
    return (store.pack_path(row[0]), row[1], row[2]) if row else None


# What the index counts, against what the heads and points reference --------------------------------------------


def referenced(store: ChunkStore) -> set[bytes]:
    """Every chunk a head or a kept point references, found the slow way (every manifest read): the oracle."""
    found = {bytes(h) for (h,) in store.db.execute("SELECT hash FROM heads")}
    for name, size, chunk_size in store.db.execute("SELECT DISTINCT manifest, size, chunk_size FROM point_disks"):
        g = Geometry(size, chunk_size)
        data = store.manifest(PointDisk("", size, chunk_size, "", name))
        found.update(data[i * HASH_SIZE : (i + 1) * HASH_SIZE] for i in range(g.count))
    return found - {zero_hash(n) for n in (SMALL, CHUNK, SMALL // 2)}


def counted(store: ChunkStore) -> set[bytes]:
    return {bytes(h) for (h,) in store.db.execute("SELECT hash FROM chunks WHERE refs > 0")}


def check_store(store: ChunkStore, *, swept: bool) -> None:
    """The counts are exact, nothing referenced is missing, every kept point verifies and every head chunk reads; once
    every sweep is done, a chunk is counted exactly when something references it."""
    assert references.check(store.db) == (0, 0)
    needed, have = referenced(store), counted(store)
    assert needed <= have, "a referenced chunk is not counted"
    if swept:
        assert have == needed, f"{len(have - needed)} chunks counted that nothing references"
    for host in {r.host_id for r in store.disks()}:
        for point in store.points(host):
            verify_point(store, point)
    for row in store.disks():
        head = store.head(row)
        for i in range(row.geometry.count):
            store.read(bytes(head[i * HASH_SIZE : (i + 1) * HASH_SIZE]), row.geometry.length(i))


class Source:
    """The source disks as the frames sent so far leave them."""

    def __init__(self, store: ChunkStore, rng: random.Random) -> None:
        self.store, self.rng = store, rng
        self.disks: dict[tuple[str, str], list[bytes]] = {}
        self.keys: dict[tuple[str, str], int] = {}
        self.pool = [rng.randbytes(SMALL // 2) + bytes(SMALL // 2) for _ in range(40)]  # shared: dedup, revival

    def open(self, host: str, disk: str, count: int) -> None:
        """A stream's HELLO: a new disk, or one resized to ``count`` chunks. The store keeps what both sizes share but
        the last chunk; the agent's resync sends again what differs."""
        row, _ = self.store.open_disk(host, disk, count * SMALL, SMALL)
        self.keys[(host, disk)] = row.disk_key
        old = self.disks.get((host, disk), [])
        shared = min(len(old), count)
        self.disks[(host, disk)] = old[:shared] + [bytes(SMALL)] * (count - shared)
        for i in range(max(shared - 1, 0), shared):
            if any(old[i]):
                self.write(host, disk, i, old[i])

    def next_seq(self, host: str, disk: str) -> int:
        row = self.store.disk(host, disk)
        assert row is not None
        return row.acked_seq + 1

    def write(self, host: str, disk: str, index: int, data: bytes) -> None:
        key, seq = self.keys[(host, disk)], self.next_seq(host, disk)
        if any(data):
            item = ChunkPut(key, index, chunk_hash(data), Codec.RAW, SMALL, data, seq)
        else:
            item = ChunkPut(key, index, zero_hash(SMALL), Codec.ZERO, SMALL, b"", seq)
        assert self.store.commit([item]) == [None]
        self.disks[(host, disk)][index] = data

    def churn(self, n: int) -> None:
        for _ in range(n):
            host, disk = self.rng.choice(sorted(self.disks))
            pick = self.rng.random()
            if pick < 0.4:
                data = self.rng.choice(self.pool)
            elif pick < 0.85:
                data = self.rng.randbytes(SMALL // 2) + bytes(SMALL // 2)
            else:
                data = bytes(SMALL)
            self.write(host, disk, self.rng.randrange(len(self.disks[(host, disk)])), data)

    def point(self, host: str, created: float) -> str:
        point_id = str(uuid.uuid4())
        names = sorted(d for h, d in self.disks if h == host)
        for name in names:
            disk = self.disks[(host, name)]
            root = RootHasher(Geometry(len(disk) * SMALL, SMALL))
            root.update(b"".join(chunk_hash(c) for c in disk))
            key = self.keys[(host, name)]
            close = PointClose(point_id, created, root.hexdigest(), "crash-consistent", tuple(names))
            assert self.store.commit([PointPut(key, close, self.next_seq(host, name))]) == [None]
        return point_id
