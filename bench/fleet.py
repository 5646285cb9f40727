"""bench/fleet: a boot storm in a heartbeating fleet, against real `mobility-server serve` processes on loopback.

    .venv/bin/python bench/fleet.py [--machines 10000] [--clones 1000] [--interval 30] [--storm 60]
                                    [--setup sqlite|postgresql|both]

- **The fleet**: ``--machines`` enrolled machines, each with its own key and a real certificate issued by the server's
  CA. They are *seeded straight into the database* (enrolling 10,000 through the API would take the setup longer
  than the run); each then keeps one mutual-TLS connection and heartbeats every ``--interval`` seconds at its own
  phase, as daemons do.
- **The storm**: ``--clones`` clones of one template, not prepared with template-prep: each boots at a random moment
  within ``--storm`` seconds and enrols through the API with the template's host ID, a proof of the template's key
  (the copied disk has it), its own facts and a new key. The server must make each a distinct machine
  ``cloned_from`` the template. A clone retries a 503 after its Retry-After plus full jitter, as agents do; once
  enrolled it heartbeats too.
- **Setups**: one instance on SQLite; two instances on one PostgreSQL (a cluster this script starts, fsync on), the
  machines split between them as a TCP balancer would (each client connection to the next instance).

Printed per setup: heartbeat latency p50/p99 during the storm, time until every clone is enrolled, errors (anything
but 200, and 503s that were retried), the servers' event-loop stall p99 (their 10 s log windows during the storm),
their peak RSS, and the CPU this client process used (it runs on the same 2 cores as the servers) with the lag of
its own event loop: the client is one process on uvloop, as the server is, holding every machine's connection; a
lag of the client's loop adds to the latencies it measures, so it is printed beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import random
import re
import resource
import ssl
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import uvloop

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from agent import __version__  # noqa: E402
from agent.lifecycle.identity import key_pem, key_proof, new_key_and_csr  # noqa: E402
from agent.shared import wire  # noqa: E402
from scripts.localserver import init_local_server, server_log, start_local_server  # noqa: E402
from server.api import pki  # noqa: E402
from server.api.stalls import Histogram, StallMonitor  # noqa: E402
from server.database.connection import database_for  # noqa: E402
from server.database.machines import NewMachine  # noqa: E402
from server.database.storage import Storage  # noqa: E402
from server.datadir import DataDir  # noqa: E402

STATS_SECONDS = 10
_WINDOW = re.compile(r"^(\S+ \S+) INFO mobility.server: event loop stalls in the last \S+ s: p50 \d+ ms, p99 (\d+) ms")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else float("nan")


# A minimal HTTP/1.1 client over asyncio streams: 11,000 kept-alive TLS connections in one process need less than
# one aiohttp session each would cost. -------------------------------------------------------------------------------


class Conn:
    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        self.port, self.ctx = port, ctx
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None

    async def request(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        for attempt in (0, 1):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(
                    "127.0.0.1", self.port, ssl=self.ctx, server_hostname="127.0.0.1"
                )
            assert self.reader is not None and self.writer is not None
            try:
                self.writer.write(
                    f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                status_line = await self.reader.readline()
                if not status_line:
                    raise ConnectionResetError("closed")
                headers = {}
                while (line := await self.reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                data = await self.reader.readexactly(int(headers.get("content-length", "0")))
                if headers.get("connection", "").lower() == "close":
                    await self.close()
                return int(status_line.split()[1]), headers, data
            except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                await self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")


# Setup ------------------------------------------------------------------------------------------------------------


@dataclass
class Machine:
    host_id: str
    pem: Path  # certificate and key, one file


def seed(data: Path, count: int, state: Path) -> tuple[list[Machine], Machine, Any]:
    """``count`` machines with real certificates, written straight into the database in one transaction; the first
    is the template the clones were made from (returned with its private key)."""
    ca = pki.Authority.load((data / "ca/ca.pem").read_bytes(), (data / "ca/ca.key").read_bytes())
    storage = Storage.open(database_for(DataDir(data), None), pool_size=0)
    now = time.time()
    machines = []
    template_key = None
    with storage.transaction() as tx:
        for i in range(count):
            host_id = str(uuid.uuid4())
            key, csr_pem = new_key_and_csr(host_id)
            csr = x509.load_pem_x509_csr(csr_pem)
            cert = pki.issue_client_cert(ca, csr, host_id, dt.datetime.now(dt.UTC))
            public = (
                csr.public_key()
                .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
                .decode()
            )
            tx.enrol_machine(
                NewMachine(
                    host_id=host_id,
                    hostname=f"fleet-{i}",
                    os_tag="DEBIAN12",
                    role="MS",
                    platform="VmWare",
                    agent_version=__version__,
                    facts=wire.MachineFacts(machine_id=f"{i:032x}", product_uuid=f"dmi-{i}"),
                    cloned_from=None,
                    cert_serial=format(cert.serial_number, "x"),
                    cert_not_after=cert.not_valid_after_utc.timestamp(),
                    public_key=public,
                    enrol_token_id=None,
                    heartbeat_interval=30.0,
                ),
                now,
            )
            pem = state / f"{i}.pem"
            pem.write_bytes(pki.cert_pem(cert) + key_pem(key))
            machines.append(Machine(host_id, pem))
            if i == 0:
                template_key = key
    storage.close()
    return machines, machines[0], template_key


@dataclass
class Results:
    beats: list[tuple[float, float]] = field(default_factory=list)  # (start, latency)
    beat_errors: dict[str, int] = field(default_factory=dict)
    beat_error_log: list[tuple[float, str]] = field(default_factory=list)  # (start, what): which were in the storm
    enrolled: dict[int, str] = field(default_factory=dict)  # clone -> host ID
    enrol_errors: dict[str, int] = field(default_factory=dict)
    retried_503: int = 0
    storm_start: float = 0.0
    storm_end: float = 0.0
    storm_wall: tuple[float, float] = (0.0, 0.0)  # the same, on the clock the servers' logs use
    server_cpu: list[float] = field(default_factory=list)  # cores each server process used during the storm
    machine_cpu: float = 0.0  # cores the whole machine used (other processes too)
    client_stalls: str = ""  # how late this client's own event loop woke during the storm

    def error(self, where: dict[str, int], what: str) -> None:
        where[what] = where.get(what, 0) + 1

    def beat_error(self, start: float, what: str) -> None:
        self.error(self.beat_errors, what)
        self.beat_error_log.append((start, what))


async def fleet(
    machines: list[Machine],
    ports: list[int],
    ca: Path,
    interval: float,
    until: asyncio.Event,
    results: Results,
    connected: asyncio.Event,
    offset: int = 0,
) -> None:
    """Every machine heartbeats every ``interval`` s at its own phase on its own kept-alive connection (machine
    ``offset + i`` on the next instance, as a round-robin balancer would)."""
    opened = 0

    async def one(i: int, m: Machine) -> None:
        nonlocal opened
        body = json.dumps(
            {
                "host_id": m.host_id,
                "agent_version": __version__,
                "health": {"status": "healthy", "time": time.time(), "checks": []},
            }
        ).encode()
        # Each machine keeps its own timetable (phase + k * interval), whatever its earlier beats cost: a fleet of
        # independent daemons. Sleeping ``interval`` after each beat instead lets one slow moment (the fleet's
        # connections being made) bunch the phases together, and the bunch comes back as a burst every interval.
        due = time.monotonic() + random.uniform(0, interval)  # noqa: S311 - phases, not secrets
        await asyncio.sleep(due - time.monotonic())
        # Made at the machine's phase, not before: 10,000 contexts made up front block this loop for seconds, the
        # phases then come due together, and the servers see the whole fleet connect in one burst.
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.load_cert_chain(str(m.pem))
        conn = Conn(ports[(offset + i) % len(ports)], ctx)
        first = True
        while not until.is_set():
            start = time.monotonic()
            try:
                status, _, _ = await conn.request(wire.HEARTBEAT_PATH, body)
                if status != 200:
                    results.beat_error(start, f"HTTP {status}")
            except (OSError, asyncio.IncompleteReadError, ssl.SSLError) as e:
                results.beat_error(start, type(e).__name__)
            else:
                results.beats.append((start, time.monotonic() - start))
            if first:
                first = False
                opened += 1
                if opened == len(machines):
                    connected.set()
            due += interval * max(1, math.ceil((time.monotonic() - due) / interval))  # a slot missed is skipped
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        await conn.close()

    await asyncio.gather(*(one(i, m) for i, m in enumerate(machines)))


async def storm(
    clones: int,
    ports: list[int],
    ca: Path,
    passphrase: str,
    template: Machine,
    template_key: Any,
    window: float,
    interval: float,
    until: asyncio.Event,
    results: Results,
    state: Path,
) -> None:
    """Each clone boots at a random moment of the window and enrols as the template's clone; then heartbeats."""
    plain = ssl.create_default_context(cafile=str(ca))
    results.storm_start = time.monotonic()

    async def clone(i: int) -> None:
        await asyncio.sleep(random.uniform(0, window))  # noqa: S311
        key, csr = new_key_and_csr(template.host_id)
        attempt = 0
        while not until.is_set():
            conn = Conn(ports[(i + attempt) % len(ports)], plain)
            try:
                status, headers, data = await conn.request(wire.NONCE_PATH, b"")
                if status == 200:
                    nonce = json.loads(data)["nonce"]
                    req = wire.EnrolRequest(
                        csr=csr.decode(),
                        nonce=nonce,
                        proof=wire.enrol_proof(passphrase, nonce, csr),
                        hostname=f"clone-{i}",
                        os_tag="DEBIAN12",
                        role="MS",
                        platform="VmWare",
                        facts=wire.MachineFacts(machine_id=f"{0:032x}", product_uuid=f"clone-dmi-{i}"),
                        agent_version=__version__,
                        host_id=template.host_id,
                        key_proof=key_proof(template_key, nonce, csr),
                    )
                    status, headers, data = await conn.request(wire.ENROL_PATH, json.dumps(req.to_json()).encode())
            except (OSError, asyncio.IncompleteReadError, ssl.SSLError) as e:
                results.error(results.enrol_errors, type(e).__name__)
                status, headers, data = 0, {}, b""
            finally:
                await conn.close()
            if status == 200:
                answer = json.loads(data)
                results.enrolled[i] = answer["host_id"]
                results.storm_end = time.monotonic()
                pem = state / f"clone-{i}.pem"
                pem.write_bytes(answer["certificate"].encode() + key_pem(key))
                if len(results.enrolled) == clones:
                    return
                enrolled = [Machine(answer["host_id"], pem)]
                await fleet(enrolled, ports, ca, interval, until, Results(), asyncio.Event(), offset=i)
                return
            if status == 503:
                results.retried_503 += 1
                retry = float(headers.get("retry-after", "1"))
                await asyncio.sleep(retry + random.uniform(0, min(30.0, 2.0**attempt)))  # noqa: S311
            else:
                results.error(results.enrol_errors, f"HTTP {status} {data[:80]!r}")
                await asyncio.sleep(random.uniform(0, min(30.0, 2.0**attempt)))  # noqa: S311
            attempt += 1

    await asyncio.gather(*(clone(i) for i in range(clones)))


