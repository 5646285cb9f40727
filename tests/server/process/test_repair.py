"""server/process/repair.py (`mobility-server store repair`): an index deleted or damaged is rebuilt from the packs,
manifests and point records; every point of every machine comes back and fails over to the same bytes; each disk's
replica is its newest point and its agent resyncs; what cannot be restored is said; a healthy store is left as it is;
and a server never starts an empty index over a store that holds data."""

from __future__ import annotations

import hashlib
import os
import random
import uuid
from pathlib import Path

import pytest

from agent.replication.chunks import chunk_hash
from server.cli import main
from server.datadir import DataDir
from server.errors import IndexMissing, StoreBusy
from server.process import records
from server.process import store as store_module
from server.process.failover import materialise
from server.process.gc import collect
from server.process.repair import repair
from server.process.store import ChunkStore
from tests.server.process.stores import SMALL, Source, check_store, locate

HOSTS = [str(uuid.UUID(int=n + 1, version=4)) for n in range(3)]


@pytest.fixture(autouse=True)
def small_packs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "PACK_MAX", 24 * SMALL)  # many packs


class Built:
    """A store with three machines' points (one machine with two disks), written after their last points too."""

    def __init__(self, root: Path, seed: int = 5) -> None:
        self.root = root
        store = ChunkStore(root, writer=True, reserve=0)
        self.source = Source(store, random.Random(seed))  # noqa: S311 - reproducible test data, not secrets
        for n, host in enumerate(HOSTS):
            for disk in ("/dev/sdb", "/dev/sdc")[: 1 + n % 2]:
                self.source.open(host, disk, 16)
        for n in range(5):
            self.source.churn(30)
            for host in HOSTS:
                self.source.point(host, 1000.0 + n)
        for host in HOSTS:
            store.prune(host, 3)
        collect(store)
        self.source.churn(20)  # acknowledged after the newest points: only a resync brings it back
        self.points = {host: store.points(host) for host in HOSTS}
        self.images = {
            (host, p.point_id): _images(store, p, root.parent / f"before-{p.point_id}")
            for host in HOSTS
            for p in self.points[host]
        }
        self.newest_seq = {
            (host, d.disk): int(
                store.db.execute(
                    "SELECT seq FROM point_disks WHERE host_id = ? AND point_id = ? AND disk = ?",
                    (host, self.points[host][-1].point_id, d.disk),
                ).fetchone()[0]
            )
            for host in HOSTS
            for d in self.points[host][-1].disks
        }
        store.close()

    def reopen(self) -> ChunkStore:
        store = ChunkStore(self.root, writer=True, reserve=0)
        self.source.store = store
        return store


def _images(store: ChunkStore, point: store_module.Point, out: Path) -> dict[str, bytes]:
    written = materialise(store, point, out)
    return {p.name: p.read_bytes() for p in written}


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _damage(index: Path) -> None:
    """Random bytes over every page of the index but its first."""
    rng = random.Random(7)  # noqa: S311 - reproducible test data, not secrets
    size = index.stat().st_size
    with index.open("r+b") as f:
        for at in range(4096, size, 4096):
            f.seek(at)
            f.write(rng.randbytes(4096))


