"""The process server's chunk store: content-addressed, deduplicated chunks in pack files, an SQLite index, the
replica head of every protected disk, and per-disk point manifests.

Layout under DATA/process: ``packs/NNNNNNNN.pack`` (append-only; each record a small header with the chunk's hash,
then its data as it arrived: zstd or raw), ``manifests/<hash>.zst`` (a point's chunk hashes, in disk order, named
by their own hash), ``index.db`` (SQLite, WAL, synchronous=FULL).

Durability is a group commit (``commit``): the batch's new chunk records are appended to the pack and flushed
(fdatasync), then one SQLite transaction records them, moves the disks' heads and their acknowledged sequence
numbers, and closes points. Only after that transaction has committed does the receiver acknowledge the batch.
Killed at any moment, the store holds every acknowledged chunk: the index never names pack bytes that were not
flushed first, and a pack's unindexed tail (a batch that never committed) is cut off when the writer reopens it.

A missing head entry means zeros: zero chunks are markers, never stored."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from agent.faults import fault_point
from agent.replication.chunks import Geometry, RootHasher, chunk_hash, zero_hash, zeros
from agent.shared.fsutil import fsync_dir, open_lock_file
from agent.shared.replication_wire import (
    EARLIEST,
    HASH_SIZE,
    LATEST,
    MAX_CHUNK_SIZE,
    MAX_DISK_SIZE,
    MAX_FREEZE_MS,
    MAX_SEQ,
    Codec,
    PointClose,
    weakest_consistency,
)
from server.errors import (
    IndexMissing,
    PointCorrupt,
    PointIdTaken,
    PointMismatch,
    PointNotFound,
    ReplicationProtocol,
    StoreBusy,
    StoreDamaged,
    StoreFull,
    StoreWriteFailed,
)
from server.process import records, references
from server.process.decompress import chunk_decompressor, manifest_decompressor
from server.process.records import PointRecord

log = logging.getLogger("mobility.process")

PACK_MAX = 128 * 1024 * 1024
RECORD = struct.Struct("<2sBxII32s")  # magic, codec, stored length, raw length, hash
RECORD_MAGIC = b"MC"
DEFAULT_RESERVE = 256 * 1024 * 1024
_SLACK = 4 * 1024 * 1024  # the index's own growth in one commit, beyond the chunk bytes

_SCHEMA_V1 = """
CREATE TABLE chunks (
    hash BLOB PRIMARY KEY,
    pack INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    stored INTEGER NOT NULL,
    raw INTEGER NOT NULL,
    codec INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX chunks_by_pack ON chunks (pack);
CREATE TABLE disks (
    disk_key INTEGER PRIMARY KEY,
    host_id TEXT NOT NULL,
    disk TEXT NOT NULL,
    size INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    acked_seq INTEGER NOT NULL DEFAULT 0,
    updated REAL,
    UNIQUE (host_id, disk)
);
CREATE TABLE heads (
    disk_key INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (disk_key, idx)
) WITHOUT ROWID;
CREATE TABLE points (
    point_id TEXT PRIMARY KEY,
    host_id TEXT NOT NULL,
    created REAL NOT NULL,
    consistency TEXT NOT NULL,
    disks TEXT NOT NULL,
    freeze_ms REAL
);
CREATE INDEX points_by_host ON points (host_id, created);
CREATE TABLE point_disks (
    point_id TEXT NOT NULL,
    disk TEXT NOT NULL,
    size INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    root TEXT NOT NULL,
    manifest TEXT NOT NULL,
    closed REAL NOT NULL,
    consistency TEXT NOT NULL,
    PRIMARY KEY (point_id, disk)
);
"""
# A point belongs to a machine: points and their disks are keyed by (host, point), and a point ID is used once in the
# store (an agent-chosen ID never reaches another machine's point: v1 keyed points by the ID alone). Rows another
# machine wrote into a point under v1 cannot be told apart and stay with the point's first owner. Times and freeze
# windows outside what the wire allows now (agent/shared/replication_wire.py) are brought inside it: a listing turned
# a `created` of 1e300 into a date and failed.
_SCHEMA_V2 = """
CREATE TABLE points_v2 (
    host_id TEXT NOT NULL,
    point_id TEXT NOT NULL,
    created REAL NOT NULL,
    consistency TEXT NOT NULL,
    disks TEXT NOT NULL,
    freeze_ms REAL,
    PRIMARY KEY (host_id, point_id)
);
INSERT INTO points_v2
    SELECT host_id, point_id, MIN(MAX(created, 0.0), 4294967296.0), consistency, disks,
        CASE WHEN freeze_ms BETWEEN 0.0 AND 3600000.0 THEN freeze_ms END
    FROM points;
CREATE TABLE point_disks_v2 (
    host_id TEXT NOT NULL,
    point_id TEXT NOT NULL,
    disk TEXT NOT NULL,
    size INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    root TEXT NOT NULL,
    manifest TEXT NOT NULL,
    closed REAL NOT NULL,
    consistency TEXT NOT NULL,
    PRIMARY KEY (host_id, point_id, disk)
);
INSERT INTO point_disks_v2
    SELECT p.host_id, d.point_id, d.disk, d.size, d.chunk_size, d.root, d.manifest, d.closed, d.consistency
    FROM point_disks d JOIN points p ON p.point_id = d.point_id;
DROP TABLE point_disks;
DROP TABLE points;
ALTER TABLE points_v2 RENAME TO points;
ALTER TABLE point_disks_v2 RENAME TO point_disks;
CREATE INDEX points_by_host ON points (host_id, created);
CREATE UNIQUE INDEX points_by_id ON points (point_id);
"""
# References are counted, so that dropping a point costs what it references and never a walk of the whole store
# (server/process/gc.py). A disk's points are numbered by generation (``disks.gen``, the next one; ``point_disks.gen``);
# a head entry records the generation it was written in (``since``), and an entry a write replaces after a point saw
# it is kept as ``retired`` for the generations that saw it, [since, until). A point of generation g references exactly
# the head entries and retired entries whose span holds g, so ``chunks.refs`` (head entries plus retired entries naming
# the chunk, kept by the triggers below in every transaction) is zero exactly when no head and no point needs the
# chunk. Dropping points leaves ``sweeps`` to forget the retired entries only they saw. Generations, spans and counts
# of a store migrated from version 2 are computed from its manifests once, when it opens (``_AFTER``).
_SCHEMA_V3 = """
ALTER TABLE chunks ADD COLUMN refs INTEGER NOT NULL DEFAULT 0;
CREATE INDEX chunks_unreferenced ON chunks (pack, stored) WHERE refs = 0;
DROP INDEX chunks_by_pack;
CREATE INDEX chunks_by_place ON chunks (pack, offset);
ALTER TABLE heads ADD COLUMN since INTEGER NOT NULL DEFAULT 0;
ALTER TABLE disks ADD COLUMN gen INTEGER NOT NULL DEFAULT 0;
ALTER TABLE disks ADD COLUMN rebuilt INTEGER NOT NULL DEFAULT 0;
INSERT OR IGNORE INTO disks (host_id, disk, size, chunk_size, acked_seq, updated, rebuilt)
    SELECT host_id, disk, MAX(size), MAX(chunk_size), 0, NULL, 1 FROM point_disks GROUP BY host_id, disk;
ALTER TABLE point_disks ADD COLUMN disk_key INTEGER NOT NULL DEFAULT 0;
ALTER TABLE point_disks ADD COLUMN gen INTEGER NOT NULL DEFAULT 0;
ALTER TABLE point_disks ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
UPDATE point_disks SET disk_key =
    (SELECT d.disk_key FROM disks d WHERE d.host_id = point_disks.host_id AND d.disk = point_disks.disk);
CREATE INDEX point_disks_by_gen ON point_disks (disk_key, gen);
CREATE INDEX point_disks_by_manifest ON point_disks (manifest);
CREATE TABLE retired (
    disk_key INTEGER NOT NULL,
    until INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    since INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (disk_key, until, idx)
) WITHOUT ROWID;
CREATE TABLE sweeps (
    disk_key INTEGER NOT NULL,
    gen INTEGER NOT NULL,
    manifest TEXT NOT NULL,
    PRIMARY KEY (disk_key, gen)
) WITHOUT ROWID;
CREATE TRIGGER heads_added AFTER INSERT ON heads BEGIN
    UPDATE chunks SET refs = refs + 1 WHERE hash = NEW.hash;
END;
CREATE TRIGGER heads_changed AFTER UPDATE OF hash ON heads BEGIN
    UPDATE chunks SET refs = refs + 1 WHERE hash = NEW.hash;
    INSERT INTO retired (disk_key, until, idx, since, hash)
        SELECT OLD.disk_key, NEW.since, OLD.idx, OLD.since, OLD.hash WHERE OLD.since < NEW.since;
    UPDATE chunks SET refs = refs - 1 WHERE hash = OLD.hash AND OLD.since >= NEW.since;
END;
CREATE TRIGGER heads_removed AFTER DELETE ON heads BEGIN
    INSERT INTO retired (disk_key, until, idx, since, hash)
        SELECT OLD.disk_key, gen, OLD.idx, OLD.since, OLD.hash FROM disks
        WHERE disk_key = OLD.disk_key AND OLD.since < gen;
    UPDATE chunks SET refs = refs - 1 WHERE hash = OLD.hash
        AND OLD.since >= (SELECT gen FROM disks WHERE disk_key = OLD.disk_key);
END;
CREATE TRIGGER retired_removed AFTER DELETE ON retired BEGIN
    UPDATE chunks SET refs = refs - 1 WHERE hash = OLD.hash;
END;
"""
# Each entry brings the index from version N to N+1. Never edit a released entry: add one.
MIGRATIONS: tuple[str, ...] = (_SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3)
SCHEMA_VERSION = len(MIGRATIONS)


def _after_v3(store: ChunkStore) -> None:
    """A store of version 2: generations, spans and counts from its manifests, and a record for every point."""
    for problem in references.rebuild(store.db, store.manifest_hashes, heads_from_points=False):
        log.warning("store migration: %s", problem)
    for r in store.db.execute(
        "SELECT d.host_id, d.point_id, p.created, p.consistency, p.disks, p.freeze_ms, d.disk, d.size, d.chunk_size, "
        "d.root, d.manifest, d.closed, d.consistency, d.gen, d.seq FROM point_disks d "
        "JOIN points p ON p.host_id = d.host_id AND p.point_id = d.point_id"
    ).fetchall():
        record = PointRecord(
            r[0],
            r[1],
            float(r[2]),
            r[3],
            tuple(x for x in str(r[4]).split("\n") if x),
            r[5],
            r[6],
            r[7],
            r[8],
            r[9],
            r[10],
            min(max(float(r[11]), EARLIEST), LATEST),
            r[12],
            r[13],
            r[14],
        )
        if not (store.points_dir / records.relative_path(record.host_id, record.point_id, record.disk)).exists():
            records.write(store.points_dir, record)


# What a migration to version N leaves to Python (it reads files: manifests), in the same transaction.
_AFTER: dict[int, Callable[[ChunkStore], None]] = {3: _after_v3}


def statements(script: str) -> Iterator[str]:
    """The statements of a migration, each whole (a trigger's body holds semicolons of its own)."""
    pending = ""
    for part in script.split(";"):
        pending += part + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending.strip()
            pending = ""
    if pending.strip(" \n;"):
        raise ValueError(f"an incomplete statement in a migration: {pending[:80]!r}")


def holds_data(root: Path) -> bool:
    """Whether a store directory holds anything an index would have to describe: packs with records, manifests,
    point records."""
    packs = root / "packs"
    if packs.is_dir() and any(p.stat().st_size for p in packs.glob("*.pack")):
        return True
    return any((root / d).is_dir() and any((root / d).iterdir()) for d in ("manifests", "points"))


@dataclass(frozen=True)
class DiskRow:
    disk_key: int
    host_id: str
    disk: str
    size: int
    chunk_size: int
    acked_seq: int
    rebuilt: bool = False  # its head was rebuilt from its newest point (`store repair`): the agent must resync

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.size, self.chunk_size)


_DISKS = "SELECT disk_key, host_id, disk, size, chunk_size, acked_seq, rebuilt FROM disks"
_DISK_BY_NAME = _DISKS + " WHERE host_id = ? AND disk = ?"
_DISK_BY_KEY = _DISKS + " WHERE disk_key = ?"


def _disk_row(row: tuple[Any, ...]) -> DiskRow:
    key, host, disk, size, chunk_size, acked, rebuilt = row
    return DiskRow(int(key), str(host), str(disk), int(size), int(chunk_size), int(acked), bool(rebuilt))


@dataclass(frozen=True)
class ChunkPut:
    """A verified chunk for the head of a disk: ``data`` as it is to be kept (zstd or raw; empty for zeros)."""

    disk_key: int
    index: int
    hash: bytes
    codec: Codec
    raw_len: int
    data: bytes | memoryview  # a view of the frame it came in, kept whole until the commit wrote it: no copy
    seq: int


@dataclass(frozen=True)
class PointPut:
    disk_key: int
    close: PointClose
    seq: int


@dataclass(frozen=True)
class PointDisk:
    disk: str
    size: int
    chunk_size: int
    root: str
    manifest: str

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.size, self.chunk_size)


