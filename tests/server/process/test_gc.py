"""server/process/gc.py and the references the index keeps: chunks only dropped points referenced are forgotten,
mostly-dead packs rewritten, every chunk a head or a kept point references still reads back, the collection runs in
slices that let commits through, dropping a point costs what changed around it (not the store), and a kill -9 at any
step of a collection converges."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from agent import faults as faults_module
from agent.faults import set_injector
from agent.replication.chunks import Geometry, RootHasher, chunk_hash
from agent.shared.replication_wire import Codec, PointClose
from server.process import gc as gc_module
from server.process import store as store_module
from server.process.gc import Collector, collect, gaps
from server.process.store import ChunkPut, ChunkStore, PointPut
from tests import faults
from tests.conftest import REPO
from tests.server.process.stores import Source, check_store

HOST = "11111111-1111-4111-8111-111111111111"
HOSTS = [str(uuid.UUID(int=n + 1, version=4)) for n in range(3)]
CHUNK = 64 * 1024
SMALL = 4096


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
    reopened.close()


def broken_off_after(slices: int) -> Callable[[], bool]:
    """A collection's ``stopping``: true once it was asked ``slices`` times (the server stopping midway)."""
    asked = iter(range(slices))
    return lambda: next(asked, None) is None


def test_the_counts_follow_every_change_and_a_collection_keeps_exactly_what_is_referenced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Property test (seeded): machines write, zero and rewrite chunks from a shared pool (the same data on several
    disks, data that comes back after nothing referenced it), cut points, resize a disk, drop points by retention,
    and collect, whole or broken off after a few slices. After every step the index's counts are exact, every kept
    point verifies and every head reads; after a whole collection a chunk is counted exactly when a head or a kept
    point references it (found by reading every manifest), and packs were rewritten."""
    monkeypatch.setattr(store_module, "PACK_MAX", 16 * SMALL)
    monkeypatch.setattr(gc_module, "SLICE_ROWS", (3, 3, 3))
    rng = random.Random(20)  # noqa: S311 - reproducible test data, not secrets
    store = ChunkStore(tmp_path / "process", writer=True, reserve=0)
    source = Source(store, rng)
    for n, host in enumerate(HOSTS):
        for disk in ("/dev/sdb", "/dev/sdc")[: 1 + n % 2]:
            source.open(host, disk, 12)
    created, rewritten = 0.0, 0
    for _ in range(120):
        what = rng.choice(("churn", "churn", "point", "point", "prune", "collect", "broken", "resize"))
        if what == "churn":
            source.churn(rng.randint(1, 12))
        elif what == "point":
            created += 1
            source.point(rng.choice(HOSTS), created)
        elif what == "prune":
            store.prune(rng.choice(HOSTS), rng.randint(1, 3))
        elif what == "resize":
            host, disk = rng.choice(sorted(source.disks))
            source.open(host, disk, rng.choice((10, 12, 14)))
        elif what == "broken":
            collector = Collector(store, stopping=broken_off_after(rng.randint(1, 6)), pause=lambda _: None)
            collector.run()
            collector.close()
        else:
            rewritten += collect(store).packs_rewritten
        check_store(store, swept=what == "collect")
    assert rewritten > 0
    for host in HOSTS:
        store.prune(host, 1)
    collect(store)
    check_store(store, swept=True)
    store.close()


def test_dropping_a_point_costs_what_changed_around_it_not_the_size_of_the_store(tmp_path: Path) -> None:
    """Retention and its collection for a point whose successor changed 40 chunks do the same work on a disk of
    2,000 chunks as on one of 20,000 (counted in SQLite's virtual-machine steps, not in time): the store is never
    walked whole. The collection before it read every manifest and every head."""

    def steps(count: int) -> tuple[int, int]:
        store = ChunkStore(tmp_path / f"store-{count}", writer=True, reserve=0)
        row, _ = store.open_disk(HOST, "/dev/sdb", count * SMALL, SMALL)
        seq = 0

        def write(indexes: range | list[int], salt: bytes) -> None:
            nonlocal seq
            items: list[ChunkPut | PointPut] = []
            for i in indexes:
                seq += 1
                data = salt + i.to_bytes(8, "big") + bytes(SMALL - 8 - len(salt))
                items.append(ChunkPut(row.disk_key, i, chunk_hash(data), Codec.RAW, SMALL, data, seq))
            store.commit(items)

        def point(n: int) -> None:
            nonlocal seq
            seq += 1
            r = RootHasher(row.geometry)
            r.update(bytes(store.head(row)))
            close = PointClose(str(uuid.uuid4()), float(n), r.hexdigest(), "crash-consistent", ("/dev/sdb",))
            assert store.commit([PointPut(row.disk_key, close, seq)]) == [None]

        write(range(count), b"a")
        point(1)
        write(list(range(0, 2000, 50)), b"b")
        point(2)
        counter = [0]

        def tick() -> int:
            counter[0] += 1
            return 0

        for db in (store.db, store.reader_db):
            db.set_progress_handler(tick, 100)
        assert store.prune(HOST, 1) == 1
        done = Collector(store, pause=lambda _: None).run(compact=False)
        for db in (store.db, store.reader_db):
            db.set_progress_handler(None, 0)
        assert done.retired == 40 and done.manifests == 1
        check_store(store, swept=True)
        store.close()
        return counter[0], count

    small, _ = steps(2_000)
    large, _ = steps(20_000)
    assert large < 2 * small, (small, large)


def test_a_collection_lets_commits_through_between_its_slices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The collection holds the write lock one small transaction at a time: between two slices another thread's
    group commit goes through at once. (It held the lock for its whole run, on the committer's own thread.)"""
    monkeypatch.setattr(store_module, "PACK_MAX", 32 * SMALL)
    monkeypatch.setattr(gc_module, "SLICE_ROWS", (50, 50, 50))
    store = ChunkStore(tmp_path / "process", writer=True, reserve=0)
    row, _ = store.open_disk(HOST, "/dev/sdb", 1000 * SMALL, SMALL)
    other, _ = store.open_disk(HOSTS[1], "/dev/sdb", 64 * SMALL, SMALL)
    seq = 0
    for n, salt in enumerate((b"a", b"b")):
        items: list[ChunkPut | PointPut] = []
        for i in range(1000):
            seq += 1
            data = salt + i.to_bytes(8, "big") + bytes(SMALL - 9)
            items.append(ChunkPut(row.disk_key, i, chunk_hash(data), Codec.RAW, SMALL, data, seq))
        store.commit(items)
        seq += 1
        r = RootHasher(row.geometry)
        r.update(bytes(store.head(row)))
        close = PointClose(str(uuid.uuid4()), float(n), r.hexdigest(), "crash-consistent", ("/dev/sdb",))
        assert store.commit([PointPut(row.disk_key, close, seq)]) == [None]
    assert store.prune(HOST, 1) == 1
    committed: list[int] = []

    def between(_: float) -> None:
        n = len(committed) + 1
        data = n.to_bytes(8, "big") + bytes(SMALL - 8)
        item = ChunkPut(other.disk_key, n % 64, chunk_hash(data), Codec.RAW, SMALL, data, n)
        t = threading.Thread(target=lambda: committed.append(n) if store.commit([item]) == [None] else None)
        t.start()
        t.join(10)
        assert committed and committed[-1] == n, "a commit waited for the collection"

    collector = Collector(store, pause=between)
    done = collector.run()
    collector.close()
    assert done.retired == 1000 and done.packs_rewritten > 0 and collector.slices > 20
    assert len(committed) == collector.slices
    check_store(store, swept=True)
    store.close()


def test_gaps_between_kept_generations() -> None:
    assert gaps([0, 1], [2, 5], 7) == [(-1, 2)]
    assert gaps([3, 4], [2, 5], 7) == [(2, 5)]
    assert gaps([6], [2, 5], 7) == [(5, 7)]
    assert gaps([0, 3, 6], [], 7) == [(-1, 7)]


# kill -9 at every step of a collection -------------------------------------------------------------------------

CHILD = """
import sys
from server.process import gc, store as store_module
from server.process.store import ChunkStore
store_module.PACK_MAX = int(sys.argv[2])
gc.SLICE_ROWS = (4, 4, 4)
store = ChunkStore(__import__("pathlib").Path(sys.argv[1]), writer=True, reserve=0)
for host in sys.argv[3:]:
    store.prune(host, 1)
gc.collect(store)
store.close()
print("done")
"""


def test_kill_9_at_any_step_of_retention_and_collection_converges_and_drops_nothing_referenced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store with three machines' points and churn; a process applies retention and collects it, and is killed
    (SIGKILL, through the suite's fault points) at the 1st, 2nd, ... fault point it reaches: a point's records
    removed, a sweep's slice, the manifests, copies flushed, rows moved, unreferenced rows dropped, a pack removed.
    After every kill the store reopens with exact counts, every kept point verifies and every head reads; a new
    collection then finishes and leaves exactly what is referenced."""
    pack_max = 12 * SMALL
    monkeypatch.setattr(store_module, "PACK_MAX", pack_max)
    rng = random.Random(9)  # noqa: S311 - reproducible test data, not secrets
    pristine = tmp_path / "pristine"
    store = ChunkStore(pristine, writer=True, reserve=0)
    source = Source(store, rng)
    for host in HOSTS:
        source.open(host, "/dev/sdb", 16)
    for n in range(4):
        source.churn(30)
        for host in HOSTS:
            source.point(host, float(n))
    heads = {(r.host_id, r.disk): bytes(store.head(r)) for r in store.disks()}
    kept = {host: [p.point_id for p in store.points(host)][-1:] for host in HOSTS}
    store.close()
    # The fault points a whole run reaches, in order (the same run in this process, on a copy).
    reached: list[tuple[str, object]] = []
    monkeypatch.setattr(gc_module, "SLICE_ROWS", (4, 4, 4))
    shutil.copytree(pristine, tmp_path / "dry")
    suite_injector = list(faults_module._installed)
    set_injector(lambda name, context: reached.append((name, context.get("step"))))
    try:
        dry = ChunkStore(tmp_path / "dry", writer=True, reserve=0)
        for host in HOSTS:
            dry.prune(host, 1)
        collect(dry)
        dry.close()
    finally:
        faults_module._installed[:] = suite_injector
    steps = {step for _, step in reached}
    assert steps >= {"unrecorded", "swept", "manifests", "copied", "moved", "dropped", "removed"}, steps
    args = [sys.executable, "-c", CHILD, "", str(pack_max), *HOSTS]
    for n in range(1, len(reached) + 2):
        work = tmp_path / f"kill-{n}"
        shutil.copytree(pristine, work)
        args[3] = str(work)
        if n <= len(reached):
            name = reached[n - 1][0]
            env = faults.environment(kill={name: sum(1 for x, _ in reached[:n] if x == name)})
        else:
            env = faults.environment()
        r = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == (-9 if n <= len(reached) else 0), r.stderr
        reopened = ChunkStore(work, writer=True, reserve=0)
        try:
            check_store(reopened, swept=False)
            assert {(r.host_id, r.disk): bytes(reopened.head(r)) for r in reopened.disks()} == heads
            for host in HOSTS:
                assert [p.point_id for p in reopened.points(host)][-1:] == kept[host]
                reopened.prune(host, 1)
            collect(reopened)
            check_store(reopened, swept=True)
            assert {h: [p.point_id for p in reopened.points(h)] for h in HOSTS} == kept
            named = {int(p) for (p,) in reopened.db.execute("SELECT DISTINCT pack FROM chunks")}
            on_disk = {int(p.stem) for p in reopened.packs_dir.glob("*.pack")}
            assert on_disk - named <= {reopened.pack_id}, "a pack no row names was left"
        finally:
            reopened.close()
        shutil.rmtree(work)


def test_the_maintenance_thread_applies_retention_and_collects_once_points_are_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The committer only tells the maintenance thread that a machine closed a point; the thread looks up the
    retention, drops the points past it and collects. A retention look-up that fails (the database away) is logged
    and tried again at the next point, and the thread stops when asked."""
    import time

    from server.process.maintenance import Maintenance

    monkeypatch.setattr(store_module, "PACK_MAX", 8 * SMALL)
    store = ChunkStore(tmp_path / "process", writer=True, reserve=0)
    source = Source(store, random.Random(3))  # noqa: S311 - reproducible test data, not secrets
    source.open(HOST, "/dev/sdb", 8)
    for n in range(5):
        source.churn(8)
        source.point(HOST, float(n))
    answers: list[int | Exception] = [RuntimeError("the database is away"), 2]

    def retention(host: str) -> int | None:
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    maintenance = Maintenance(store, retention, compact_every=0.0)
    maintenance.start()
    try:
        maintenance.point_closed(HOST)
        deadline = time.monotonic() + 30
        while maintenance.last_error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert isinstance(maintenance.last_error, RuntimeError) and len(store.points(HOST)) == 5
        maintenance.point_closed(HOST)
        while time.monotonic() < deadline and (
            len(store.points(HOST)) != 2 or store.reader_db.execute("SELECT 1 FROM sweeps").fetchone()
        ):
            time.sleep(0.05)
        assert len(store.points(HOST)) == 2
    finally:
        maintenance.stop()
    assert not maintenance.is_alive()
    check_store(store, swept=True)
    store.close()


def test_a_store_of_index_version_2_is_migrated_with_its_references_counted_and_a_record_for_every_point(
    tmp_path: Path,
) -> None:
    """The index of a store written before references were counted (version 2: no counts, no generations, no
    records): it opens with every count computed from the manifests and the heads, exact at once, and a record for
    every point; collection then keeps exactly what is referenced as the machines go on."""
    import sqlite3

    from server.process import records
    from server.process.store import MIGRATIONS

    root = tmp_path / "process"
    store = ChunkStore(root, writer=True, reserve=0)
    source = Source(store, random.Random(12))  # noqa: S311 - reproducible test data, not secrets
    for n, host in enumerate(HOSTS):
        for disk in ("/dev/sdb", "/dev/sdc")[: 1 + n % 2]:
            source.open(host, disk, 12)
    for n in range(4):
        source.churn(25)
        for host in HOSTS:
            source.point(host, float(n))
    source.churn(10)  # heads that no point saw yet
    store.close()
    old = tmp_path / "v2.db"
    db = sqlite3.connect(old, isolation_level=None)
    db.executescript(MIGRATIONS[0])
    for statement in store_module.statements(MIGRATIONS[1]):
        db.execute(statement)
    db.execute("PRAGMA user_version = 2")
    db.execute("ATTACH DATABASE ? AS v3", (str(root / "index.db"),))
    for table, columns in (
        ("chunks", "hash, pack, offset, stored, raw, codec"),
        ("disks", "disk_key, host_id, disk, size, chunk_size, acked_seq, updated"),
        ("heads", "disk_key, idx, hash"),
        ("points", "host_id, point_id, created, consistency, disks, freeze_ms"),
        ("point_disks", "host_id, point_id, disk, size, chunk_size, root, manifest, closed, consistency"),
    ):
        db.execute(f"INSERT INTO main.{table} ({columns}) SELECT {columns} FROM v3.{table}")  # noqa: S608
    db.execute("DETACH DATABASE v3")
    db.close()
    for leftover in root.glob("index.db*"):
        leftover.unlink()
    old.rename(root / "index.db")
    shutil.rmtree(root / "points")
    store = ChunkStore(root, writer=True, reserve=0)
    source.store = store
    check_store(store, swept=True)
    found = [r for _, r in records.scan(store.points_dir)]
    kept = {(r.host_id, r.point_id, r.disk) for r in found if isinstance(r, records.PointRecord)}
    listed = set(store.db.execute("SELECT host_id, point_id, disk FROM point_disks").fetchall())
    assert kept == listed and len(found) == len(listed) == 4 * 4  # four disks, four points each
    for n in range(4, 7):
        source.churn(25)
        for host in HOSTS:
            source.point(host, float(n))
    for host in HOSTS:
        store.prune(host, 2)
    collect(store)
    check_store(store, swept=True)
    store.close()


def test_retention_comes_from_the_servers_database_and_the_maintenance_thread_applies_it(
    tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process server's wiring on both engines: the retention the maintenance thread applies is the machine's
    policy in the server's database (`Protections.retention`), and a machine without protection keeps its points."""
    import time

    from agent.shared.replication_wire import Policy
    from server.database.connection import parse_database
    from server.database.storage import Storage
    from server.process.maintenance import Maintenance
    from server.process.service import Protections
    from tests.server.database.test_storage import new_machine, public_pem

    storage = Storage.open(parse_database(database), create=True)
    try:
        storage.enrol_machine(new_machine(HOSTS[0]), 0.0)
        storage.enrol_machine(new_machine(HOSTS[1], hostname="db1", public_key=public_pem()), 0.0)
        storage.set_policy(Policy("two", 60.0, 120.0, 0, 2))
        storage.protect(HOSTS[0], ["/dev/sdb"], False, "two", False, 10.0)
    finally:
        storage.close()
    monkeypatch.setattr(store_module, "PACK_MAX", 8 * SMALL)
    store = ChunkStore(tmp_path / "process", writer=True, reserve=0)
    source = Source(store, random.Random(4))  # noqa: S311 - reproducible test data, not secrets
    for host in HOSTS[:2]:
        source.open(host, "/dev/sdb", 8)
    for n in range(4):
        source.churn(8)
        for host in HOSTS[:2]:
            source.point(host, float(n))
    protections = Protections(parse_database(database))
    maintenance = Maintenance(store, protections.retention, compact_every=0.0)
    maintenance.start()
    try:
        for host in HOSTS[:2]:
            maintenance.point_closed(host)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            len(store.points(HOSTS[0])) != 2 or store.reader_db.execute("SELECT 1 FROM sweeps").fetchone()
        ):
            time.sleep(0.05)
        assert [p.created for p in store.points(HOSTS[0])] == [2.0, 3.0]
        assert len(store.points(HOSTS[1])) == 4 and maintenance.last_error is None
    finally:
        maintenance.stop()
        protections.close()
    check_store(store, swept=True)
    store.close()
