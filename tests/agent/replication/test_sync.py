"""agent/replication/sync.py and hashfile.py: runs of dirty chunks, and hash updates held while a point freezes."""

from __future__ import annotations

from pathlib import Path

from agent.replication.chunks import Geometry, RootHasher, zero_hash
from agent.replication.hashfile import HashFile
from agent.replication.stream import TokenBucket
from agent.replication.sync import DeferredHashes, _runs


def test_dirty_chunks_become_bounded_runs_with_their_oldest_change() -> None:
    taken = [(5, 3.0, 1), (3, 1.0, 2), (4, 2.0, 3), (9, 0.5, 4), (10, 0.7, 5), (11, 0.1, 6)]
    assert _runs(taken, 2) == [(3, 2, 1.0, [2, 3]), (5, 1, 3.0, [1]), (9, 2, 0.5, [4, 5]), (11, 1, 0.1, [6])]


def test_held_hashes_are_read_back_and_written_only_on_release(tmp_path: Path) -> None:
    g = Geometry(4 * 65536 + 512, 65536)
    hashes = DeferredHashes(HashFile(tmp_path / "hashes", g))
    assert hashes.read(4, 1) == zero_hash(512)
    hashes.hold()
    hashes.write(1, b"a" * 32 + b"b" * 32)
    assert hashes.read(0, 3) == zero_hash(65536) + b"a" * 32 + b"b" * 32
    assert hashes.file.read(1, 1) == zero_hash(65536)  # nothing written while held (the disk may be frozen)
    held_root = hashes.root()
    hashes.release()
    assert hashes.file.read(1, 2) == b"a" * 32 + b"b" * 32 and hashes.root() == held_root
    r = RootHasher(g)
    r.update(zero_hash(65536) + b"a" * 32 + b"b" * 32 + zero_hash(65536) + zero_hash(512))
    assert hashes.root() == r.hexdigest()


def test_the_bandwidth_cap_spreads_bytes_over_time() -> None:
    now = [0.0]
    bucket = TokenBucket(1000, clock=lambda: now[0])
    assert bucket.wait_time(1000) == 0.0
    assert bucket.wait_time(500) == 0.5
    now[0] = 2.0
    assert bucket.wait_time(500) == 0.0
    assert TokenBucket(0).wait_time(10**9) == 0.0


def test_random_data_stops_being_compressed_until_a_probe_shrinks_again() -> None:
    """A run of chunks zstd could not shrink pauses compression for that disk (in this thread); one chunk in
    PROBE_EVERY still tries, and one that shrinks turns it back on."""
    from types import SimpleNamespace

    from agent.replication import sync

    disk, other = SimpleNamespace(path=Path("/dev/a")), SimpleNamespace(path=Path("/dev/b"))

    def feed(shrinks: bool, n: int) -> list[bool]:
        tried = []
        for _ in range(n):
            worth = sync._worth_compressing(disk)  # type: ignore[arg-type]
            tried.append(worth)
            if worth:
                sync._compressed(disk, shrinks)  # type: ignore[arg-type]
        return tried

    tried = feed(False, sync.INCOMPRESSIBLE_RUN + 2 * sync.PROBE_EVERY)
    assert tried[: sync.INCOMPRESSIBLE_RUN] == [True] * sync.INCOMPRESSIBLE_RUN
    assert tried[sync.INCOMPRESSIBLE_RUN :].count(True) == 2  # the probes
    assert sync._worth_compressing(other)  # type: ignore[arg-type]  # another disk is judged on its own
    tried = feed(True, 2 * sync.PROBE_EVERY)  # compressible again: found by the next probe
    assert tried.index(True) < sync.PROBE_EVERY and all(tried[tried.index(True) :])


def test_a_chunk_is_zero_only_when_every_byte_is() -> None:
    """The zero check looks at a chunk's first bytes before it copies the chunk to compare it whole: a chunk whose
    first bytes are zero and a later one is not is not zero."""
    from agent.replication.sync import _zero

    size = 65536
    assert _zero(memoryview(bytes(size)))
    assert _zero(memoryview(bytes(size * 32)))  # larger than a read batch: compared in pieces
    assert not _zero(memoryview(b"\1" + bytes(size - 1)))
    assert not _zero(memoryview(bytes(size - 1) + b"\1"))
    assert not _zero(memoryview(bytes(100) + b"\1" + bytes(size - 101)))
    assert not _zero(memoryview(bytes(2 * 1024 * 1024) + b"\1"))
    assert _zero(memoryview(bytes(10))) and not _zero(memoryview(b"\0\0\1"))
