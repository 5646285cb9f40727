"""The chunk store's references, rebuilt from its manifests: once when a store of index version 2 is migrated, and
whenever `mobility-server store repair` rebuilds the index. How the index keeps them in every transaction (head
entries, retired entries and their spans of point generations, ``chunks.refs``) is told at ``_SCHEMA_V3`` in
server/process/store.py; here the same spans are computed from the points' manifests in generation order (``Spans``,
pure) and written, and the counts are made again from the rows that hold them (``recount``)."""

from __future__ import annotations

import sqlite3
from array import array
from collections.abc import Callable, Iterable

from agent.replication.chunks import Geometry, zero_hash
from agent.shared.replication_wire import HASH_SIZE

_NONE = bytes(HASH_SIZE)  # no chunk: a zero chunk, or past the end of the disk
_BLOCK = 512  # hashes compared at once: most of a disk is the same from one point to the next

Span = tuple[int, int, int, bytes]  # (chunk index, since, until, hash): the entry the generations [since, until) saw
ManifestOf = Callable[[str, Geometry], bytes | None]  # a manifest's hashes, None when it cannot be read


class Spans:
    """One disk's chunk entries through its generations (pure): ``feed`` each generation's chunk hashes in order,
    and it returns the entries that generation replaced, with the span of generations that held them."""

    def __init__(self) -> None:
        self.current = bytearray()  # the entry of each chunk index now (_NONE for none)
        self.since = array("q")  # ... and the generation it came in
        self.gen = 0
        self._previous: bytes | None = None
        self._zeros: set[bytes] = set()

    def feed(self, hashes: bytes, geometry: Geometry) -> list[Span]:
        gen, n = self.gen, len(hashes) // HASH_SIZE
        self._zeros.update((zero_hash(geometry.chunk_size), zero_hash(geometry.length(max(n - 1, 0)))))
        have = len(self.current) // HASH_SIZE
        if n > have:
            self.current.extend(_NONE * (n - have))
            self.since.extend([gen] * (n - have))
        total = max(n, have)
        previous = self._previous if self._previous is not None and len(self._previous) == len(hashes) else None
        ended: list[Span] = []
        for a in range(0, total, _BLOCK):
            b = min(a + _BLOCK, total)
            lo, hi = a * HASH_SIZE, b * HASH_SIZE
            if previous is not None and b <= n and previous[lo:hi] == hashes[lo:hi]:
                continue  # the entries of this block are what the previous generation left
            for i in range(a, b):
                at = i * HASH_SIZE
                h = hashes[at : at + HASH_SIZE] if i < n else _NONE
                if h in self._zeros:
                    h = _NONE
                was = bytes(self.current[at : at + HASH_SIZE])
                if h != was:
                    if was != _NONE:
                        ended.append((i, self.since[i], gen, was))
                    self.current[at : at + HASH_SIZE] = h
                    self.since[i] = gen
        self._previous = hashes
        self.gen += 1
        return ended

    def entries(self) -> Iterable[tuple[int, bytes, int]]:
        """(chunk index, hash, since) of every entry now."""
        for i in range(len(self.current) // HASH_SIZE):
            h = bytes(self.current[i * HASH_SIZE : (i + 1) * HASH_SIZE])
            if h != _NONE:
                yield i, h, self.since[i]


def rebuild(db: sqlite3.Connection, manifest_of: ManifestOf, *, heads_from_points: bool) -> list[str]:
    """Give every disk's points their generations (in the order they have: their recorded generation, then the time
    they closed), write the retired entries their manifests imply and the head entries' generations, and count every
    chunk's references again. With ``heads_from_points`` the heads are made from each disk's newest point (the index
    was lost: the replica is what that point holds); otherwise the heads in the index are kept. Runs inside the
    caller's transaction. Returns what could not be read (a point whose manifest is unreadable keeps no chunk)."""
    problems: list[str] = []
    disks = db.execute("SELECT disk_key, size, chunk_size FROM disks ORDER BY disk_key").fetchall()
    for disk_key, size, chunk_size in disks:
        spans = Spans()
        rows = db.execute(
            "SELECT host_id, point_id, disk, size, chunk_size, manifest FROM point_disks WHERE disk_key = ? "
            "ORDER BY gen, closed, point_id",
            (disk_key,),
        ).fetchall()
        newest: tuple[bytes, Geometry] = (b"", Geometry(size, chunk_size))
        for gen, (host_id, point_id, disk, p_size, p_chunk_size, manifest) in enumerate(rows):
            geometry = Geometry(p_size, p_chunk_size)
            hashes = manifest_of(manifest, geometry)
            if hashes is None:
                problems.append(f"point {point_id} of {host_id}, {disk}: manifest {manifest[:16]}... is damaged")
                hashes, geometry = newest  # as if nothing changed: what the points around it hold is kept
            newest = (hashes, geometry)
            db.execute(
                "UPDATE point_disks SET gen = ? WHERE host_id = ? AND point_id = ? AND disk = ?",
                (gen, host_id, point_id, disk),
            )
            _retire(db, disk_key, spans.feed(hashes, geometry))
        if heads_from_points:
            db.execute("DELETE FROM heads WHERE disk_key = ?", (disk_key,))
            _retire(db, disk_key, spans.feed(*newest))
            db.executemany(
                "INSERT INTO heads (disk_key, idx, hash, since) VALUES (?, ?, ?, ?)",
                [(disk_key, i, h, since) for i, h, since in spans.entries()],
            )
        else:
            g = Geometry(size, chunk_size)
            head = bytearray(zero_hash(g.chunk_size) * g.count)
            if g.count and g.length(g.count - 1) != g.chunk_size:
                head[-HASH_SIZE:] = zero_hash(g.length(g.count - 1))
            for idx, digest in db.execute("SELECT idx, hash FROM heads WHERE disk_key = ?", (disk_key,)):
                if idx < g.count:
                    head[idx * HASH_SIZE : (idx + 1) * HASH_SIZE] = digest
            _retire(db, disk_key, spans.feed(bytes(head), g))
            db.executemany(
                "UPDATE heads SET since = ? WHERE disk_key = ? AND idx = ?",
                [(since, disk_key, i) for i, _, since in spans.entries() if since],  # 0 is every row's default
            )
        db.execute("UPDATE disks SET gen = ? WHERE disk_key = ?", (len(rows), disk_key))
    recount(db)
    return problems


def _retire(db: sqlite3.Connection, disk_key: int, spans: list[Span]) -> None:
    if spans:
        db.executemany(
            "INSERT INTO retired (disk_key, until, idx, since, hash) VALUES (?, ?, ?, ?, ?)",
            [(disk_key, until, idx, since, h) for idx, since, until, h in spans],
        )


_COUNT = """
CREATE TEMP TABLE IF NOT EXISTS counted (hash BLOB PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
DELETE FROM counted;
INSERT INTO counted SELECT hash, COUNT(*) FROM (SELECT hash FROM heads UNION ALL SELECT hash FROM retired) GROUP BY hash
"""
_COUNTED = "COALESCE((SELECT n FROM counted WHERE counted.hash = chunks.hash), 0)"


def recount(db: sqlite3.Connection) -> int:
    """Every chunk's references counted again from the rows that hold them; returns how many counts were wrong."""
    _counted(db)
    wrong = int(db.execute(f"SELECT COUNT(*) FROM chunks WHERE refs != {_COUNTED}").fetchone()[0])  # noqa: S608
    if wrong:
        db.execute(f"UPDATE chunks SET refs = {_COUNTED} WHERE refs != {_COUNTED}")  # noqa: S608
    db.execute("DELETE FROM counted")
    return wrong


def check(db: sqlite3.Connection) -> tuple[int, int]:
    """(chunks whose count is wrong, referenced hashes the store does not hold), changing nothing."""
    _counted(db)
    wrong = int(db.execute(f"SELECT COUNT(*) FROM chunks WHERE refs != {_COUNTED}").fetchone()[0])  # noqa: S608
    missing = int(
        db.execute(
            "SELECT COUNT(*) FROM counted WHERE NOT EXISTS (SELECT 1 FROM chunks WHERE chunks.hash = counted.hash)"
        ).fetchone()[0]
    )
    db.execute("DELETE FROM counted")
    return wrong, missing


def _counted(db: sqlite3.Connection) -> None:
    for statement in _COUNT.split(";"):
        if statement.strip():
            db.execute(statement)
