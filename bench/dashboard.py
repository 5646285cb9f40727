"""bench/dashboard: the operator's view with a fleet of 10,000 machines (docs/monitoring.md has the figures).

    .venv/bin/python bench/dashboard.py [--machines 10000] [--seconds 60] [--refresh 10]

A real `mobility-server serve` on loopback over a SQLite database seeded with --machines machines (half of them
protected, one or two disks each, with replication reports, most heartbeating, some offline, critical or in breach;
five points each in the chunk store, made through its own API), while a writer in this process renews a third of the
reports and heartbeats every 10 s as a fleet heartbeating every 30 s would (so the dashboard's cache of parsed
reports meets real churn). Measured:

1. the machines page: its JSON (`/api/machines`, several filters and orders) as the server answers it, and the page
   as a browser shows it (Playwright driving Debian's chromium: from navigation to the table filled), target < 1 s;
2. `/metrics`: a scrape's time as Prometheus would see it (a scrape per snapshot: while it scrapes, each snapshot's
   text is written with the snapshot), the same snapshot again, gzip, and the very first scrape, target < 200 ms;
3. what live refresh costs the server: its CPU (user + system, psutil) over --seconds with the dashboard off
   (`--ui-listen none`), on with nobody looking, on with two browser tabs (overview and machines) refreshing every
   --refresh seconds, and the same with Prometheus scraping every 15 s; target: the difference < 5 % of one core.

The machine is shared with other work: the load average is printed with the figures."""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
from sqlalchemy import insert, text  # noqa: E402

from agent.replication.chunks import Geometry, RootHasher, zero_hash  # noqa: E402
from agent.shared.replication_wire import DiskReport, PointClose, ReplicationReport  # noqa: E402
from agent.shared.wire import CheckReport, HealthReport  # noqa: E402
from scripts.localserver import init_local_server, start_local_server, ui_url  # noqa: E402
from server.database.connection import database_for  # noqa: E402
from server.database.heartbeats import Beat  # noqa: E402
from server.database.schema import machines, policies, protection  # noqa: E402
from server.database.storage import Storage  # noqa: E402
from server.datadir import DataDir  # noqa: E402
from server.process.service import store_dir  # noqa: E402
from server.process.store import ChunkStore, PointPut  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
CHUNK = 64 * 1024
TAGS = ("DEBIAN12", "DEBIAN11", "UBUNTU-22.04", "UBUNTU-20.04", "RHEL9", "RHEL8", "SLES15", "OL9")
VERSIONS = ("0.1.0", "0.1.1", "0.2.0")
POINTS = 5


def health(rng: random.Random, now: float) -> str:
    status = rng.choices(("healthy", "warning", "critical"), (90, 8, 2))[0]
    checks = tuple(
        CheckReport(f"HLT-CHECK{k}", "PASS" if status == "healthy" or k else "WARN", "a message of some length " * 3,
                    "what to do about it", "12", "100")
        for k in range(12)
    )  # fmt: skip
    return json.dumps(HealthReport(status, now, checks).to_json())


def report(rng: random.Random, now: float, disks: int) -> str:
    out = []
    for d in range(disks):
        lag = rng.choice((0.0, 0.5, 2.0, 30.0, 1200.0 if rng.random() < 0.02 else 5.0))
        state = "CONTINUOUS" if lag < 600 else rng.choice(("RESYNCING", "STALLED"))
        out.append(DiskReport(f"/dev/sd{'bcd'[d]}", state, 100 << 30, 0, lag, rng.uniform(0, 5e7), None, now - 200))
    return json.dumps(ReplicationReport(tuple(out), now - 200, str(uuid.uuid4()), 5, 12.0).to_json())