@pytest.mark.parametrize("loss", ["deleted", "damaged"])
def test_an_index_lost_or_damaged_is_rebuilt_with_every_point_of_every_machine(tmp_path: Path, loss: str) -> None:
    built = Built(tmp_path / "process")
    index = built.root / "index.db"
    if loss == "deleted":
        for f in built.root.glob("index.db*"):
            f.unlink()
        with pytest.raises(IndexMissing):  # an empty index would have cut every pack to nothing
            ChunkStore(built.root, writer=True, reserve=0)
        assert all(p.stat().st_size for p in built.root.glob("packs/*.pack"))
    else:
        _damage(index)
    done = repair(built.root)
    assert done.rebuilt and not done.not_restored, done
    assert done.points == sum(len(p) for p in built.points.values()) and done.machines == len(HOSTS)
    assert (done.kept_as is not None) == (loss == "damaged")
    store = built.reopen()
    try:
        check_store(store, swept=True)
        for host in HOSTS:
            assert store.points(host) == built.points[host]
            for point in built.points[host]:
                got = _images(store, point, tmp_path / f"after-{point.point_id}")
                assert got == built.images[(host, point.point_id)], f"point {point.point_id} fails over otherwise"
        # Each replica is its newest point, marked rebuilt until its agent has its hashes; the acknowledged sequence
        # is that point's.
        for host in HOSTS:
            newest = built.points[host][-1]
            for d in newest.disks:
                row = store.disk(host, d.disk)
                assert row is not None and row.rebuilt and row.acked_seq == built.newest_seq[(host, d.disk)]
                assert bytes(store.head(row)) == store.manifest(d)
                again, known = store.open_disk(host, d.disk, d.size, d.chunk_size)
                assert not known
                store.replica_sent(again)
                assert store.open_disk(host, d.disk, d.size, d.chunk_size)[1]
        # The agents resync: what differs from the rebuilt replica travels again, and the next points match.
        source = built.source
        for (host, disk), data in sorted(source.disks.items()):
            head = store.head(store.open_disk(host, disk, len(data) * SMALL, SMALL)[0])
            for i, chunk in enumerate(data):
                if head[i * 32 : (i + 1) * 32] != chunk_hash(chunk):  # a zero chunk's hash is the zero hash
                    source.write(host, disk, i, chunk)
        for n in range(3):
            source.churn(15)
            for host in HOSTS:
                source.point(host, 2000.0 + n)
        for host in HOSTS:
            store.prune(host, 2)
        collect(store)
        check_store(store, swept=True)
    finally:
        store.close()


def test_repair_of_a_healthy_store_changes_nothing(tmp_path: Path) -> None:
    built = Built(tmp_path / "process")
    before = _files(built.root)
    done = repair(built.root)
    assert not done.rebuilt and not done.records_written and not done.counts_fixed and not done.not_restored
    assert done.points == sum(len(p) for p in built.points.values())
    assert _files(built.root) == before
    # A record a point lacks is written back from the healthy index, and nothing else changes.
    victim = next(p for p in built.root.glob("points/*/*.json"))
    kept = victim.read_bytes()
    victim.unlink()
    done = repair(built.root)
    assert not done.rebuilt and done.records_written == 1 and victim.read_bytes() == kept
    assert _files(built.root) == before


