"""`mobility-server store repair`: check the chunk store's index against the packs, manifests and point records it
describes, and rebuild it from them when it is missing or damaged (as restic's `repair index` does for its own).

What the files hold, and so what a rebuilt index gets back:

- **chunks**, from the packs: each record carries its chunk's hash, codec and lengths; every record is read and its
  data hashed again, and only records that verify are indexed. Bytes that are not a whole record (the unfinished
  write of a killed server, a damaged spot) are skipped: scanning goes on at the next record that verifies;
- **points**, from their records (server/process/records.py): a point is restored only when every disk's record is
  whole, its manifest matches its name and the point's root hash, and every chunk it names was indexed. Anything less
  is listed and its record kept (PS-REPAIR-PARTIAL);
- **replica heads**, from each disk's newest restored point: what came after it is not on disk anywhere but in the
  packs, unordered. The disk is marked rebuilt: its agent is told the replica is not the one it knows (WELCOME
  ``known`` false) until it has fetched the rebuilt head's hashes, and resyncs by checksums against them (it sends
  what changed since that point); its acknowledged sequence is that point's;
- **references**, as a migration computes them (server/process/references.py).

The new index is built beside the old one and renamed over it when whole (the old one is kept, renamed, when there
was one): killed at any moment, the store is as before, and `store repair` runs again. A healthy index is left as it
is: repair only writes the records of points that lack one, and corrects reference counts that are wrong."""

from __future__ import annotations

import mmap
import os
import sqlite3
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from agent.replication.chunks import MAX_CHUNKS, Geometry, RootHasher, chunk_hash, zero_hash
from agent.shared.fsutil import fsync_dir
from agent.shared.replication_wire import HASH_SIZE, MAX_CHUNK_SIZE, MAX_PAYLOAD, Codec
from server.errors import StoreDamaged
from server.process import records, references
from server.process.decompress import chunk_decompressor, manifest_decompressor
from server.process.records import PointRecord, RecordInvalid
from server.process.store import (
    MIGRATIONS,
    RECORD,
    RECORD_MAGIC,
    SCHEMA_VERSION,
    ChunkStore,
    holds_data,
    statements,
    take_writer_lock,
)

_INSERT_EVERY = 20_000  # chunk rows inserted at a time while packs are read


@dataclass
class Repaired:
    """What `store repair` found and did."""

    rebuilt: bool = False
    reason: str = ""  # why the index was rebuilt
    kept_as: str | None = None  # the old index, renamed
    packs: int = 0
    chunks: int = 0
    points: int = 0  # points the index holds now
    machines: int = 0
    heads: int = 0  # disks whose heads were rebuilt from their newest point
    records_written: int = 0  # records of points the (healthy) index held without one
    counts_fixed: int = 0
    skipped: list[str] = field(default_factory=list)  # pack bytes that are not a whole record
    not_restored: list[str] = field(default_factory=list)  # points (and record files) not restored, with why
    unlisted: list[str] = field(default_factory=list)  # records of points a healthy index does not hold

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def repair(root: Path, *, rebuild: bool = False) -> Repaired:
    """Check the store at ``root`` and repair it: rebuild the index when it is missing or damaged (or with
    ``rebuild``, whatever its state). Takes the store's writer lock: refused (PS-STORE-BUSY) while a server runs."""
    if not root.is_dir():
        raise StoreDamaged(f"{root}: no chunk store here")
    lock = take_writer_lock(root)
    try:
        index = root / "index.db"
        reason = "asked to rebuild" if rebuild else _diagnose(root)
        if reason is None:
            return _keep(root)
        if not index.exists() and not holds_data(root):
            return Repaired(reason="the store is empty")
        return _rebuild(root, reason)
    finally:
        os.close(lock)


# Checking an index --------------------------------------------------------------------------------------------


