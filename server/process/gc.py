"""Garbage collection of the chunk store: after retention drops points, the chunks that no replica head and no
remaining point references are forgotten, and packs that are mostly such dead bytes are rewritten.

Crash-safe in the store's own terms: index rows go first (one transaction); a pack is compacted by appending its
live records to the current pack, flushing it, then moving the index rows in one transaction, and only then
removing the old file. A kill between those steps leaves unindexed bytes, which the writer cuts when it reopens,
or a pack no row names, which it removes. It runs under the store's write lock: commits wait meanwhile."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from agent.shared.replication_wire import HASH_SIZE
from server.process.store import RECORD, ChunkStore, PointDisk, _fsync_dir, _write_all

log = logging.getLogger("mobility.process")

COMPACT_BELOW = 0.5  # a pack whose live bytes are less than this share of it is rewritten


@dataclass(frozen=True)
class Collected:
    chunks: int  # index entries dropped
    bytes: int  # their stored bytes
    packs_rewritten: int
    reclaimed: int  # bytes of pack files removed, less what was copied


def collect(store: ChunkStore) -> Collected:
    with store.write_lock:
        db = store.db
        db.execute("CREATE TEMP TABLE IF NOT EXISTS live (hash BLOB PRIMARY KEY) WITHOUT ROWID")
        db.execute("DELETE FROM live")
        db.execute("INSERT OR IGNORE INTO live SELECT hash FROM heads")
        manifests = db.execute("SELECT DISTINCT manifest, size, chunk_size FROM point_disks").fetchall()
        for name, size, chunk_size in manifests:
            data = store.manifest(PointDisk("", size, chunk_size, "", name))
            rows = [(data[i : i + HASH_SIZE],) for i in range(0, len(data), HASH_SIZE)]
            db.executemany("INSERT OR IGNORE INTO live VALUES (?)", rows)
        with store._transaction():
            dead, dead_bytes = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(stored), 0) FROM chunks WHERE hash NOT IN (SELECT hash FROM live)"
            ).fetchone()
            db.execute("DELETE FROM chunks WHERE hash NOT IN (SELECT hash FROM live)")
        rewritten, reclaimed = _compact(store)
        db.execute("DELETE FROM live")
    if dead:
        log.info(
            "store: %d unreferenced chunks (%d MiB) dropped, %d packs rewritten", dead, dead_bytes >> 20, rewritten
        )
    return Collected(int(dead), int(dead_bytes), rewritten, reclaimed)


def _compact(store: ChunkStore) -> tuple[int, int]:
    live = dict(
        store.db.execute("SELECT pack, SUM(stored) + COUNT(*) * ? FROM chunks GROUP BY pack", (RECORD.size,)).fetchall()
    )
    rewritten = reclaimed = 0
    for path in sorted(store.packs_dir.glob("*.pack")):
        if not path.stem.isdigit() or int(path.stem) == store.pack_id:
            continue
        pack, size = int(path.stem), path.stat().st_size
        kept = int(live.get(pack, 0))
        if size and kept >= COMPACT_BELOW * size:
            continue
        rows = store.db.execute("SELECT hash, offset, stored FROM chunks WHERE pack = ?", (pack,)).fetchall()
        if rows:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                records = [os.pread(fd, RECORD.size + stored, offset - RECORD.size) for _, offset, stored in rows]
            finally:
                os.close(fd)
            if store.pack_size + kept > 128 * 1024 * 1024:
                store._open_pack(store.pack_id + 1)
            start = store.pack_size
            _write_all(store.pack_fd, records)
            os.fdatasync(store.pack_fd)
            store.pack_size += sum(len(r) for r in records)
            moves, at = [], start
            for (digest, _, _), record in zip(rows, records, strict=True):
                moves.append((store.pack_id, at + RECORD.size, digest))
                at += len(record)
            with store._transaction() as db:
                db.executemany("UPDATE chunks SET pack = ?, offset = ? WHERE hash = ?", moves)
        store.drop_reader(pack)
        path.unlink()
        _fsync_dir(store.packs_dir)
        rewritten += 1
        reclaimed += size - kept
    return rewritten, reclaimed
