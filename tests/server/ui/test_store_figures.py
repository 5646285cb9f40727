"""What the dashboard reads of the chunk store (server/process/store.py): each machine's newest point in one pass,
a machine's newest points, and the store's footprint from its files' sizes."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from server.process.store import ChunkStore, PointPut
from tests.server.process.test_store import CHUNK, HOST, close, put, root_of

OTHER = "22222222-2222-4222-8222-222222222222"


def test_newest_points_recent_points_and_footprint(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "process", writer=True, reserve=0)
    try:
        assert store.newest_points() == {} and store.recent_points(HOST, 5) == []
        empty = store.footprint()[0]
        ids: dict[str, list[str]] = {HOST: [], OTHER: []}
        seq = 0
        for host, times in ((HOST, (10.0, 30.0, 20.0)), (OTHER, (5.0,))):
            row, _ = store.open_disk(host, "/dev/sdb", CHUNK, CHUNK)
            data = os.urandom(CHUNK)
            seq += 1
            store.commit([put(row.disk_key, 0, data, seq)])
            for t in times:
                point_id = str(uuid.uuid4())
                ids[host].append(point_id)
                seq += 1
                store.commit([PointPut(row.disk_key, close(point_id, root_of([data], CHUNK), created=t), seq)])
        assert store.newest_points() == {HOST: 30.0, OTHER: 5.0}
        newest = store.recent_points(HOST, 2)
        assert [p.created for p in newest] == [30.0, 20.0] and all(p.complete for p in newest)
        used, free, size = store.footprint()
        assert used >= empty + 2 * CHUNK and 0 < free <= size
    finally:
        store.close()