@dataclass(frozen=True)
class Point:
    point_id: str
    host_id: str
    created: float
    consistency: str
    disks: tuple[PointDisk, ...]
    freeze_ms: float | None
    complete: bool


@dataclass(frozen=True)
class Usage:
    store_bytes: int
    chunks: int
    free_bytes: int
    reserve_bytes: int

    @property
    def accepting(self) -> bool:
        return self.free_bytes > self.reserve_bytes


class ChunkStore:
    """One process server's store. The writer (``writer=True``, one per store: the serving process, which holds
    ``writer.lock`` while it runs) recovers and appends; readers (the CLI: points, failover, verify) only read,
    beside a running server."""

    def __init__(self, root: Path, *, writer: bool = False, reserve: int = DEFAULT_RESERVE) -> None:
        self.root = root
        self.writer = writer
        self.reserve = reserve
        self.packs_dir = root / "packs"
        self.manifests_dir = root / "manifests"
        self.points_dir = root / "points"
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()  # the readers' pack descriptors
        self.write_lock = threading.RLock()  # the write connection: the committer, streams opening disks, pruning
        self._local = threading.local()  # one read connection per thread (WAL: reads never wait for a commit)
        self._cctx = zstandard.ZstdCompressor(level=3)
        self._writer_lock = -1
        if writer:
            for d in (root, self.packs_dir, self.manifests_dir):
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._writer_lock = take_writer_lock(root)
            if not (root / "index.db").exists() and holds_data(root):
                # A new, empty index would cut every pack to nothing (no record of theirs is indexed): refuse.
                self._release_writer()
                raise IndexMissing(f"{root / 'index.db'} is missing but {root} holds packs, manifests or point records")
        elif not (root / "index.db").exists():
            raise StoreDamaged(f"{root}: no chunk store here (DATA/process/index.db is missing)")
        try:
            self.db = sqlite3.connect(root / "index.db", timeout=30, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA busy_timeout=30000")
            if writer:
                (root / "index.db").chmod(0o600)
                self._migrate()
        except sqlite3.DatabaseError as e:
            self._release_writer()
            raise StoreDamaged(f"{root / 'index.db'}: {e}") from e
        self.pack_id = 0
        self.pack_fd = -1
        self.pack_size = 0
        self._highest = 0  # the highest pack number given out: the committer's packs and compaction's
        if writer:
            self._recover()

    # Opening ------------------------------------------------------------------------------------------------------

    def _migrate(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            version = int(self.db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StoreDamaged(
                    f"{self.root / 'index.db'} is of version {version}, newer than this server's {SCHEMA_VERSION}"
                )
            for n in range(version, SCHEMA_VERSION):
                for statement in statements(MIGRATIONS[n]):
                    self.db.execute(statement)
                after = _AFTER.get(n + 1)
                if after is not None and version > 0:  # a new index has nothing to bring along
                    after(self)
            if version < SCHEMA_VERSION:
                self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            raise

    def _recover(self) -> None:
        """Cut every pack back to the end of its last indexed record: a batch killed before its commit leaves
        flushed-but-unindexed bytes, which no acknowledgement ever covered. One look-up per pack, of its last record
        (records never overlap): a start costs what the packs are, never a walk of every chunk (minutes at ten
        million)."""
        packs = sorted(int(p.stem) for p in self.packs_dir.glob("*.pack") if p.stem.isdigit())
        for pack in packs:
            path = self.pack_path(pack)
            last = self.db.execute(
                "SELECT offset + stored FROM chunks WHERE pack = ? ORDER BY offset DESC LIMIT 1", (pack,)
            ).fetchone()
            end = int(last[0]) if last else 0
            if not end and pack != packs[-1]:  # compacted away before a kill removed the file
                path.unlink()
                continue
            if path.stat().st_size > end:
                with path.open("r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
        self._highest = packs[-1] if packs else 1
        self._open_pack(self._highest)

    def allocate_pack(self) -> int:
        """A new pack number (the committer's next pack, or one compaction fills): numbers are never reused, so a
        reader's open descriptor never meets another pack under an old number."""
        with self.write_lock:
            self._highest += 1
            return self._highest

    def pack_path(self, pack: int) -> Path:
        return self.packs_dir / f"{pack:08d}.pack"

    def _open_pack(self, pack: int) -> None:
        if self.pack_fd >= 0:
            os.close(self.pack_fd)
            self.pack_fd = -1
        path = self.pack_path(pack)
        new = not path.exists()
        self.pack_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.pack_id = pack
        self.pack_size = os.fstat(self.pack_fd).st_size
        if new:
            fsync_dir(self.packs_dir)

    @property
    def reader_db(self) -> sqlite3.Connection:
        """This thread's read connection (a reader process uses its one connection)."""
        if not self.writer:
            return self.db
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.root / "index.db", timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    def close(self) -> None:
        if self.pack_fd >= 0:
            os.close(self.pack_fd)
            self.pack_fd = -1
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self.db.close()
        self._release_writer()

    def _release_writer(self) -> None:
        if self._writer_lock >= 0:
            os.close(self._writer_lock)  # the lock goes with the descriptor
            self._writer_lock = -1

    # Disks --------------------------------------------------------------------------------------------------------

    def disk(self, host_id: str, disk: str) -> DiskRow | None:
        row = self.reader_db.execute(_DISK_BY_NAME, (host_id, disk))
        found = row.fetchone()
        return _disk_row(found) if found else None

    def disks(self, host_id: str | None = None) -> list[DiskRow]:
        sql = _DISKS
        db = self.reader_db
        rows = db.execute(sql + " WHERE host_id = ? ORDER BY disk" if host_id else sql, (host_id,) if host_id else ())
        return [_disk_row(r) for r in rows]

    def open_disk(self, host_id: str, disk: str, size: int, chunk_size: int) -> tuple[DiskRow, bool]:
        """The disk's row for a stream with this geometry, and whether the replica already held it. A resized
        disk keeps the chunks both sizes share; a new chunk size starts the replica empty. A head rebuilt by
        `store repair` is not known to hold what the agent sent (``rebuilt``, until ``replica_sent``)."""
        with self.write_lock, self._transaction() as db:
            found = db.execute(_DISK_BY_NAME, (host_id, disk)).fetchone()
            row = _disk_row(found) if found else None
            if row is None:
                db.execute(
                    "INSERT INTO disks (host_id, disk, size, chunk_size, acked_seq, updated) VALUES (?, ?, ?, ?, 0, ?)",
                    (host_id, disk, size, chunk_size, time.time()),
                )
                known = False
            elif row.chunk_size != chunk_size:
                db.execute("DELETE FROM heads WHERE disk_key = ?", (row.disk_key,))
                db.execute(
                    "UPDATE disks SET size = ?, chunk_size = ? WHERE disk_key = ?", (size, chunk_size, row.disk_key)
                )
                known = False
            else:
                if row.size != size:
                    keep = min(row.geometry.count, Geometry(size, chunk_size).count) - 1  # the last may change length
                    db.execute("DELETE FROM heads WHERE disk_key = ? AND idx >= ?", (row.disk_key, keep))
                    db.execute("UPDATE disks SET size = ? WHERE disk_key = ?", (size, row.disk_key))
                known = not row.rebuilt
            found = db.execute(_DISK_BY_NAME, (host_id, disk)).fetchone()
        return _disk_row(found), known

    def replica_sent(self, row: DiskRow) -> None:
        """The agent of a disk whose head `store repair` rebuilt was sent that head's hashes: it resyncs against
        them, and the replica is known again from here on."""
        if row.rebuilt:
            with self.write_lock, self._transaction() as db:
                db.execute("UPDATE disks SET rebuilt = 0 WHERE disk_key = ?", (row.disk_key,))

    def advance(self, disk_key: int, seq: int) -> None:
        """A stream's frames up to ``seq`` are applied, the last of which kept nothing (a batch whose every delta was
        refused): its durable sequence moves all the same (the receiver's committer, in its group commit's turn)."""
        with self.write_lock, self._transaction() as db:
            db.execute("UPDATE disks SET acked_seq = MAX(acked_seq, ?) WHERE disk_key = ?", (seq, disk_key))

    def head(self, row: DiskRow) -> bytearray:
        """Every chunk hash of the disk's replica, in order (zero hashes where nothing was received)."""
        return self._head(self.reader_db, row)

    def head_slice(self, row: DiskRow, first: int, n: int) -> bytes:
        """The replica's chunk hashes from ``first``, at most ``n`` of them (a stream sends them slice by slice)."""
        return bytes(self._head(self.reader_db, row, first, n))

    @staticmethod
    def _head(db: sqlite3.Connection, row: DiskRow, first: int = 0, n: int | None = None) -> bytearray:
        g = row.geometry
        end = g.count if n is None else min(g.count, first + n)
        if end <= first:
            return bytearray()
        buf = bytearray(zero_hash(g.chunk_size) * (end - first))
        last = g.count - 1
        if end == g.count and g.length(last) != g.chunk_size:
            buf[(last - first) * HASH_SIZE :] = zero_hash(g.length(last))
        for idx, digest in db.execute(
            "SELECT idx, hash FROM heads WHERE disk_key = ? AND idx >= ? AND idx < ? ORDER BY idx",
            (row.disk_key, first, end),
        ):
            at = (idx - first) * HASH_SIZE
            buf[at : at + HASH_SIZE] = digest
        return buf

    # The group commit ---------------------------------------------------------------------------------------------

    def commit(self, items: Sequence[ChunkPut | PointPut]) -> list[Exception | None]:
        """Make ``items`` durable in one group commit, each disk's in the order given (its stream's sequence
        order); one outcome per item. An item that is refused (out of bounds, a point whose root does not match or
        whose ID another machine holds) fails alone, with the items of its disk that follow it in the batch: its
        stream ends there, and every other disk's items are kept. Raises StoreFull or StoreWriteFailed when nothing
        of the batch was kept (and anything else only after undoing the batch's pack bytes)."""
        with self.write_lock:
            return self._commit(items)

    def _commit(self, items: Sequence[ChunkPut | PointPut]) -> list[Exception | None]:
        outcomes: list[Exception | None] = [None] * len(items)
        refused: dict[int, Exception] = {}  # disk key -> what ended its stream in this batch
        for n, item in enumerate(items):
            error = refused.get(item.disk_key) or _out_of_bounds(item)
            if error is not None:
                refused[item.disk_key] = outcomes[n] = error
        chunks = [
            i
            for i, outcome in zip(items, outcomes, strict=True)
            if outcome is None and isinstance(i, ChunkPut) and i.codec is not Codec.ZERO
        ]
        fresh = self._missing({c.hash for c in chunks})
        kept: list[ChunkPut] = []
        placed: list[tuple[bytes, int, int, int, int, int]] = []
        need = 0
        for c in chunks:
            if c.hash not in fresh:
                continue
            fresh.discard(c.hash)  # the same data twice in one batch is kept once
            kept.append(c)
            need += RECORD.size + len(c.data)
        self._check_space(need)
        start_pack, start_size = self.pack_id, self.pack_size
        try:
            if kept:
                if self.pack_size + need > PACK_MAX and self.pack_size:
                    self._open_pack(self.allocate_pack())
                    start_pack, start_size = self.pack_id, self.pack_size
                offset = self.pack_size
                pieces: list[bytes | memoryview] = []  # each record's header and its data, written as they are
                for c in kept:
                    pieces += (RECORD.pack(RECORD_MAGIC, c.codec, len(c.data), c.raw_len, c.hash), c.data)
                    placed.append((c.hash, self.pack_id, offset + RECORD.size, len(c.data), c.raw_len, int(c.codec)))
                    offset += RECORD.size + len(c.data)
                write_all(self.pack_fd, pieces)
                os.fdatasync(self.pack_fd)
                self.pack_size = offset
            return self._index(items, outcomes, placed)
        except BaseException as e:
            # Whatever failed, the batch's bytes leave the pack: no later batch may append after bytes that no
            # index row names (and that a restart would otherwise cut together with acknowledged records).
            self._undo_pack(start_pack, start_size)
            if isinstance(e, OSError):
                if e.errno == 28:  # ENOSPC
                    raise StoreFull(f"{self.root}: the filesystem is full ({e.strerror})") from e
                raise StoreWriteFailed(f"{self.root}: {e.strerror or e}") from e
            if isinstance(e, sqlite3.OperationalError):
                if "full" in str(e):
                    raise StoreFull(f"{self.root}: {e}") from e
                raise StoreWriteFailed(f"{self.root / 'index.db'}: {e}") from e
            raise

    def _undo_pack(self, pack: int, size: int) -> None:
        with contextlib.suppress(OSError):
            if self.pack_id != pack:
                self._open_pack(pack)
            os.ftruncate(self.pack_fd, size)
            self.pack_size = size

    def _check_space(self, need: int) -> None:
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if free - need - _SLACK < self.reserve:
            raise StoreFull(
                f"{self.root}: {free // (1 << 20)} MiB free, {self.reserve // (1 << 20)} MiB are kept in reserve; "
                "new data is refused until space is freed"
            )

    def _missing(self, hashes: set[bytes]) -> set[bytes]:
        missing = set(hashes)
        items = list(hashes)
        for i in range(0, len(items), 500):
            group = items[i : i + 500]
            marks = ",".join("?" * len(group))
            for (digest,) in self.db.execute(f"SELECT hash FROM chunks WHERE hash IN ({marks})", group):  # noqa: S608
                missing.discard(digest)
        return missing

    def _index(
        self,
        items: Sequence[ChunkPut | PointPut],
        outcomes: list[Exception | None],
        placed: list[tuple[bytes, int, int, int, int, int]],
    ) -> list[Exception | None]:
        now = time.time()
        with self._transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO chunks (hash, pack, offset, stored, raw, codec) VALUES (?, ?, ?, ?, ?, ?)",
                placed,
            )
            keys = sorted({item.disk_key for item in items})
            gens = {
                int(key): int(gen)
                for i in range(0, len(keys), 500)
                for key, gen in db.execute(
                    f"SELECT disk_key, gen FROM disks WHERE disk_key IN ({','.join('?' * len(keys[i : i + 500]))})",  # noqa: S608
                    keys[i : i + 500],
                )
            }
            # Each chunk's newest frame so far, in sequence order: a chunk written, zeroed and written again in one
            # batch ends as its last frame says, exactly as if each frame had been committed alone.
            heads: dict[tuple[int, int], bytes | None] = {}
            seqs: dict[int, int] = {}
            refused: dict[int, Exception] = {}
            for n, item in enumerate(items):
                if outcomes[n] is not None:
                    continue
                if item.disk_key in refused:
                    outcomes[n] = refused[item.disk_key]
                    continue
                if isinstance(item, ChunkPut):
                    heads[(item.disk_key, item.index)] = None if item.codec is Codec.ZERO else item.hash
                else:
                    self._apply_heads(db, heads, gens)  # the point covers exactly the frames before it
                    outcome = self._close_point(db, item, now, gens)
                    if outcome is not None:  # refused, so not acknowledged, so not counted as durable
                        refused[item.disk_key] = outcomes[n] = outcome
                        continue
                seqs[item.disk_key] = max(seqs.get(item.disk_key, 0), item.seq)
            self._apply_heads(db, heads, gens)
            db.executemany(
                "UPDATE disks SET acked_seq = MAX(acked_seq, ?), updated = ? WHERE disk_key = ?",
                [(seq, now, key) for key, seq in seqs.items()],
            )
        return outcomes

    @staticmethod
    def _apply_heads(db: sqlite3.Connection, heads: dict[tuple[int, int], bytes | None], gens: dict[int, int]) -> None:
        """Move the heads; the triggers keep the references (an entry a point saw is retired, not forgotten)."""
        written = [(key, idx, digest, gens[key]) for (key, idx), digest in heads.items() if digest is not None]
        zeroed = [(key, idx) for (key, idx), digest in heads.items() if digest is None]
        if written:
            db.executemany(
                "INSERT INTO heads (disk_key, idx, hash, since) VALUES (?, ?, ?, ?) ON CONFLICT (disk_key, idx) "
                "DO UPDATE SET hash = excluded.hash, since = excluded.since WHERE hash != excluded.hash",
                written,
            )
        if zeroed:
            db.executemany("DELETE FROM heads WHERE disk_key = ? AND idx = ?", zeroed)
        heads.clear()

    def _close_point(self, db: sqlite3.Connection, put: PointPut, now: float, gens: dict[int, int]) -> Exception | None:
        row = db.execute(_DISK_BY_KEY, (put.disk_key,)).fetchone()
        disk = _disk_row(row)
        close = put.close
        owner = db.execute("SELECT host_id FROM points WHERE point_id = ?", (close.point_id,)).fetchone()
        if owner is not None and owner[0] != disk.host_id:
            return PointIdTaken(
                f"point {close.point_id} of {disk.disk}: another machine holds a point with this ID; the point was "
                "refused"
            )
        closed = db.execute(
            "SELECT root FROM point_disks WHERE host_id = ? AND point_id = ? AND disk = ?",
            (disk.host_id, close.point_id, disk.disk),
        ).fetchone()
        if closed is not None and closed[0] != close.root:
            return PointIdTaken(
                f"point {close.point_id} was closed on {disk.disk} before, with another root hash: a closed point "
                "never changes; the point was refused"
            )
        hashes = self._head(db, disk)
        root = RootHasher(disk.geometry)
        root.update(hashes)
        got = root.hexdigest()
        if got != close.root:
            return PointMismatch(
                f"point {close.point_id} of {disk.disk}: the replica's root hash is {got[:16]}..., the source "
                f"computed {close.root[:16]}...; the point was refused"
            )
        if closed is not None:  # the same point again (a resend after a lost acknowledgement): it stands as it is
            return None
        gen = gens[disk.disk_key]
        first = db.execute(
            "SELECT created, consistency, disks, freeze_ms FROM points WHERE host_id = ? AND point_id = ?",
            (disk.host_id, close.point_id),
        ).fetchone()
        created, consistency, names, freeze_ms = first or (
            close.created,
            close.consistency,
            "\n".join(close.disks),
            close.freeze_ms,
        )
        manifest = self._write_manifest(hashes)
        record = PointRecord(
            host_id=disk.host_id,
            point_id=close.point_id,
            created=created,
            consistency=consistency,
            disks=tuple(d for d in str(names).split("\n") if d),
            freeze_ms=freeze_ms,
            disk=disk.disk,
            size=disk.size,
            chunk_size=disk.chunk_size,
            root=close.root,
            manifest=manifest,
            closed=min(max(now, EARLIEST), LATEST),
            disk_consistency=close.consistency,
            gen=gen,
            seq=put.seq,
        )
        records.write(self.points_dir, record)  # durable before the index row it backs
        fault_point("store.point", step="recorded")
        if first is None:
            db.execute(
                "INSERT INTO points (host_id, point_id, created, consistency, disks, freeze_ms) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (disk.host_id, close.point_id, created, consistency, names, freeze_ms),
            )
        self.insert_point_disk(db, disk.disk_key, record)
        db.execute("UPDATE disks SET gen = gen + 1 WHERE disk_key = ?", (disk.disk_key,))
        gens[disk.disk_key] = gen + 1
        return None

    @staticmethod
    def insert_point_disk(db: sqlite3.Connection, disk_key: int, r: PointRecord) -> None:
        db.execute(
            "INSERT INTO point_disks (host_id, point_id, disk, size, chunk_size, root, manifest, closed, consistency, "
            "disk_key, gen, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                r.host_id,
                r.point_id,
                r.disk,
                r.size,
                r.chunk_size,
                r.root,
                r.manifest,
                r.closed,
                r.disk_consistency,
                disk_key,
                r.gen,
                r.seq,
            ),
        )

    def _write_manifest(self, hashes: bytearray) -> str:
        name = chunk_hash(hashes).hex()
        path = self.manifests_dir / f"{name}.zst"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            with tmp.open("wb") as f:
                f.write(self._cctx.compress(bytes(hashes)))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(self.manifests_dir)
        return name

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            raise

    # Points -------------------------------------------------------------------------------------------------------

    def points(self, host_id: str, *, complete_only: bool = True) -> list[Point]:
        rows = self.reader_db.execute(
            "SELECT point_id FROM points WHERE host_id = ? ORDER BY created, point_id", (host_id,)
        ).fetchall()
        found = [self.point(host_id, r[0]) for r in rows]
        return [p for p in found if p is not None and (p.complete or not complete_only)]

    def point(self, host_id: str, point_id: str) -> Point | None:
        """The machine's point by ID (another machine's point of that ID is not this one)."""
        db = self.reader_db
        row = db.execute(
            "SELECT point_id, host_id, created, consistency, disks, freeze_ms FROM points "
            "WHERE host_id = ? AND point_id = ?",
            (host_id, point_id),
        ).fetchone()
        if row is None:
            return None
        disks = tuple(
            PointDisk(*r)
            for r in db.execute(
                "SELECT disk, size, chunk_size, root, manifest FROM point_disks "
                "WHERE host_id = ? AND point_id = ? ORDER BY disk",
                (host_id, point_id),
            )
        )
        named = [d for d in str(row[4]).split("\n") if d]
        complete = {d.disk for d in disks} >= set(named)
        labels = db.execute(
            "SELECT consistency FROM point_disks WHERE host_id = ? AND point_id = ?", (host_id, point_id)
        )
        consistency = weakest_consistency([str(row[3]), *(r[0] for r in labels)])
        return Point(row[0], row[1], row[2], consistency, disks, row[5], complete)

    def find_point(self, point_id: str) -> Point | None:
        """A point by its ID alone, whichever machine's (an ID is used once in a store): `verify --point ID`."""
        row = self.reader_db.execute("SELECT host_id FROM points WHERE point_id = ?", (point_id,)).fetchone()
        return self.point(str(row[0]), point_id) if row else None

    def resolve_point(self, host_id: str, point_id: str) -> Point:
        """A complete point of the machine by ID, or its newest for ``latest`` (PointNotFound otherwise)."""
        if point_id == "latest":
            points = self.points(host_id)
            if not points:
                raise PointNotFound(f"machine {host_id} has no complete recovery point yet")
            return points[-1]
        point = self.point(host_id, point_id)
        if point is None or not point.complete:
            raise PointNotFound(f"no complete point {point_id!r} for machine {host_id}")
        return point

    def recent_points(self, host_id: str, limit: int) -> list[Point]:
        """A machine's newest ``limit`` points, newest first, complete or not (the dashboard's page of a machine)."""
        rows = self.reader_db.execute(
            "SELECT point_id FROM points WHERE host_id = ? ORDER BY created DESC, point_id DESC LIMIT ?",
            (host_id, limit),
        ).fetchall()
        return [p for p in (self.point(host_id, r[0]) for r in rows) if p is not None]

    def newest_points(self) -> dict[str, float]:
        """When each machine's newest point was made (one pass over the points_by_host index: the dashboard's
        snapshot and /metrics read this, never a query per machine)."""
        rows = self.reader_db.execute("SELECT host_id, MAX(created) FROM points GROUP BY host_id")
        return {str(h): float(t) for h, t in rows}

    def manifest(self, disk: PointDisk) -> bytes:
        """The point's chunk hashes for one disk, checked against the manifest's own name."""
        path = self.manifests_dir / f"{disk.manifest}.zst"
        try:
            data = manifest_decompressor().decompress(
                path.read_bytes(), max_output_size=disk.geometry.count * HASH_SIZE
            )
        except (OSError, zstandard.ZstdError) as e:
            raise PointCorrupt(f"{disk.disk}: manifest {disk.manifest[:16]}... unreadable: {e}") from e
        if len(data) != disk.geometry.count * HASH_SIZE or chunk_hash(data).hex() != disk.manifest:
            raise PointCorrupt(f"{disk.disk}: manifest {disk.manifest[:16]}... does not match its hash")
        return data

    def manifest_hashes(self, name: str, geometry: Geometry) -> bytes | None:
        """A manifest's hashes by name, or None when it is missing or damaged."""
        try:
            return self.manifest(PointDisk("", geometry.size, geometry.chunk_size, "", name))
        except PointCorrupt:
            return None

    def prune(self, host_id: str, keep: int) -> int:
        """Drop the machine's complete points beyond the newest ``keep`` (and incomplete ones older than those). Costs
        what the machine's points are, never the store: their records go, then their rows in one short transaction,
        which leaves what only they referenced to the collection's sweep (server/process/gc.py)."""
        points = self.points(host_id, complete_only=False)
        complete = [p for p in points if p.complete]
        if len(complete) <= keep:
            return 0
        cutoff = complete[-keep].created
        drop = [p for p in points if p.created < cutoff]
        with self.write_lock:
            # Records first: a dropped point never comes back from a rebuilt index. Killed between the two, the
            # rows stay without records, and the next prune drops them.
            for p in drop:
                for d in p.disks:
                    records.remove(self.points_dir, host_id, p.point_id, d.disk)
            records.sync(self.points_dir, host_id)
            fault_point("store.prune", step="unrecorded")
            with self._transaction() as db:
                keys = [(host_id, p.point_id) for p in drop]
                db.executemany(
                    "INSERT OR IGNORE INTO sweeps (disk_key, gen, manifest) "
                    "SELECT disk_key, gen, manifest FROM point_disks WHERE host_id = ? AND point_id = ?",
                    keys,
                )
                db.executemany("DELETE FROM point_disks WHERE host_id = ? AND point_id = ?", keys)
                db.executemany("DELETE FROM points WHERE host_id = ? AND point_id = ?", keys)
        return len(drop)

    @contextlib.contextmanager
    def writing(self) -> Iterator[sqlite3.Connection]:
        """The write connection in a transaction, under the write lock (commits wait meanwhile: keep it short)."""
        with self.write_lock, self._transaction() as db:
            yield db

    # Reading chunks -----------------------------------------------------------------------------------------------

    def read(self, digest: bytes, length: int, *, verify: bool = True) -> bytes:
        """The raw bytes of a chunk; zeros for the zero hash. With ``verify`` the data is hashed again."""
        if digest == zero_hash(length):
            return zeros(length)
        where = self._where(digest)
        try:
            return self._read_at(digest, length, where, verify=verify)
        except PointCorrupt:
            # Compaction may have moved the chunk (and removed its old pack) between the look-up and the read.
            moved = self._where(digest)
            if moved == where:
                raise
            return self._read_at(digest, length, moved, verify=verify)

    def _where(self, digest: bytes) -> tuple[int, int, int, int, int]:
        row = self.reader_db.execute(
            "SELECT pack, offset, stored, raw, codec FROM chunks WHERE hash = ?", (digest,)
        ).fetchone()
        if row is None:
            raise PointCorrupt(f"chunk {digest.hex()[:16]}... is missing from the store")
        return int(row[0]), int(row[1]), int(row[2]), int(row[3]), int(row[4])

    def _read_at(self, digest: bytes, length: int, where: tuple[int, int, int, int, int], *, verify: bool) -> bytes:
        pack, offset, stored, raw, codec = where
        if raw != length:
            raise PointCorrupt(f"chunk {digest.hex()[:16]}... holds {raw} bytes, {length} expected")
        fd = self._reader_fd(pack)
        header = os.pread(fd, RECORD.size, offset - RECORD.size)
        data = os.pread(fd, stored, offset)
        if len(header) != RECORD.size or len(data) != stored or RECORD.unpack(header)[4] != digest:
            raise PointCorrupt(f"chunk {digest.hex()[:16]}... in pack {pack} at {offset} is damaged")
        if codec == Codec.ZSTD:
            try:
                data = chunk_decompressor().decompress(data, max_output_size=length)
            except zstandard.ZstdError as e:
                raise PointCorrupt(f"chunk {digest.hex()[:16]}... in pack {pack} does not decompress: {e}") from e
        if len(data) != length or (verify and chunk_hash(data) != digest):
            raise PointCorrupt(f"chunk {digest.hex()[:16]}... in pack {pack} at {offset} does not match its hash")
        return data

    def _reader_fd(self, pack: int) -> int:
        with self._lock:
            fd = self._fds.get(pack)
            if fd is None:
                try:
                    fd = os.open(self.pack_path(pack), os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    raise PointCorrupt(f"pack {pack} is unreadable: {e.strerror}") from e
                self._fds[pack] = fd
            return fd

    def drop_reader(self, pack: int) -> None:
        """Forget the read descriptor of a pack (it was rewritten or removed)."""
        with self._lock:
            fd = self._fds.pop(pack, None)
        if fd is not None:
            os.close(fd)

    def footprint(self) -> tuple[int, int, int]:
        """(bytes the store takes: its packs and index, bytes free for it, the size of its filesystem), from the
        files' sizes: cheap at any size, unlike ``usage``, which sums every chunk."""
        used = 0
        for entry in os.scandir(self.packs_dir):
            if entry.name.endswith(".pack") and entry.is_file(follow_symlinks=False):
                used += entry.stat(follow_symlinks=False).st_size
        for name in ("index.db", "index.db-wal"):
            with contextlib.suppress(FileNotFoundError):
                used += (self.root / name).stat().st_size
        st = os.statvfs(self.root)
        return used, st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def usage(self) -> Usage:
        chunks, stored = self.reader_db.execute("SELECT COUNT(*), COALESCE(SUM(stored), 0) FROM chunks").fetchone()
        st = os.statvfs(self.root)
        return Usage(int(stored), int(chunks), st.f_bavail * st.f_frsize, self.reserve)


def _out_of_bounds(item: ChunkPut | PointPut) -> Exception | None:
    """The store's own check of what the receiver parsed at the edge: a number it cannot hold fails the item (and
    its stream), never the batch."""
    if not 0 < item.seq <= MAX_SEQ:
        return ReplicationProtocol(f"sequence {item.seq} is outside 1 to 2^62")
    if isinstance(item, ChunkPut):
        if not 0 <= item.index < MAX_DISK_SIZE or not 0 < item.raw_len <= MAX_CHUNK_SIZE or len(item.hash) != HASH_SIZE:
            return ReplicationProtocol(f"chunk {item.index} of {item.raw_len} bytes is not a chunk")
        return None
    close = item.close
    if not EARLIEST <= close.created <= LATEST or not (
        close.freeze_ms is None or 0.0 <= close.freeze_ms <= MAX_FREEZE_MS
    ):
        return ReplicationProtocol(f"point {close.point_id}: its time or freeze window is out of bounds")
    return None


def write_all(fd: int, pieces: Sequence[bytes | memoryview]) -> None:
    pending = pieces
    while pending:
        batch = pending[:512]  # IOV_MAX is 1024
        written = os.writev(fd, batch)
        total = sum(len(r) for r in batch)
        if written < total:  # a short write (rare): finish it byte-wise
            rest = b"".join(batch)[written:]
            while rest:
                rest = rest[os.write(fd, rest) :]
        pending = pending[512:]


def take_writer_lock(root: Path) -> int:
    """Two writers would each cut the other's unindexed pack tail and interleave records: the second one is
    refused (PS-STORE-BUSY). The lock is released when the writer closes or dies."""
    fd = open_lock_file(root / "writer.lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        os.close(fd)
        raise StoreBusy(f"another process server writes {root}") from e
    return fd