def _cpu(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)


def sample_rss(pids: list[int], stop: threading.Event, peak: dict[int, int]) -> None:
    while not stop.wait(1.0):
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                peak[pid] = max(peak.get(pid, 0), psutil.Process(pid).memory_info().rss)


async def measure(
    ports: list[int], pids: list[int], data: Path, machines: list[Machine], template_key: Any, args: argparse.Namespace
) -> tuple[Results, float, dict[int, int]]:
    ca = data / "ca/ca.pem"
    passphrase = (data / "passphrase").read_text().strip()
    results = Results()
    until, connected = asyncio.Event(), asyncio.Event()
    peak: dict[int, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(pids, stop, peak), daemon=True)
    sampler.start()
    state = Path(tempfile.mkdtemp(prefix="bench-fleet-clones-"))
    client_stalls = StallMonitor()
    monitor = asyncio.create_task(client_stalls.run())
    heartbeating = asyncio.create_task(fleet(machines, ports, ca, args.interval, until, results, connected))
    t0 = time.monotonic()
    await asyncio.wait_for(connected.wait(), timeout=args.interval * 6)
    print(f"  fleet connected: {len(machines)} machines heartbeating after {time.monotonic() - t0:.0f} s", flush=True)
    await asyncio.sleep(args.interval)  # one steady cycle before the storm
    cpu0 = os.times()
    wall0 = time.monotonic()
    servers0 = [_cpu(pid) for pid in pids]
    machine0 = psutil.cpu_times()
    client_stalls.window = Histogram()  # the storm's own figures
    storming = asyncio.create_task(
        storm(
            args.clones,
            ports,
            ca,
            passphrase,
            machines[0],
            template_key,
            args.storm,
            args.interval,
            until,
            results,
            state,
        )
    )
    deadline = time.monotonic() + args.storm + 120
    while len(results.enrolled) < args.clones and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    cpu1 = os.times()
    wall1 = time.monotonic()
    servers1 = [_cpu(pid) for pid in pids]
    machine1 = psutil.cpu_times()
    results.server_cpu = [(b - a) / (wall1 - wall0) for a, b in zip(servers0, servers1, strict=True)]
    busy = (machine1.user + machine1.system + machine1.nice) - (machine0.user + machine0.system + machine0.nice)
    results.machine_cpu = busy / (wall1 - wall0)
    results.storm_wall = (time.time() - (wall1 - wall0), time.time())
    results.client_stalls = client_stalls.window.summary()
    until.set()
    await asyncio.gather(heartbeating, storming, return_exceptions=True)
    monitor.cancel()
    stop.set()
    client_cpu = ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / (wall1 - wall0)
    return results, client_cpu, peak