def seed(data: Path, count: int) -> list[str]:
    """``count`` machines straight into the database in one transaction; half protected; points in the store."""
    rng = random.Random(7)  # noqa: S311 - a fleet to measure with, not a secret
    now = time.time()
    storage = Storage.open(database_for(DataDir(data), None), pool_size=0)
    ids = [str(uuid.uuid4()) for _ in range(count)]
    rows, prot = [], []
    for i, host_id in enumerate(ids):
        seen = now - (rng.uniform(0, 30) if rng.random() > 0.03 else rng.uniform(200, 5000))
        rows.append({"host_id": host_id, "hostname": f"host-{i:05d}.example.net", "os_tag": TAGS[i % len(TAGS)],
                     "role": "MS", "platform": "VmWare", "agent_version": rng.choice(VERSIONS),
                     "facts": "{}", "enrolled_at": now - 86400, "cert_serial": format(i + 1, "x"),
                     "cert_not_after": now + 86400 * 80, "last_seen": seen, "heartbeat_interval": 30.0,
                     "health": health(rng, seen), "machine_id": f"{i:032x}"})  # fmt: skip
        if i % 2 == 0:
            prot.append({"host_id": host_id, "disks": "/dev/sdb\n/dev/sdc" if i % 6 == 0 else "/dev/sdb",
                         "all_disks": False, "policy": "gold", "paused": False, "updated_at": now,
                         "report": report(rng, now, 2 if i % 6 == 0 else 1), "reported_at": now})  # fmt: skip
    with storage.transaction() as tx:
        tx.conn.execute(insert(policies).values(name="gold", rpo_seconds=900.0, interval_seconds=300.0,
                                                bandwidth_bps=0, retention=24))  # fmt: skip
        tx.conn.execute(insert(machines), rows)
        tx.conn.execute(insert(protection), prot)
    storage.close()
    store = ChunkStore(store_dir(DataDir(data)), writer=True, reserve=0)
    try:
        hasher = RootHasher(Geometry(CHUNK, CHUNK))
        hasher.update(zero_hash(CHUNK))
        root = hasher.hexdigest()
        items: list[Any] = []
        for p in prot:
            row, _ = store.open_disk(p["host_id"], "/dev/sdb", CHUNK, CHUNK)
            for k in range(POINTS):
                close = PointClose(
                    str(uuid.uuid4()), now - 300 * (POINTS - k), root, "crash-consistent", ("/dev/sdb",), 12.0
                )
                items.append(PointPut(row.disk_key, close, k + 1))
            if len(items) >= 5000:
                store.commit(items)
                items = []
        if items:
            store.commit(items)
    finally:
        store.close()
    return [p["host_id"] for p in prot]


class Churn:
    """A third of the fleet's heartbeats and reports renewed every 10 s (a fleet at 30 s heartbeats)."""

    def __init__(self, data: Path, protected: list[str], everyone: list[str]) -> None:
        self.storage = Storage.open(database_for(DataDir(data), None), pool_size=2)
        self.protected, self.everyone = protected, everyone
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        rng = random.Random(11)  # noqa: S311
        turn = 0
        while not self.stop.wait(10.0):
            now = time.time()
            third = self.everyone[turn % 3 :: 3]
            self.storage.record_heartbeats(Beat(h, now, "0.1.0", health(rng, now)) for h in third)
            prot = self.protected[turn % 3 :: 3]
            self.storage.record_replication((h, now, report(rng, now, 1)) for h in prot)
            turn += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        self.storage.close()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[float, bytes]:
    start = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as r:  # noqa: S310
        body = r.read()
    return time.perf_counter() - start, body


def cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def stats(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    return f"p50 {statistics.median(ms):.0f} ms, max {ms[-1]:.0f} ms (n={len(ms)})"


def scrape(base: str, stop: threading.Event) -> None:
    """Prometheus at a 15 s interval, asking for gzip."""
    while not stop.is_set():
        get(base + "/metrics", {"Accept-Encoding": "gzip"})
        stop.wait(15.0)


def server_cpu(
    data: Path, args: argparse.Namespace, ui: str, viewers: int, scraper: bool = False
) -> tuple[float, float]:
    """(cores used by the server over --seconds, the newest snapshot's build seconds)."""
    proc, _, _ = start_local_server(data, "--ui-listen", ui, "--ui-refresh", str(args.refresh))
    browser_stop = threading.Event()
    try:
        base = ui_url(data) if ui != "none" else None
        if base:
            get(base + "/api/overview")  # the first snapshot is read
        time.sleep(args.refresh)
        viewer = None
        if viewers and base:
            viewer = threading.Thread(target=browse, args=(base, browser_stop), daemon=True)
            viewer.start()
            time.sleep(5)
        if scraper and base:
            threading.Thread(target=scrape, args=(base, browser_stop), daemon=True).start()
            time.sleep(args.refresh)
        before, start = cpu(proc.pid), time.monotonic()
        time.sleep(args.seconds)
        used = (cpu(proc.pid) - before) / (time.monotonic() - start)
        build = 0.0
        if base:
            for line in get(base + "/metrics")[1].decode().splitlines():
                if line.startswith("mobility_snapshot_build_seconds "):
                    build = float(line.split()[1])
        return used, build
    finally:
        browser_stop.set()
        time.sleep(1)
        proc.terminate()
        proc.wait(timeout=30)


def browse(base: str, stop: threading.Event) -> None:
    """Two tabs, the overview and the machines page, left open: they refresh by themselves."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        for path in ("/", "/machines"):
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(base + path)
        while not stop.wait(0.5):
            pass
        browser.close()


def page_render(base: str, rounds: int) -> list[float]:
    from playwright.sync_api import sync_playwright

    times = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(base + "/machines")  # warm: the browser's own start is not the page's
        page.wait_for_selector("#machines tbody tr[data-host-id]")
        for i in range(rounds):
            url = base + ("/machines" if i % 2 == 0 else "/machines?sort=lag&order=desc&protection=breach")
            start = time.perf_counter()
            page.goto(url)
            page.wait_for_selector("#machines tbody tr[data-host-id]")
            page.wait_for_selector("body[data-refreshed]")
            times.append(time.perf_counter() - start)
        rows = page.eval_on_selector_all("#machines tbody tr", "rs => rs.length")
        total = page.text_content("#machines-count")
        browser.close()
    print(f"  rows shown: {rows}, {total}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--refresh", type=float, default=10.0)
    args = parser.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} cores, shared)")
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        data = Path(tmp) / "data"
        init_local_server(data)
        started = time.monotonic()
        protected = seed(data, args.machines)
        storage = Storage.open(database_for(DataDir(data), None), pool_size=0)
        with storage.reading() as tx:
            everyone = [str(r[0]) for r in tx.conn.execute(text("SELECT host_id FROM machines"))]
        storage.close()
        print(f"seeded {args.machines} machines ({len(protected)} protected) in {time.monotonic() - started:.0f} s")
        churn = Churn(data, protected, everyone)
        churn.thread.start()
        try:
            proc, _, _ = start_local_server(data, "--ui-refresh", str(args.refresh))
            try:
                base = ui_url(data)
                assert base is not None
                get(base + "/api/overview")
                print("1. the machines page")
                for query in ("", "?sort=lag&order=desc", "?q=host-0999", "?protection=breach&sort=health",
                              "?state=offline&limit=500"):  # fmt: skip
                    times = [get(base + "/api/machines" + query)[0] for _ in range(30)]
                    print(f"  /api/machines{query or ' (hostname order)'}: {stats(times)}")
                if Path(CHROMIUM).exists():
                    print(f"  in chromium, navigation to the table filled: {stats(page_render(base, 10))}")
                print("2. /metrics")
                first, body = get(base + "/metrics")  # nobody scraped before: this one writes the fleet's text
                scrapes, again, packed = [], [], []
                for _ in range(6):
                    time.sleep(args.refresh + 0.5)  # each scrape meets a new snapshot, as Prometheus' would
                    t, body = get(base + "/metrics")
                    scrapes.append(t)
                    again += [get(base + "/metrics")[0] for _ in range(4)]
                    packed.append(get(base + "/metrics", {"Accept-Encoding": "gzip"})[0])
                lines = sum(1 for line in body.decode().splitlines() if not line.startswith("#"))
                print(f"  {lines} samples, {len(body) / 1e6:.1f} MB; the very first scrape {first * 1000:.0f} ms")
                print(f"  a scrape of each new snapshot: {stats(scrapes)}; the same snapshot again: {stats(again)}")
                print(f"  gzip (the text is compressed once a snapshot): {stats(packed)}")
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            print(f"3. the server's CPU over {args.seconds:.0f} s (refresh {args.refresh:g} s), in cores")
            off, _ = server_cpu(data, args, "none", 0)
            print(f"  dashboard off: {off:.3f}")
            on, build = server_cpu(data, args, "127.0.0.1:0", 0)
            print(f"  dashboard on, nobody looking: {on:.3f} (a snapshot took {build * 1000:.0f} ms)")
            if Path(CHROMIUM).exists():
                looked, _ = server_cpu(data, args, "127.0.0.1:0", 1)
                print(f"  two tabs open (overview, machines): {looked:.3f}")
                print(f"  live refresh costs {100 * (looked - off):.1f} % of one core (target < 5 %)")
                scraped, _ = server_cpu(data, args, "127.0.0.1:0", 1, scraper=True)
                print(f"  the same and Prometheus scraping every 15 s: {scraped:.3f} ({100 * (scraped - off):.1f} %)")
        finally:
            churn.close()
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
