"""server/process/gc.py: chunks only dropped points referenced are forgotten, mostly-dead packs rewritten, and
every chunk a head or a kept point references still reads back."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from agent.replication.chunks import Geometry, RootHasher, chunk_hash
from agent.shared.replication_wire import Codec, PointClose
from server.process import store as store_module
from server.process.gc import collect
from server.process.store import ChunkPut, ChunkStore, PointPut

HOST = "11111111-1111-4111-8111-111111111111"
CHUNK = 64 * 1024


def test_retention_then_collection_reclaims_space_and_keeps_what_is_referenced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "PACK_MAX", 4 * CHUNK)  # small packs: several get rewritten or removed
    store = ChunkStore(tmp_path / "process", writer=True, reserve=0)
    row, _ = store.open_disk(HOST, "/dev/sdb", 2 * CHUNK, CHUNK)
    seq = 0
    kept: list[tuple[str, list[bytes]]] = []
    for n in range(6):
        disk = [os.urandom(CHUNK), os.urandom(CHUNK)]
        root = RootHasher(Geometry(2 * CHUNK, CHUNK))
        root.update(b"".join(chunk_hash(d) for d in disk))
        point_id = str(uuid.uuid4())
        items: list[ChunkPut | PointPut] = []
        for i, d in enumerate(disk):
            seq += 1
            items.append(ChunkPut(row.disk_key, i, chunk_hash(d), Codec.RAW, CHUNK, d, seq))
        seq += 1
        items.append(
            PointPut(
                row.disk_key, PointClose(point_id, float(n), root.hexdigest(), "crash-consistent", ("/dev/sdb",)), seq
            )
        )
        assert store.commit(items) == [None] * 3
        kept.append((point_id, disk))
    before = sum(p.stat().st_size for p in store.packs_dir.glob("*.pack"))
    assert store.prune(HOST, 2) == 4
    result = collect(store)
    after = sum(p.stat().st_size for p in store.packs_dir.glob("*.pack"))
    assert result.chunks == 8 and result.packs_rewritten >= 1
    assert after < before / 2
    for point_id, disk in kept[-2:]:
        point = store.resolve_point(HOST, point_id)
        manifest = store.manifest(point.disks[0])
        assert [store.read(manifest[i * 32 : (i + 1) * 32], CHUNK) for i in range(2)] == disk
    store.close()
    reopened = ChunkStore(tmp_path / "process", writer=True, reserve=0)  # nothing dangling after a restart
    point = reopened.resolve_point(HOST, "latest")
    assert point.point_id == kept[-1][0]
    assert reopened.read(reopened.manifest(point.disks[0])[:32], CHUNK) == kept[-1][1][0]