def report(name: str, results: Results, client_cpu: float, peak: dict[int, int], logs: list[Path], clones: int) -> None:
    storm_beats = [lat for start, lat in results.beats if results.storm_start <= start <= results.storm_end]
    enrolled_in = results.storm_end - results.storm_start if len(results.enrolled) == clones else float("nan")
    stalls: list[int] = []
    begin, end = results.storm_wall
    for log in logs:  # the servers' 10 s windows that end within the storm (or just after it)
        for line in log.read_text().splitlines():
            m = _WINDOW.match(line)
            if m:
                when = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                if begin + STATS_SECONDS <= when <= end + STATS_SECONDS:
                    stalls.append(int(m.group(2)))
    storm_errors: dict[str, int] = {}
    for start, what in results.beat_error_log:
        if results.storm_start <= start <= results.storm_end:
            results.error(storm_errors, what)
    print(f"== {name}")
    print(
        f"  heartbeats during the storm: {len(storm_beats)}, p50 {statistics.median(storm_beats) * 1e3:.1f} ms, "
        f"p99 {percentile(storm_beats, 99) * 1e3:.1f} ms"
        if storm_beats
        else "  no heartbeats during the storm"
    )
    print(
        f"  clones enrolled: {len(results.enrolled)} of {clones} ({len(set(results.enrolled.values()))} distinct "
        f"host IDs) in {enrolled_in:.1f} s after the storm began"
    )
    print(
        f"  errors: heartbeats {results.beat_errors or 0} (during the storm: {storm_errors or 0}), "
        f"enrolments {results.enrol_errors or 0}; "
        f"503s retried: {results.retried_503}"
    )
    print(
        f"  event loop stall p99 over the storm's 10 s windows: median {statistics.median(stalls or [0]):.0f} ms, "
        f"max {max(stalls, default=0)} ms ({len(stalls)} windows of all instances)"
    )
    print(f"  client event loop lag during the storm: {results.client_stalls}")
    print(f"  server RSS peak: {', '.join(f'{rss / 2**20:.0f} MiB' for rss in peak.values())}")
    print(
        f"  CPU during the storm, in cores of 2: client {client_cpu:.2f}, servers "
        f"{', '.join(f'{c:.2f}' for c in results.server_cpu)}, whole machine {results.machine_cpu:.2f}"
    )


