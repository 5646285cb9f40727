"""bench/store: the process server's ingest latency while its chunk store collects.

A store is filled through its own group commit (``ChunkStore.commit``, as the committer calls it; no network) to
--chunks chunks: --disks disks of 4 KiB chunks written whole (small zstd records, so that ten million chunks fit in
about a gigabyte of packs), a point of each, then --rewrite of each disk's chunks written again and a second point.
Then, while a load of --rate frames a second arrives (64 KiB chunks, on a disk of another machine; compressible, so that
a long run does not fill the disk), a committer thread commits whatever arrived since its last commit as one batch, as
the process server's committer does, and each frame's latency is from when it was due to the end of the commit that made
it durable (its acknowledgement waits for exactly that). After --settle seconds of that load alone, retention keeps the
newest point of each disk and a collection runs in its own thread (the maintenance thread's work: it forgets the chunks
only the dropped points held and rewrites the packs they fill), until it is done.

Printed: how long the store took to open (a server's start), latency p50/p99/max before and during the collection, the
collection's duration and what it did, and the load average over the run (the machine is shared: other jobs run beside
it). The same script runs against the code before collection left the ingest path (that `collect` held the store's
write lock, on the committer's thread, for its whole run) for the figure before:

    .venv/bin/python bench/store.py [--chunks 10000000] [--disks 6] [--rewrite 0.6] [--rate 320] [--filled DIR]
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.replication.chunks import RootHasher, chunk_hash  # noqa: E402
from agent.shared.replication_wire import Codec, PointClose  # noqa: E402
from server.process import gc  # noqa: E402
from server.process.store import ChunkPut, ChunkStore, DiskRow, PointPut  # noqa: E402

SMALL = 4096
LOAD_CHUNK = 64 * 1024
FILL_BATCH = 8192
MAX_PENDING = 4096  # frames of 64 KiB waiting for the committer: 256 MiB, what the receiver lets all streams hold


class Filler:
    def __init__(self, store: ChunkStore) -> None:
        self.store = store
        self.cctx = zstandard.ZstdCompressor(level=1)
        self.serial = 0
        self.seqs: dict[int, int] = {}

    def seq(self, row: DiskRow) -> int:
        self.seqs[row.disk_key] = self.seqs.get(row.disk_key, row.acked_seq) + 1
        return self.seqs[row.disk_key]

    def write(self, row: DiskRow, indexes: list[int]) -> None:
        for i in range(0, len(indexes), FILL_BATCH):
            items: list[ChunkPut | PointPut] = []
            for idx in indexes[i : i + FILL_BATCH]:
                self.serial += 1
                data = self.serial.to_bytes(8, "big") + bytes(SMALL - 8)  # unique, and small once compressed
                packed = self.cctx.compress(data)
                items.append(ChunkPut(row.disk_key, idx, chunk_hash(data), Codec.ZSTD, SMALL, packed, self.seq(row)))
            outcomes = self.store.commit(items)
            assert not any(outcomes), outcomes[:3]

    def point(self, row: DiskRow, created: float) -> None:
        root = RootHasher(row.geometry)
        root.update(bytes(self.store.head(row)))
        close = PointClose(str(uuid.uuid4()), created, root.hexdigest(), "crash-consistent", (row.disk,))
        outcomes = self.store.commit([PointPut(row.disk_key, close, self.seq(row))])
        assert outcomes == [None], outcomes


def fill(store: ChunkStore, total: int, disks: int, rewrite: float) -> list[str]:
    per_disk = int(total / (1 + rewrite) / disks)
    filler = Filler(store)
    hosts = [str(uuid.UUID(int=n + 1, version=4)) for n in range(disks)]
    rng = random.Random(1)  # noqa: S311 - benchmark data
    started = time.monotonic()
    for n, host in enumerate(hosts):
        row, _ = store.open_disk(host, "/dev/sdb", per_disk * SMALL, SMALL)
        filler.write(row, list(range(per_disk)))
        filler.point(row, 1000.0)
        again = rng.sample(range(per_disk), int(per_disk * rewrite))
        again.sort()
        filler.write(row, again)
        filler.point(row, 2000.0)
        print(
            f"  disk {n + 1}/{disks}: {per_disk} chunks, {len(again)} written again, two points "
            f"({time.monotonic() - started:.0f} s)",
            flush=True,
        )
    return hosts


class Load:
    """Frames arrive at ``rate`` a second; one committer commits what arrived as a batch and notes each frame's
    latency from its arrival to the end of its commit."""

    def __init__(self, store: ChunkStore, rate: float) -> None:
        self.store = store
        self.rate = rate
        self.row, _ = store.open_disk(
            str(uuid.UUID(int=1 << 100, version=4)), "/dev/sdz", 4096 * LOAD_CHUNK, LOAD_CHUNK
        )
        self.pending: deque[tuple[float, ChunkPut]] = deque()
        self.cond = threading.Condition()
        self.latencies: list[tuple[float, float]] = []  # (arrival, latency)
        self.stopping = False
        self.seq = self.row.acked_seq
        self.cctx = zstandard.ZstdCompressor(level=1)

    def produce(self) -> None:
        """A frame is due every 1/rate seconds. Past MAX_PENDING frames waiting (the receiver's cap on bytes held
        for all streams), the next waits too, as an agent's window does; its latency still counts from when it was
        due, so a stalled committer shows in full."""
        rng = random.Random(2)  # noqa: S311 - benchmark data
        pool = [rng.randbytes(LOAD_CHUNK // 16) * 16 for _ in range(64)]  # compressible: the packs stay small
        start, n = time.monotonic(), 0
        while not self.stopping:
            n += 1
            due = start + n / self.rate
            time.sleep(max(0.0, due - time.monotonic()))
            data = bytearray(pool[n % len(pool)])
            data[:8] = n.to_bytes(8, "big")
            self.seq += 1
            packed = self.cctx.compress(bytes(data))
            item = ChunkPut(self.row.disk_key, n % 4096, chunk_hash(data), Codec.ZSTD, LOAD_CHUNK, packed, self.seq)
            with self.cond:
                while len(self.pending) >= MAX_PENDING and not self.stopping:
                    self.cond.wait()
                self.pending.append((due, item))
                self.cond.notify_all()

    def commit(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.stopping:
                    self.cond.wait()
                if self.stopping and not self.pending:
                    return
                batch = list(self.pending)
                self.pending.clear()
                self.cond.notify_all()
            outcomes = self.store.commit([item for _, item in batch])
            assert not any(outcomes), outcomes[:3]
            done = time.monotonic()
            self.latencies.extend((arrived, done - arrived) for arrived, _ in batch)


def summary(latencies: list[float]) -> str:
    if not latencies:
        return "no frames"
    ordered = sorted(latencies)

    def p(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return (
        f"{len(ordered)} frames: p50 {p(0.5):.0f} ms, p99 {p(0.99):.0f} ms, max {ordered[-1] * 1000:.0f} ms "
        f"(mean {statistics.fmean(ordered) * 1000:.0f} ms)"
    )


def main() -> None:
    faulthandler.enable()  # a fatal signal leaves the threads' stacks in the output
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=10_000_000, help="chunks in the store when it collects")
    parser.add_argument("--disks", type=int, default=6)
    parser.add_argument("--rewrite", type=float, default=0.6, help="share of each disk written again")
    parser.add_argument("--rate", type=float, default=320.0, help="frames a second (64 KiB each): 20 MB/s")
    parser.add_argument("--settle", type=float, default=20.0, help="seconds of load before the collection")
    parser.add_argument(
        "--filled",
        type=Path,
        help="keep the filled store here and start from a copy of it (filled once: later runs copy it)",
    )
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-store-", dir="/var/tmp"))
    root = base / "process"
    loads = [os.getloadavg()[0]]
    print(f"store in {root}; load average {os.getloadavg()}", flush=True)
    try:
        hosts = prepare(root, args)
        loads.append(os.getloadavg()[0])
        started = time.monotonic()
        store = ChunkStore(root, writer=True, reserve=0)  # a server's start: the packs' unindexed tails are cut
        print(f"opened the store in {time.monotonic() - started:.1f} s; load average {os.getloadavg()}", flush=True)
        run(store, hosts, args, loads)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def prepare(root: Path, args: argparse.Namespace) -> list[str]:
    """The filled store at ``root``: filled now, or copied from --filled."""
    marker = args.filled / "hosts" if args.filled else None
    if marker is not None and marker.exists():
        started = time.monotonic()
        shutil.copytree(args.filled / "process", root)
        print(f"copied the filled store from {args.filled} in {time.monotonic() - started:.0f} s", flush=True)
        return [str(h) for h in marker.read_text().split()]
    store = ChunkStore(root, writer=True, reserve=0)
    try:
        started = time.monotonic()
        hosts = fill(store, args.chunks, args.disks, args.rewrite)
        chunks = store.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        print(f"filled: {chunks} chunks in {time.monotonic() - started:.0f} s; load average {os.getloadavg()}")
    finally:
        store.close()
    if marker is not None:
        shutil.rmtree(args.filled / "process", ignore_errors=True)
        shutil.copytree(root, args.filled / "process")
        marker.write_text("\n".join(hosts) + "\n")
    return hosts


def run(store: ChunkStore, hosts: list[str], args: argparse.Namespace, loads: list[float]) -> None:
    try:
        load = Load(store, args.rate)
        threads = [threading.Thread(target=load.produce), threading.Thread(target=load.commit)]
        for t in threads:
            t.start()
        time.sleep(args.settle)
        began = time.monotonic()
        result: dict[str, object] = {}

        def collection() -> None:
            for host in hosts:
                store.prune(host, 1)
            if hasattr(gc, "Collector"):  # since collection left the ingest path
                collector = gc.Collector(store)
                done = collector.run()
                collector.close()
                result.update(vars(done))
                result.update(slices=collector.slices, longest_hold_ms=round(collector.longest * 1000))
            else:  # before: one call, under the write lock throughout
                result.update(vars(gc.collect(store)))

        collecting = threading.Thread(target=collection)
        collecting.start()
        while collecting.is_alive():
            collecting.join(60.0)
            loads.append(os.getloadavg()[0])
            so_far = [lat for at, lat in load.latencies if at >= began]
            print(f"  {time.monotonic() - began:.0f} s into the collection: {summary(so_far)}", flush=True)
        ended = time.monotonic()
        time.sleep(2.0)
        load.stopping = True
        with load.cond:
            load.cond.notify_all()
        for t in threads:
            t.join()
        before = [lat for at, lat in load.latencies if at < began]
        during = [lat for at, lat in load.latencies if began <= at < ended]
        loads.append(os.getloadavg()[0])
        print(f"collection: {ended - began:.1f} s: {result}")
        print(f"ingest latency before the collection: {summary(before)}")
        print(f"ingest latency during the collection: {summary(during)}")
        print(f"load average (1 min) over the run: min {min(loads):.2f}, max {max(loads):.2f}; now {os.getloadavg()}")
    finally:
        store.close()


if __name__ == "__main__":
    main()