def _diagnose(root: Path) -> str | None:
    """Why the index must be rebuilt, or None when it agrees with the files (nothing is written here)."""
    index = root / "index.db"
    if not index.exists():
        return "the index was missing"
    try:
        db = sqlite3.connect(f"file:{index}?mode=rw", uri=True, isolation_level=None)
    except sqlite3.Error as e:
        return f"the index does not open: {e}"
    try:
        try:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            verdict = [r[0] for r in db.execute("PRAGMA integrity_check(20)")]
        except sqlite3.DatabaseError as e:
            return f"the index is damaged: {e}"
        if verdict != ["ok"]:
            return f"the index is damaged: {'; '.join(verdict)[:300]}"
        if version != SCHEMA_VERSION:
            return f"the index is of version {version}, not {SCHEMA_VERSION}"
        try:
            problem = _packs_disagree(root, db)
            if problem is None:
                _, missing = references.check(db)
                if missing:
                    problem = f"the heads or points reference {missing} chunks the index does not hold"
        except sqlite3.DatabaseError as e:
            return f"the index is damaged: {e}"
        return problem
    finally:
        db.close()


def _packs_disagree(root: Path, db: sqlite3.Connection) -> str | None:
    """Whether an indexed chunk is not where the index says: its record's header read back from its pack."""
    fds: dict[int, int] = {}
    try:
        for pack, offset, stored, digest in db.execute(
            "SELECT pack, offset, stored, hash FROM chunks ORDER BY pack, offset"
        ):
            fd = fds.get(pack)
            if fd is None:
                if fds:
                    os.close(fds.popitem()[1])
                try:
                    fd = fds[pack] = os.open(root / "packs" / f"{pack:08d}.pack", os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    return f"pack {pack} is unreadable: {e.strerror}"
            header = os.pread(fd, RECORD.size, offset - RECORD.size)
            if len(header) != RECORD.size:
                return f"pack {pack} ends before the chunk the index places at {offset}"
            magic, _codec, length, _raw, named = RECORD.unpack(header)
            if magic != RECORD_MAGIC or length != stored or named != digest:
                return f"pack {pack} does not hold at {offset} the chunk the index places there"
    finally:
        for fd in fds.values():
            os.close(fd)
    return None


def _keep(root: Path) -> Repaired:
    """A healthy index: write the records its points lack, correct wrong counts, list records it does not hold."""
    done = Repaired()
    store = ChunkStore(root)  # a reader: nothing of the packs is touched
    try:
        db = sqlite3.connect(root / "index.db", isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            done.counts_fixed = references.recount(db)
            db.execute("COMMIT")
        finally:
            db.close()
        rows = store.reader_db.execute(
            "SELECT d.host_id, d.point_id, p.created, p.consistency, p.disks, p.freeze_ms, d.disk, d.size, "
            "d.chunk_size, d.root, d.manifest, d.closed, d.consistency, d.gen, d.seq FROM point_disks d "
            "JOIN points p ON p.host_id = d.host_id AND p.point_id = d.point_id"
        ).fetchall()
        held = set()
        for r in rows:
            record = PointRecord(
                r[0], r[1], float(r[2]), r[3], tuple(x for x in str(r[4]).split("\n") if x), r[5], *r[6:]
            )
            held.add(records.relative_path(record.host_id, record.point_id, record.disk))
            path = store.points_dir / records.relative_path(record.host_id, record.point_id, record.disk)
            try:
                same = records.decode(path.read_bytes(), path.relative_to(store.points_dir)) == record
            except (OSError, RecordInvalid):
                same = False
            if not same:
                records.write(store.points_dir, record)
                done.records_written += 1
        for path, _ in records.scan(store.points_dir):
            if path.relative_to(store.points_dir) not in held:
                done.unlisted.append(str(path.relative_to(store.points_dir)))
        done.points = int(store.reader_db.execute("SELECT COUNT(*) FROM points").fetchone()[0])
        done.machines = int(store.reader_db.execute("SELECT COUNT(DISTINCT host_id) FROM points").fetchone()[0])
        done.chunks = int(store.reader_db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])
        done.packs = len(list(store.packs_dir.glob("*.pack")))
    finally:
        store.close()
    return done


# Rebuilding ---------------------------------------------------------------------------------------------------


def _rebuild(root: Path, reason: str) -> Repaired:
    done = Repaired(rebuilt=True, reason=reason)
    new = root / "index.db.rebuild"
    for leftover in (new, new.with_name(new.name + "-wal"), new.with_name(new.name + "-shm")):
        leftover.unlink(missing_ok=True)
    db = sqlite3.connect(new, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=OFF")  # a scratch file until it is whole: renamed over the index then
        db.execute("PRAGMA synchronous=OFF")
        db.execute("BEGIN")
        for script in MIGRATIONS:
            for statement in statements(script):
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        _index_packs(root, db, done)
        _restore_points(root, db, done)
        references.rebuild(db, _manifests(root), heads_from_points=True)
        done.heads = int(db.execute("SELECT COUNT(*) FROM disks").fetchone()[0])
        wrong, missing = references.check(db)
        if wrong or missing:  # never: every chunk a restored point names was indexed
            raise StoreDamaged(f"the rebuilt index does not add up ({wrong} counts wrong, {missing} chunks missing)")
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode=WAL")
    finally:
        db.close()
    fd = os.open(new, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    index = root / "index.db"
    if index.exists():
        kept = root / f"index.db.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
        index.rename(kept)
        done.kept_as = kept.name
    for suffix in ("-wal", "-shm"):  # the old index's log must never be applied to the new one
        old = index.with_name(index.name + suffix)
        if old.exists():
            if done.kept_as:
                old.rename(root / (done.kept_as + suffix))
            else:
                old.unlink()
    fsync_dir(root)
    new.rename(index)
    index.chmod(0o600)
    fsync_dir(root)
    return done


def _index_packs(root: Path, db: sqlite3.Connection, done: Repaired) -> None:
    packs = sorted(int(p.stem) for p in (root / "packs").glob("*.pack") if p.stem.isdigit())
    for pack in packs:
        done.packs += 1
        rows: list[tuple[bytes, int, int, int, int, int]] = []
        for row in _records_of(root / "packs" / f"{pack:08d}.pack", pack, done.skipped):
            rows.append(row)
            if len(rows) >= _INSERT_EVERY:
                _insert_chunks(db, rows, done)
        _insert_chunks(db, rows, done)


def _insert_chunks(db: sqlite3.Connection, rows: list[tuple[bytes, int, int, int, int, int]], done: Repaired) -> None:
    before = db.total_changes
    db.executemany(
        "INSERT OR IGNORE INTO chunks (hash, pack, offset, stored, raw, codec) VALUES (?, ?, ?, ?, ?, ?)", rows
    )
    done.chunks += db.total_changes - before
    rows.clear()


def _records_of(path: Path, pack: int, skipped: list[str]) -> Iterator[tuple[bytes, int, int, int, int, int]]:
    """(hash, pack, offset of the data, stored, raw, codec) of every record in the pack whose data verifies; what
    lies between is skipped (and said in ``skipped``)."""
    size = path.stat().st_size
    if size == 0:
        return
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        at = 0
        while at < size:
            found = _record_at(m, at, size)
            if found is not None:
                digest, codec, stored, raw = found
                yield digest, pack, at + RECORD.size, stored, raw, codec
                at += RECORD.size + stored
                continue
            nxt = m.find(RECORD_MAGIC, at + 1)
            while nxt != -1 and _record_at(m, nxt, size) is None:
                nxt = m.find(RECORD_MAGIC, nxt + 1)
            end = size if nxt == -1 else nxt
            what = "an unfinished write (serve cuts it)" if nxt == -1 else "not a record"
            skipped.append(f"pack {pack}: {end - at} bytes at offset {at}: {what}")
            at = end


def _record_at(m: mmap.mmap, at: int, size: int) -> tuple[bytes, int, int, int] | None:
    if at + RECORD.size > size:
        return None
    magic, codec, stored, raw, digest = RECORD.unpack_from(m, at)
    if magic != RECORD_MAGIC or codec not in (Codec.RAW, Codec.ZSTD) or not 0 < raw <= MAX_CHUNK_SIZE:
        return None
    if not 0 < stored <= MAX_PAYLOAD or at + RECORD.size + stored > size:
        return None
    data = m[at + RECORD.size : at + RECORD.size + stored]
    if codec == Codec.ZSTD:
        try:
            if zstandard.frame_content_size(data) != raw:
                return None
            data = chunk_decompressor().decompress(data, max_output_size=raw)
        except zstandard.ZstdError:
            return None
    if len(data) != raw or chunk_hash(data) != digest:
        return None
    return bytes(digest), int(codec), int(stored), int(raw)


def _manifests(root: Path) -> references.ManifestOf:
    reader = _ManifestReader(root)
    return reader.hashes


class _ManifestReader:
    def __init__(self, root: Path) -> None:
        self.dir = root / "manifests"

    def hashes(self, name: str, geometry: Geometry) -> bytes | None:
        want = geometry.count * HASH_SIZE
        try:
            raw = (self.dir / f"{name}.zst").read_bytes()
            if zstandard.frame_content_size(raw) not in (want, -1):
                return None
            data = manifest_decompressor().decompress(raw, max_output_size=want)
        except (OSError, zstandard.ZstdError):
            return None
        if len(data) != want or chunk_hash(data).hex() != name:
            return None
        return data


def _restore_points(root: Path, db: sqlite3.Connection, done: Repaired) -> None:
    """Points from their records: each whole (every record of it sound, its manifests matching, every chunk they name
    indexed), disks from their newest records."""
    points_dir = root / "points"
    by_point: dict[tuple[str, str], list[PointRecord]] = defaultdict(list)
    for path, scanned in records.scan(points_dir):
        if isinstance(scanned, RecordInvalid):
            done.not_restored.append(f"record {path.relative_to(points_dir)}: {scanned}")
            continue
        by_point[(scanned.host_id, scanned.point_id)].append(scanned)
    manifests = _ManifestReader(root)
    sound: dict[tuple[str, str], list[PointRecord]] = {}
    hosts_of: dict[str, list[str]] = defaultdict(list)
    for host, point_id in by_point:
        hosts_of[point_id].append(host)
    for (host, point_id), found in sorted(by_point.items()):
        if len(hosts_of[point_id]) > 1:  # an ID is used once in a store: the first machine's point is the point
            first = min(hosts_of[point_id], key=lambda h: (min(r.closed for r in by_point[(h, point_id)]), h))
            if host != first:
                done.not_restored.append(
                    f"point {point_id} of machine {host}: machine {first} holds a point of this ID"
                )
                continue
        why = _unsound(found, manifests)
        if why:
            done.not_restored.append(f"point {point_id} of machine {host}: {why}")
            continue
        sound[(host, point_id)] = found
    # The chunks they name, each manifest read once more (one at a time: a manifest is up to 32 MiB).
    distinct = sorted({(r.manifest, r.size, r.chunk_size) for found in sound.values() for r in found})
    db.execute("CREATE TEMP TABLE wanted (hash BLOB PRIMARY KEY) WITHOUT ROWID")
    for name, size, chunk_size in distinct:
        db.executemany(
            "INSERT OR IGNORE INTO wanted VALUES (?)", [(h,) for h in _chunks_of(manifests, name, size, chunk_size)]
        )
    missing = {
        bytes(h)
        for (h,) in db.execute(
            "SELECT hash FROM wanted WHERE NOT EXISTS (SELECT 1 FROM chunks c WHERE c.hash = wanted.hash)"
        )
    }
    db.execute("DROP TABLE wanted")
    lacking: dict[str, int] = {}  # manifest -> how many of its chunks are missing
    for name, size, chunk_size in distinct if missing else ():
        lacking[name] = sum(1 for h in _chunks_of(manifests, name, size, chunk_size) if h in missing)
    disks: dict[tuple[str, str], PointRecord] = {}
    machines = set()
    for (host, point_id), found in sorted(sound.items()):
        lost = sum(lacking.get(r.manifest, 0) for r in found)
        if lost:
            done.not_restored.append(f"point {point_id} of machine {host}: {lost} of its chunks are not in the packs")
            del sound[(host, point_id)]
            continue
        ordered = sorted(found, key=lambda r: (r.gen, r.closed))
        head = ordered[0]
        db.execute(
            "INSERT INTO points (host_id, point_id, created, consistency, disks, freeze_ms) VALUES (?, ?, ?, ?, ?, ?)",
            (host, point_id, head.created, head.consistency, "\n".join(head.disks), head.freeze_ms),
        )
        for record in ordered:
            newest = disks.get((host, record.disk))
            if newest is None or (record.gen, record.closed) > (newest.gen, newest.closed):
                disks[(host, record.disk)] = record
        done.points += 1
        machines.add(host)
    done.machines = len(machines)
    for (host, disk), newest in sorted(disks.items()):
        db.execute(
            "INSERT INTO disks (host_id, disk, size, chunk_size, acked_seq, updated, rebuilt) "
            "VALUES (?, ?, ?, ?, ?, ?, 1)",
            (host, disk, newest.size, newest.chunk_size, newest.seq, newest.closed),
        )
    keys = {(str(h), str(d)): int(k) for k, h, d in db.execute("SELECT disk_key, host_id, disk FROM disks")}
    for (host, _), found in sound.items():
        for record in found:
            ChunkStore.insert_point_disk(db, keys[(host, record.disk)], record)


def _unsound(found: list[PointRecord], manifests: _ManifestReader) -> str | None:
    """Why a point's records cannot be restored, or None when they can: they agree, and each disk's manifest is
    whole and gives the record's root hash."""
    named = found[0].disks
    if any(r.disks != named for r in found) or len({r.disk for r in found}) != len(found):
        return "its records disagree"
    for record in sorted(found, key=lambda r: r.disk):
        if record.geometry.count > MAX_CHUNKS:
            return f"{record.disk}: a disk of {record.geometry.count} chunks"
        data = manifests.hashes(record.manifest, record.geometry)
        if data is None:
            return f"{record.disk}: manifest {record.manifest[:16]}... is missing or damaged"
        root = RootHasher(record.geometry)
        root.update(data)
        if root.hexdigest() != record.root:
            return f"{record.disk}: its manifest does not give the point's root hash"
    return None


def _chunks_of(manifests: _ManifestReader, name: str, size: int, chunk_size: int) -> list[bytes]:
    """The chunk hashes a manifest names, zero chunks left out (they are not kept)."""
    g = Geometry(size, chunk_size)
    data = manifests.hashes(name, g) or b""
    zeros = {zero_hash(chunk_size), zero_hash(g.length(g.count - 1))}
    return [h for h in _hashes(data) if h not in zeros]


def _hashes(data: bytes) -> list[bytes]:
    return [data[i : i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)]


def described(done: Repaired) -> list[str]:
    """The report, as lines for people."""
    lines = []
    if not done.rebuilt:
        lines.append("the index agrees with the packs, manifests and point records: it was kept")
        if done.records_written:
            lines.append(f"  {done.records_written} point records written (their points had none)")
        if done.counts_fixed:
            lines.append(f"  {done.counts_fixed} reference counts corrected")
    else:
        lines.append(f"index rebuilt: {done.reason}")
        if done.kept_as:
            lines.append(f"  the old index was kept as {done.kept_as} (remove it once the store serves again)")
        lines.append(
            f"  {done.chunks} chunks indexed from {done.packs} packs; {done.points} points of {done.machines} machines "
            f"restored; {done.heads} disks' replicas set to their newest point (their agents resync by checksums)"
        )
    for line in done.skipped:
        lines.append(f"  skipped: {line}")
    for line in done.unlisted:
        lines.append(f"  a record of a point the index does not hold: {line} (`store repair --rebuild` restores it)")
    for line in done.not_restored:
        lines.append(f"  NOT RESTORED: {line}")
    return lines
