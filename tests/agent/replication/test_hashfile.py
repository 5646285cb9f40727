"""agent/replication/hashfile.py: the per-disk file of chunk hashes (what the replica holds once the frames in flight
are acknowledged) and the root hash of a point computed from it, as the process server computes it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.replication.chunks import Geometry, RootHasher, chunk_hash, zero_hash
from agent.replication.hashfile import _STEP, HashFile
from agent.shared.replication_wire import HASH_SIZE

CHUNK = 65536


def root_of(geometry: Geometry, hashes: bytes) -> str:
    r = RootHasher(geometry)
    r.update(hashes)
    return r.hexdigest()


def test_a_new_file_holds_the_hashes_of_an_empty_replica_the_short_last_chunk_included(tmp_path: Path) -> None:
    g = Geometry(3 * CHUNK + 4096, CHUNK)
    f = HashFile(tmp_path / "disk" / "hashes", g)
    assert f.read(0, 4) == zero_hash(CHUNK) * 3 + zero_hash(4096)
    assert os.stat(f.path).st_size == 4 * HASH_SIZE and os.stat(f.path).st_mode & 0o777 == 0o600
    assert f.root() == root_of(g, zero_hash(CHUNK) * 3 + zero_hash(4096))


def test_written_hashes_are_read_back_kept_across_opening_and_make_the_root(tmp_path: Path) -> None:
    g = Geometry(4 * CHUNK, CHUNK)
    f = HashFile(tmp_path / "hashes", g)
    written = chunk_hash(b"a" * CHUNK) + chunk_hash(b"b" * CHUNK)
    f.write(1, written)
    assert f.read(1, 2) == written
    expected = zero_hash(CHUNK) + written + zero_hash(CHUNK)
    assert f.root() == root_of(g, expected)
    f.close()
    again = HashFile(tmp_path / "hashes", g)  # the same geometry: what was written stays
    assert again.read(0, 4) == expected
    again.close()


def test_a_file_of_another_geometry_is_reset_not_trusted(tmp_path: Path) -> None:
    f = HashFile(tmp_path / "hashes", Geometry(2 * CHUNK, CHUNK))
    f.write(0, chunk_hash(b"x") * 2)
    f.close()
    grown = HashFile(tmp_path / "hashes", Geometry(3 * CHUNK, CHUNK))  # the disk was resized
    assert grown.read(0, 3) == zero_hash(CHUNK) * 3


def test_the_root_over_more_hashes_than_one_read_takes_is_the_root_of_them_all(tmp_path: Path) -> None:
    count = _STEP + 3
    g = Geometry(count * 4096, 4096)
    f = HashFile(tmp_path / "hashes", g)
    f.write(_STEP + 1, chunk_hash(b"late"))
    expected = zero_hash(4096) * (_STEP + 1) + chunk_hash(b"late") + zero_hash(4096)
    assert f.root() == root_of(g, expected)


def test_a_read_past_the_end_is_an_error_not_short_data(tmp_path: Path) -> None:
    f = HashFile(tmp_path / "hashes", Geometry(2 * CHUNK, CHUNK))
    with pytest.raises(OSError, match="short read"):
        f.read(1, 2)
