"""Collection of the chunk store, off the ingest path: what dropped points alone referenced is forgotten, and packs
that are mostly chunks nothing references any more are compacted.

Retention (``ChunkStore.prune``) only drops the points' rows, which costs what the machine's points are. The rest
runs here, in the process server's maintenance thread (server/process/maintenance.py), in short slices: a slice holds
the store's write lock for one small transaction (its size adapts so that it takes about ``SLICE_SECONDS``), then
lets the committer have the store for at least as long. Nothing here walks the whole store (the references are
counted as the index changes: ``_SCHEMA_V3`` in server/process/store.py):

1. **Sweep.** For each disk whose points were dropped (``sweeps``), the retired entries that lived only in
   generations of dropped points are deleted, which lowers their chunks' counts; the dropped points' manifests that
   no point names any more are removed. What it touches is what changed on the disk around the dropped points.
2. **Compaction.** A pack whose unreferenced bytes are at least half of it (found through a partial index of the
   unreferenced chunks alone) is rewritten: its referenced records are copied to a pack that compaction fills, and
   flushed, without the lock; the index rows move to the copies, then the unreferenced rows are deleted, both in
   slices; once no row names the old pack, its file is removed. A chunk that a commit took up again meanwhile (the
   same data sent again) is referenced by then: it is kept, and copied in the next round.

Crash-safe at every step, and killed anywhere it converges: a row is deleted only in a transaction that sees nothing
reference it; a row moves only to bytes already flushed; a pack file goes only once no row names it. A kill leaves
copies no row names (the writer cuts a pack's unindexed tail when it reopens, and removes a pack no row names), a
manifest no point names, or sweeps still to do (done again; each step is idempotent)."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from agent.faults import fault_point
from agent.shared.fsutil import fsync_dir
from server.process import store as store_module
from server.process.store import RECORD, RECORD_MAGIC, ChunkStore, write_all

log = logging.getLogger("mobility.process")

COMPACT_BELOW = 0.5  # a pack whose unreferenced bytes are at least this share of it is rewritten
SLICE_SECONDS = 0.05  # what one slice should hold the write lock for
SLICE_ROWS = (50, 500, 20_000)  # rows in a slice: the least, the first, the most
COPY_BYTES = 8 * 1024 * 1024  # records copied and flushed at a time, at most
COPY_ROWS = 20_000  # ... and rows
_AFTER_ALL = (1 << 62) + 1  # a cursor past every chunk index


@dataclass
class Collected:
    retired: int = 0  # retired entries forgotten (points no longer need them)
    manifests: int = 0  # manifests removed
    chunks: int = 0  # index entries of unreferenced chunks dropped
    bytes: int = 0  # their stored bytes
    packs_rewritten: int = 0
    reclaimed: int = 0  # bytes of pack files removed, less what was copied

    def add(self, other: Collected) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def gaps(dropped: list[int], live: list[int], top: int) -> list[tuple[int, int]]:
    """For a disk's dropped generations: each gap (prev, next) they leave between the generations still held
    (``live``, sorted), -1 before the first and the disk's next generation ``top`` after the last (pure). An entry
    retired within a gap, since > prev and until <= next, served only generations in it, none of them held: points
    closed later get generations from ``top`` on."""
    found: set[tuple[int, int]] = set()
    for g in dropped:
        prev = max((x for x in live if x < g), default=-1)
        nxt = min((x for x in live if x > g), default=top)
        found.add((prev, nxt))
    return sorted(found)


class Collector:
    """Sweeps and compacts one store in slices. ``stopping`` is asked between slices (the server is stopping: what
    is left is done at the next start); ``pause`` sleeps between slices. One per maintenance thread: it keeps the
    pack it fills with copies across runs."""

    def __init__(
        self,
        store: ChunkStore,
        *,
        stopping: Callable[[], bool] = lambda: False,
        pause: Callable[[float], object] = time.sleep,
    ) -> None:
        self.store = store
        self.stopping = stopping
        self.pause = pause
        self.rows = SLICE_ROWS[1]
        self.slices = 0
        self.held = 0.0  # seconds the write lock was held, in all
        self.longest = 0.0  # ... and at most at once
        self._target: tuple[int, int] | None = None  # (pack, descriptor) that compaction fills
        self._target_size = 0

    def run(self, *, compact: bool = True) -> Collected:
        done = Collected()
        self.sweep(done)
        if compact and not self.stopping():
            self.compact(done)
        if done.retired or done.chunks or done.packs_rewritten:
            log.info(
                "store: %d retired entries and %d manifests forgotten, %d unreferenced chunks (%d MiB) dropped, %d "
                "packs rewritten",
                done.retired,
                done.manifests,
                done.chunks,
                done.bytes >> 20,
                done.packs_rewritten,
            )
        return done

    def close(self) -> None:
        if self._target is not None:
            os.close(self._target[1])
            self._target = None

    @contextlib.contextmanager
    def _slice(self) -> Iterator[sqlite3.Connection]:
        """One transaction under the write lock; then as long again without it."""
        with self.store.write_lock:  # a commit in progress first: its time is not the slice's
            start = time.monotonic()
            with self.store.writing() as db:
                yield db
            took = time.monotonic() - start
        self.slices += 1
        self.held += took
        self.longest = max(self.longest, took)
        least, _, most = SLICE_ROWS
        if took > SLICE_SECONDS:  # in proportion: a busy machine stretches every slice at once
            self.rows = max(int(self.rows * SLICE_SECONDS / took), least)
        elif took < SLICE_SECONDS / 2:
            self.rows = min(self.rows * 2, most)
        self.pause(max(took, 0.001))

    # The sweep ----------------------------------------------------------------------------------------------------

    def sweep(self, done: Collected) -> None:
        db = self.store.reader_db
        for (disk_key,) in db.execute("SELECT DISTINCT disk_key FROM sweeps").fetchall():
            if self.stopping():
                return
            self._sweep_disk(int(disk_key), done)

    def _sweep_disk(self, disk_key: int, done: Collected) -> None:
        with self.store.writing() as db:  # one consistent view: the generations dropped, held, and the next one
            dropped = [int(g) for (g,) in db.execute("SELECT gen FROM sweeps WHERE disk_key = ?", (disk_key,))]
            live = [int(g) for (g,) in db.execute("SELECT gen FROM point_disks WHERE disk_key = ?", (disk_key,))]
            row = db.execute("SELECT gen FROM disks WHERE disk_key = ?", (disk_key,)).fetchone()
        top = int(row[0]) if row else 0
        reader = self.store.reader_db
        for prev, nxt in gaps(dropped, sorted(live), top):
            cursor = (prev + 1, _AFTER_ALL)  # from until = prev + 2: an entry of the gap lived at least there
            while True:
                if self.stopping():
                    return
                rows = reader.execute(
                    "SELECT until, idx FROM retired WHERE disk_key = ? AND (until, idx) > (?, ?) AND until <= ? "
                    "AND since > ? ORDER BY until, idx LIMIT ?",
                    (disk_key, *cursor, nxt, prev, self.rows),
                ).fetchall()
                if not rows:
                    break
                with self._slice() as w:
                    w.executemany(
                        "DELETE FROM retired WHERE disk_key = ? AND until = ? AND idx = ?",
                        [(disk_key, until, idx) for until, idx in rows],
                    )
                fault_point("store.collect", step="swept")
                done.retired += len(rows)
                cursor = (int(rows[-1][0]), int(rows[-1][1]))
        names = {
            str(m) for (m,) in reader.execute("SELECT manifest FROM sweeps WHERE disk_key = ?", (disk_key,)).fetchall()
        }
        with self._slice() as w:
            for name in sorted(names):
                if w.execute("SELECT 1 FROM point_disks WHERE manifest = ? LIMIT 1", (name,)).fetchone() is None:
                    (self.store.manifests_dir / f"{name}.zst").unlink(missing_ok=True)
                    done.manifests += 1
            w.executemany("DELETE FROM sweeps WHERE disk_key = ? AND gen = ?", [(disk_key, g) for g in dropped])
        fsync_dir(self.store.manifests_dir)
        fault_point("store.collect", step="manifests")

    # Compaction ---------------------------------------------------------------------------------------------------

    def compact(self, done: Collected) -> None:
        candidates = self.store.reader_db.execute(
            "SELECT pack, SUM(stored) + COUNT(*) * ? FROM chunks WHERE refs = 0 GROUP BY pack", (RECORD.size,)
        ).fetchall()
        for pack, dead in candidates:
            if self.stopping():
                return
            if pack >= self.store.pack_id or (self._target is not None and pack == self._target[0]):
                continue  # still written to (the committer's pack numbers only grow: those below are sealed)
            try:
                size = self.store.pack_path(pack).stat().st_size
            except FileNotFoundError:
                continue
            if dead >= COMPACT_BELOW * size:
                self._compact(int(pack), size, done)

    def _compact(self, pack: int, size: int, done: Collected) -> None:
        copied = 0
        reader = self.store.reader_db
        while not self.stopping():
            after = 0
            while True:  # the referenced records, a window at a time in pack order
                rows = reader.execute(
                    "SELECT hash, offset, stored FROM chunks WHERE pack = ? AND offset > ? AND refs > 0 "
                    "ORDER BY offset LIMIT ?",
                    (pack, after, COPY_ROWS),
                ).fetchall()
                window, taken = [], 0
                for row in rows:
                    window.append(row)
                    taken += RECORD.size + row[2]
                    if taken >= COPY_BYTES:
                        break
                if not window:
                    break
                if not self._copy(pack, window):
                    return
                copied += taken
                after = int(window[-1][1])
                if self.stopping():
                    return
            while not self.stopping():  # what nothing references: gone, slice by slice
                with self._slice() as w:
                    gone = w.execute(
                        "SELECT hash, stored FROM chunks WHERE pack = ? AND refs = 0 LIMIT ?", (pack, self.rows)
                    ).fetchall()
                    w.executemany("DELETE FROM chunks WHERE hash = ?", [(h,) for h, _ in gone])
                if not gone:
                    break
                done.chunks += len(gone)
                done.bytes += sum(int(s) for _, s in gone)
                fault_point("store.collect", step="dropped")
            if self.stopping():
                return
            if reader.execute("SELECT 1 FROM chunks WHERE pack = ? LIMIT 1", (pack,)).fetchone():
                continue  # taken up again by a commit while it was compacted: copied in the next round
            self.store.drop_reader(pack)
            self.store.pack_path(pack).unlink()
            fsync_dir(self.store.packs_dir)
            fault_point("store.collect", step="removed")
            done.packs_rewritten += 1
            done.reclaimed += size - copied
            return

    def _copy(self, pack: int, rows: list[tuple[bytes, int, int]]) -> bool:
        """Copy the records of ``rows`` (in pack order) to the pack compaction fills, flush it, then move their
        index rows there in slices. False when a record is not what its row says (the pack is left alone)."""
        path = self.store.pack_path(pack)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            records = [os.pread(fd, RECORD.size + stored, offset - RECORD.size) for _, offset, stored in rows]
        finally:
            os.close(fd)
        for (digest, offset, stored), record in zip(rows, records, strict=True):
            magic, _codec, length, _raw, named = RECORD.unpack_from(record)
            if len(record) != RECORD.size + stored or magic != RECORD_MAGIC or length != stored or named != digest:
                log.error(
                    "store: pack %d at %d does not hold chunk %s...: not compacted", pack, offset, digest.hex()[:16]
                )
                return False
        total = sum(len(r) for r in records)
        target, fd = self._fill(total)
        start = self._target_size
        write_all(fd, records)
        os.fdatasync(fd)
        self._target_size += total
        fault_point("store.collect", step="copied")
        moves, at = [], start
        for (digest, _, _), record in zip(rows, records, strict=True):
            moves.append((target, at + RECORD.size, digest, pack))
            at += len(record)
        first = 0
        while first < len(moves):
            step = self.rows  # a slice adapts the size of the next one
            with self._slice() as w:
                w.executemany(
                    "UPDATE chunks SET pack = ?, offset = ? WHERE hash = ? AND pack = ?", moves[first : first + step]
                )
            first += step
            fault_point("store.collect", step="moved")
        return True

    def _fill(self, need: int) -> tuple[int, int]:
        """The pack compaction copies into (a new one when this one would grow past PACK_MAX)."""
        if self._target is None or (self._target_size and self._target_size + need > store_module.PACK_MAX):
            self.close()
            pack = self.store.allocate_pack()
            fd = os.open(
                self.store.pack_path(pack), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600
            )
            fsync_dir(self.store.packs_dir)
            self._target, self._target_size = (pack, fd), 0
        return self._target


def collect(store: ChunkStore) -> Collected:
    """A whole collection now, in slices and pauses as the maintenance thread runs it (tests, benchmarks)."""
    collector = Collector(store)
    try:
        return collector.run()
    finally:
        collector.close()