def check_clones(data: Path, template: Machine, clones: dict[int, str]) -> str:
    storage = Storage.open(database_for(DataDir(data), None), pool_size=0)
    try:
        with storage.transaction() as tx:
            rows = [tx.machine(h) for h in set(clones.values())]
    finally:
        storage.close()
    marked = sum(1 for m in rows if m is not None and m.cloned_from == template.host_id)
    return f"  server's view: {marked} of {len(clones)} enrolled clones recorded as clones of the template"


def run_setup(name: str, args: argparse.Namespace, database: str | None, instances: int) -> None:
    work = Path(tempfile.mkdtemp(prefix=f"bench-fleet-{name}-"))
    data = work / "data"
    init_local_server(data, database=database)
    t0 = time.monotonic()
    machines, template, template_key = seed(data, args.machines, Path(tempfile.mkdtemp(prefix="bench-fleet-certs-")))
    print(f"[{name}] seeded {len(machines)} machines with real certificates in {time.monotonic() - t0:.0f} s")
    procs = []
    try:
        for _ in range(instances):
            proc, address, _ = start_local_server(
                data, "--heartbeat-interval", str(args.interval), "--stats-interval", str(STATS_SECONDS)
            )
            procs.append((proc, int(address.rsplit(":", 1)[1])))
        results, cpu, peak = uvloop.run(
            measure([p for _, p in procs], [p.pid for p, _ in procs], data, machines, template_key, args)
        )
    finally:
        for proc, _ in procs:
            proc.terminate()
            proc.wait(timeout=60)
    report(f"{name}: {instances} instance(s)", results, cpu, peak, [server_log(data)], args.clones)
    print(check_clones(data, template, results.enrolled), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--machines", type=int, default=10_000)
    parser.add_argument("--clones", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=30.0)
    parser.add_argument("--storm", type=float, default=60.0)
    parser.add_argument("--setup", choices=("sqlite", "postgresql", "both"), default="both")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one connection per machine
    from server.api.app import small_tls_buffers

    small_tls_buffers()  # the client's 11,000 connections too
    if args.setup in ("sqlite", "both"):
        run_setup("sqlite", args, None, 1)
    if args.setup in ("postgresql", "both"):
        from tests.postgres import new_cluster

        cluster = new_cluster(fsync=True)
        try:
            run_setup("postgresql", args, cluster.new_database(), 2)
        finally:
            cluster.remove()


if __name__ == "__main__":
    main()