def test_what_cannot_be_restored_is_said_and_its_record_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A chunk only an old point held is damaged in its pack, another point's record is damaged, and the index is
    gone, and a record of one machine lies among another's: `store repair` restores everything else, lists those with
    why, keeps their records, and exits with PS-REPAIR-PARTIAL. A server running on the store keeps repair away
    (PS-STORE-BUSY)."""
    built = Built(tmp_path / "process")
    DataDir(tmp_path).initialised_marker.touch()
    store = ChunkStore(built.root)
    old, other = built.points[HOSTS[0]][0], built.points[HOSTS[1]][0]
    later = {
        bytes(h)
        for p in [*built.points[HOSTS[0]][1:], *built.points[HOSTS[1]], *built.points[HOSTS[2]]]
        for d in p.disks
        for h in _split(store.manifest(d))
    }
    mine = next(h for h in _split(store.manifest(old.disks[0])) if h not in later and locate(store, h))
    where = locate(store, mine)
    assert where is not None
    pack, offset, stored = where
    store.close()
    with pack.open("r+b") as f:
        f.seek(offset + stored // 2)
        byte = f.read(1)
        f.seek(offset + stored // 2)
        f.write(bytes([byte[0] ^ 0x40]))
    damaged = built.root / "points" / records.relative_path(HOSTS[1], other.point_id, other.disks[0].disk)
    damaged.write_bytes(damaged.read_bytes().replace(b'"gen"', b'"gem"'))
    # A record of one machine filed as another's (its name made for that machine) is never taken for its point.
    theirs = built.points[HOSTS[2]][-1]
    stray = built.root / "points" / records.relative_path(HOSTS[0], theirs.point_id, theirs.disks[0].disk)
    stray.write_bytes(
        (built.root / "points" / records.relative_path(HOSTS[2], theirs.point_id, theirs.disks[0].disk)).read_bytes()
    )
    for f in built.root.glob("index.db*"):
        f.unlink()
    lock = store_module.take_writer_lock(built.root)
    try:
        with pytest.raises(StoreBusy):
            repair(built.root)
    finally:
        os.close(lock)
    code = main(["store", "repair", "--data", str(tmp_path)])
    out = capsys.readouterr()
    assert code == 1 and "error PS-REPAIR-PARTIAL" in out.err, out
    assert f"NOT RESTORED: point {old.point_id} of machine {HOSTS[0]}: " in out.out
    assert "of its chunks are not in the packs" in out.out
    assert f"NOT RESTORED: record {damaged.relative_to(built.root / 'points')}" in out.out
    assert f"NOT RESTORED: record {stray.relative_to(built.root / 'points')}: filed as" in out.out
    assert damaged.exists() and stray.exists()
    store = built.reopen()
    try:
        assert [p.point_id for p in store.points(HOSTS[0])] == [p.point_id for p in built.points[HOSTS[0]][1:]]
        assert [p.point_id for p in store.points(HOSTS[1])] == [p.point_id for p in built.points[HOSTS[1]][1:]]
        assert store.points(HOSTS[2]) == built.points[HOSTS[2]]
        check_store(store, swept=True)
    finally:
        store.close()


def _split(manifest: bytes) -> list[bytes]:
    return [manifest[i : i + 32] for i in range(0, len(manifest), 32)]


CLOSING = """
import json, sys
from pathlib import Path
from agent.shared.replication_wire import Codec, PointClose
from server.process.store import ChunkPut, ChunkStore, PointPut
from agent.replication.chunks import chunk_hash
root, host, point_id, rootsum = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
store = ChunkStore(root, writer=True, reserve=0)
row, _ = store.open_disk(host, "/dev/sdb", 4 * 4096, 4096)
data = [bytes([n + 1]) * 4096 for n in range(4)]
items = [ChunkPut(row.disk_key, i, chunk_hash(d), Codec.RAW, 4096, d, i + 1) for i, d in enumerate(data)]
close = PointClose(point_id, 5.0, rootsum, "crash-consistent", ("/dev/sdb",))
store.commit([*items, PointPut(row.disk_key, close, 5)])
print("acknowledged")
"""


def test_a_server_killed_between_a_points_record_and_its_index_row_loses_nothing_and_lists_it_once(
    tmp_path: Path,
) -> None:
    """SIGKILL after a point's record is fsynced and before its group commit's index row: the point was never
    acknowledged, so it is not listed, and a repair of that healthy index changes nothing but says the record is
    there; the agent sends the frames again, the point closes once, and a rebuilt index restores it once."""
    import subprocess
    import sys

    from agent.replication.chunks import Geometry, RootHasher
    from agent.shared.replication_wire import Codec, PointClose
    from server.process.store import ChunkPut, PointPut
    from tests import faults
    from tests.conftest import REPO

    root = tmp_path / "process"
    host, point_id = HOSTS[0], str(uuid.uuid4())
    data = [bytes([n + 1]) * SMALL for n in range(4)]
    r = RootHasher(Geometry(4 * SMALL, SMALL))
    r.update(b"".join(chunk_hash(d) for d in data))
    args = [sys.executable, "-c", CLOSING, str(root), host, point_id, r.hexdigest()]
    killed = subprocess.run(
        args, env=faults.environment(kill={"store.point": 1}), cwd=REPO, capture_output=True, text=True, check=False
    )
    assert killed.returncode == -9 and "acknowledged" not in killed.stdout, killed.stderr
    record = root / "points" / records.relative_path(host, point_id, "/dev/sdb")
    assert record.exists()
    store = ChunkStore(root, writer=True, reserve=0)
    assert store.points(host) == [] and store.disk(host, "/dev/sdb").acked_seq == 0  # type: ignore[union-attr]
    store.close()
    before = _files(root)
    done = repair(root)
    assert not done.rebuilt and done.unlisted == [str(record.relative_to(root / "points"))]
    assert _files(root) == before
    store = ChunkStore(root, writer=True, reserve=0)
    row, _ = store.open_disk(host, "/dev/sdb", 4 * SMALL, SMALL)
    items = [ChunkPut(row.disk_key, i, chunk_hash(d), Codec.RAW, SMALL, d, i + 1) for i, d in enumerate(data)]
    close = PointClose(point_id, 5.0, r.hexdigest(), "crash-consistent", ("/dev/sdb",))
    assert store.commit([*items, PointPut(row.disk_key, close, 5)]) == [None] * 5  # the agent's resend
    (point,) = store.points(host)
    store.close()
    for f in root.glob("index.db*"):
        f.unlink()
    done = repair(root)
    assert done.rebuilt and done.points == 1 and not done.not_restored
    store = ChunkStore(root, writer=True, reserve=0)
    assert store.points(host) == [point]
    check_store(store, swept=True)
    store.close()
