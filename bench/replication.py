"""bench/replication: replication figures against their targets, each measured side by side in one run (root).

    .venv/bin/python bench/replication.py [--sync-gib 2] [--resync-gib 4] [--churn-seconds 60] [--rss-gib 1 16]
        [--profile DIR]  (py-spy on PATH: each churn's agent and process server sampled, every thread, idle too)

1. Full sync: a disk filled with half compressible (binaries and libraries of this machine) and half random data;
   the limit is min(sequential O_DIRECT read of the disk, zstd-1 over the same data x cores), both measured now;
   the initial sync runs from the daemon's "initial sync" log line to "in sync". Target >= 90 % of the limit. Also
   measured: what the store's filesystem takes (appends flushed in 8 MiB pieces, as group commits flush them, divided
   by the share zstd keeps: the disk's bytes per second the store can absorb, which on a machine whose source disk and
   store share one device bounds the sync too), and the CPU each process spent per MB synced.
2. Resync: a disk of --resync-gib GiB, 1 % of its 64 KiB blocks rewritten while the agent is down (killed: an unclean
   stop, which needs the resync a clean stop no longer does); the agent's
   checksum resync against `rsync --inplace --no-whole-file` of the same change onto the old image (caches dropped
   before each). Target >= 2x faster.
3. Churn: fio random writes (4 KiB at 20 and 40 MB/s, then 64 KiB at 20 MB/s) to a 1 GiB file on ext4 on a protected
   disk, points every 10 s: lag p99 (sampled from the agent's status), the writer's p99 latency with and without
   protection, the freeze window p99, points cut, failed and postponed.
5. PostgreSQL (Debian's) with its data directory on ext4 on a protected disk: pgbench's tps without and with
   protection (points every 10 s), lag p99, points and freeze p99; then the last point is failed over and the
   database started on it: it replays its WAL, pg_amcheck finds nothing, and pgbench's own invariant holds (the
   balances of accounts, branches and tellers each add up to the sum of the history's deltas).
4. RSS: the daemon's resident memory (every thread; one process) during the initial sync and while idle, for a
   1 GiB and a 16 GiB disk. Target <= 64 MiB busy, the larger within 10 % of the smaller.

The process server runs on the same two cores as the source here, so the agents run with
replication_backoff_cpu_percent = 100: the server's work would otherwise count as the machine being busy and
replication would back off from it (as it should from the machine's own work; tests/integration cover that).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import psutil
import zstandard

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.replication_lab import Disk, Lab, Machine, Server, sh, wait_for  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
AGENT = {"replication_backoff_cpu_percent": 100}
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_CUT = re.compile(r" cut \(.*\): froze .* for (\d+) ms(?: \(([^)]*)\))?")  # and where it went, once it says


def drop_caches() -> None:
    sh(["sync"])
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def corpus() -> bytes:
    """Compressible data from this machine: its executables and libraries (zstd-1 keeps roughly half)."""
    out = bytearray()
    for folder in ("/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/lib"):
        for path in sorted(Path(folder).glob("*")):
            if path.is_file() and not path.is_symlink():
                try:
                    out += path.read_bytes()
                except OSError:
                    continue
            if len(out) >= 256 * MIB:
                return bytes(out)
    return bytes(out)


def fill(disk: Disk, nbytes: int, data: bytes, seed: int) -> None:
    """Half compressible, half random, in alternating 1 MiB pieces, written straight onto the device."""
    rng = random.Random(seed)  # noqa: S311 - benchmark data
    fd = os.open(disk.loop, os.O_WRONLY)
    try:
        for offset in range(0, nbytes, MIB):
            if (offset // MIB) % 2:
                piece = rng.randbytes(MIB)
            else:
                start = rng.randrange(0, max(1, len(data) - MIB))
                piece = data[start : start + MIB].ljust(MIB, b"\1")
            os.pwrite(fd, piece, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def seq_read(path: str, size: int) -> float:
    """Bytes per second of an O_DIRECT sequential read of the device (1 MiB requests)."""
    import mmap

    drop_caches()
    buf = mmap.mmap(-1, 4 * MIB)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    start = time.perf_counter()
    try:
        offset = 0
        while offset < size:
            n = os.preadv(fd, [buf], offset)
            if n <= 0:
                break
            offset += n
    finally:
        os.close(fd)
    return size / (time.perf_counter() - start)


def zstd_rate(path: str, size: int, cores: int) -> float:
    """zstd level 1 over the disk's own data in 64 KiB chunks, one compressor per core, bytes per second."""
    sample = min(size, 512 * MIB)
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, sample, 0)
    finally:
        os.close(fd)

    def work(part: int) -> None:
        c = zstandard.ZstdCompressor(level=1)
        for i in range(part * 65536, len(data), cores * 65536):
            c.compress(data[i : i + 65536])

    start = time.perf_counter()
    with ThreadPoolExecutor(cores) as pool:
        list(pool.map(work, range(cores)))
    return len(data) / (time.perf_counter() - start)


def log_time(machine: Machine, pattern: str, after: float = 0.0) -> float:
    for line in machine.log().splitlines():
        m = _STAMP.match(line)
        if m and pattern in line:
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if t >= after:
                return t
    raise AssertionError(f"no log line {pattern!r}")


def protect(server: Server, machine: Machine, disk: Disk, policy: str = "bench", interval: str = "7d") -> None:
    server.cli("policy", "set", policy, "--interval", interval, "--retention", "1000")
    server.cli("protect", "--machine", machine.host_id, "--disk", disk.loop, "--policy", policy)


def sample_rss(pid: int, stop: threading.Event, out: list[float]) -> None:
    proc = psutil.Process(pid)
    while not stop.is_set():
        try:
            out.append(proc.memory_info().rss / MIB)
        except psutil.Error:
            return
        stop.wait(0.2)


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


# 1. Full sync --------------------------------------------------------------------------------------------------


def store_write(where: Path, data: bytes, nbytes: int) -> float:
    """Bytes per second the store's filesystem takes as the store writes: appended in 8 MiB pieces, each flushed
    (fdatasync), as group commits do. A sync cannot keep more than this (times what zstd saves) per second."""
    path = where / "write-probe"
    rng = random.Random(7)  # noqa: S311 - benchmark data
    pieces = [rng.randbytes(8 * MIB), data[: 8 * MIB].ljust(8 * MIB, b"\1")]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    start = time.perf_counter()
    try:
        for i in range(nbytes // (8 * MIB)):
            os.write(fd, pieces[i % 2])
            os.fdatasync(fd)
    finally:
        os.close(fd)
        path.unlink()
    return nbytes / (time.perf_counter() - start)


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def bench_full_sync(lab: Lab, server: Server, gib: float, data: bytes) -> dict[str, float]:
    size = int(gib * GIB)
    disk = lab.disk("sync", size, ())
    fill(disk, size, data, seed=1)
    read = seq_read(disk.loop, size)
    zstd = zstd_rate(disk.loop, size, os.cpu_count() or 1)
    stored = len(zstandard.compress(data[: 64 * MIB], 1)) / min(len(data), 64 * MIB) / 2 + 0.5  # half is random
    write = store_write(server.data / "process", data, min(size, 1 * GIB)) / stored
    limit = min(read, zstd)
    machine = lab.machine(server, "sync", config=AGENT)
    lab.expose(machine, disk)
    drop_caches()
    server_cpu = cpu_seconds(server.proc.pid)
    protect(server, machine, disk)
    agent = lab.start_agent(machine)
    rss: list[float] = []
    stop = threading.Event()
    threading.Thread(target=sample_rss, args=(agent.pid, stop, rss), daemon=True).start()
    lab.wait_state(machine, disk, "CONTINUOUS", timeout=3600)
    stop.set()
    agent_cpu, server_cpu = cpu_seconds(agent.pid), cpu_seconds(server.proc.pid) - server_cpu
    began, done = log_time(machine, "initial sync"), log_time(machine, "in sync; continuous")
    rate = size / (done - began)
    return {
        "disk_mib": size / MIB,
        "seq_read_mbps": read / 1e6,
        "zstd1_x_cores_mbps": zstd / 1e6,
        "store_write_mbps": write / 1e6,  # of the disk's bytes: the store's filesystem's rate / what zstd keeps
        "limit_mbps": limit / 1e6,
        "sync_mbps": rate / 1e6,
        "ratio_of_limit": rate / limit,
        "ratio_of_limit_with_store": rate / min(limit, write),
        "agent_cpu_ms_per_mb": 1000 * agent_cpu / (size / 1e6),  # the whole daemon's CPU (start included)
        "server_cpu_ms_per_mb": 1000 * server_cpu / (size / 1e6),  # the whole server's during the sync
        "rss_busy_max_mib": max(rss) if rss else float("nan"),
    }


# 2. Resync vs rsync --------------------------------------------------------------------------------------------


def bench_resync(lab: Lab, server: Server, gib: float, data: bytes) -> dict[str, float]:
    size = int(gib * GIB)
    disk = lab.disk("resync", size, ())
    fill(disk, size, data, seed=2)
    old = lab.workdir / "resync-old.img"
    shutil.copyfile(disk.image, old)  # the replica rsync updates: the disk before the change
    machine = lab.machine(server, "resync", config=AGENT)
    lab.expose(machine, disk)
    protect(server, machine, disk)
    agent = lab.start_agent(machine)
    lab.wait_state(machine, disk, "CONTINUOUS", timeout=3600)
    agent.kill()  # unclean: the next start must resync (a clean stop would find the changes in its kept tracing)
    agent.wait(timeout=60)
    rng = random.Random(3)  # noqa: S311
    blocks = size // 65536
    changed = rng.sample(range(blocks), blocks // 100)
    fd = os.open(disk.loop, os.O_WRONLY)
    try:
        for b in changed:
            os.pwrite(fd, rng.randbytes(65536), b * 65536)
        os.fsync(fd)
    finally:
        os.close(fd)
    drop_caches()
    restarted = time.time()
    lab.start_agent(machine)

    def logged(pattern: str, after: float) -> float | None:
        try:
            return log_time(machine, pattern, after)
        except AssertionError:
            return None

    # The killed agent's status file still says CONTINUOUS: go by the new agent's log.
    began = wait_for("the resync", lambda: logged("checksum resync", restarted - 1), timeout=600)
    done = wait_for("the resync's end", lambda: logged("in sync; continuous", began), timeout=3600)
    ours = done - began
    drop_caches()
    start = time.perf_counter()
    sh(["rsync", "--inplace", "--no-whole-file", str(disk.image), str(old)], timeout=7200)
    theirs = time.perf_counter() - start
    old.unlink()
    return {
        "disk_mib": size / MIB,
        "changed_mib": len(changed) * 65536 / MIB,
        "resync_seconds": ours,
        "rsync_seconds": theirs,
        "speedup": theirs / ours,
    }


# 3. Churn ------------------------------------------------------------------------------------------------------


def fio(target: Path, seconds: int, bs: str, rate: str = "20m") -> dict[str, float]:
    out = sh(
        [
            "fio",
            "--name=churn",
            f"--filename={target}",
            "--size=1G",
            "--rw=randwrite",
            f"--bs={bs}",
            f"--rate={rate}",
            "--direct=1",
            "--ioengine=psync",
            "--time_based",
            f"--runtime={seconds}",
            "--randrepeat=0",
            "--output-format=json",
        ],
        timeout=seconds + 600,
    ).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]["write"]
    pct = job["clat_ns"]["percentile"]
    return {
        "iops": job["iops"],
        "mbps": job["bw_bytes"] / 1e6,
        "p99_ms": pct["99.000000"] / 1e6,
        "p999_ms": pct["99.900000"] / 1e6,
    }


def profile(
    pids: dict[str, int], seconds: int, out: Path, label: str, gil: bool = False
) -> list[subprocess.Popen[bytes]]:
    """py-spy (from PyPI: `pip install py-spy`; found on PATH) sampling each of ``pids`` for ``seconds``, every thread,
    idle ones too (what a thread waits on is the question when nothing is saturated), or with ``gil`` only the thread
    that holds the interpreter (how much of the time Python itself runs, and where): collapsed stacks in ``out``."""
    spy = shutil.which("py-spy")
    if spy is None:
        raise RuntimeError("--profile needs py-spy on PATH (pip install py-spy)")
    out.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(seconds),
                "--rate",
                "200",
                "--threads",
                "--gil" if gil else "--idle",
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(out / f"{label}-{name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]


def profile_summary(path: Path, top: int = 6) -> str:
    """Per thread of one collapsed-stacks file: its share of the samples, and where its samples ended (the leaf
    function: for a waiting thread, what it waits in)."""
    threads: dict[str, dict[str, int]] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = frames[0].partition(": ")[2] or frames[0]  # "thread (TID): name"
        leaf = re.sub(r" \((.*/)?([^/]+)\)$", r" (\2)", frames[-1])
        threads.setdefault(thread, {})
        threads[thread][leaf] = threads[thread].get(leaf, 0) + int(count)
    total = sum(sum(t.values()) for t in threads.values()) or 1
    lines = [f"{path.name}: {total} samples"]
    for thread, leaves in sorted(threads.items(), key=lambda kv: -sum(kv[1].values())):
        n = sum(leaves.values())
        best = ", ".join(
            f"{leaf} {100 * c / n:.0f}%" for leaf, c in sorted(leaves.items(), key=lambda kv: -kv[1])[:top]
        )
        lines.append(f"  {thread}: {100 * n / total:.0f}% of samples; {best}")
    return "\n".join(lines)


def schedstat(pid: int) -> tuple[float, float]:
    """Seconds a process's threads (live ones) spent on a CPU and waiting for one on a run queue (runnable, not
    running: what nice 10 costs on a busy machine), from /proc/PID/task/*/schedstat."""
    on = wait = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "schedstat").read_text().split()
        except OSError:  # the thread ended meanwhile
            continue
        on, wait = on + int(fields[0]), wait + int(fields[1])
    return on / 1e9, wait / 1e9


def bench_churn(
    lab: Lab,
    server: Server,
    seconds: int,
    bs: str,
    rate: str = "20m",
    keep: Path | None = None,
    profile_dir: Path | None = None,
    profile_gil: bool = False,
) -> dict[str, float]:
    disk = lab.disk(f"churn{bs}{rate}", 4 * GIB, ("ext4",))
    target = disk.mounts[0] / "churn.dat"
    sh(
        [
            "fio",
            "--name=prep",
            f"--filename={target}",
            "--size=1G",
            "--rw=write",
            "--bs=1M",
            "--direct=1",
            "--output=/dev/null",
        ],
        timeout=600,
    )
    unprotected = fio(target, seconds, bs, rate)
    machine = lab.machine(server, f"churn{bs}{rate}", config=AGENT)
    lab.expose(machine, disk)
    protect(server, machine, disk, policy="churn", interval="10s")
    agent = lab.start_agent(machine)
    lab.wait_state(machine, disk, "CONTINUOUS", timeout=3600)
    lags: list[float] = []
    rss: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            d = machine.disk_state(disk)
            if d.get("lag_seconds") is not None:
                lags.append(float(d["lag_seconds"]))
            stop.wait(1.0)

    threading.Thread(target=sample, daemon=True).start()
    threading.Thread(target=sample_rss, args=(agent.pid, stop, rss), daemon=True).start()
    started = time.time()
    label = f"churn-{bs}-{rate}"
    pids = {"agent": agent.pid, "server": server.proc.pid}
    spies = [] if profile_dir is None else profile(pids, seconds, profile_dir, label, gil=profile_gil)
    cpu = {name: psutil.Process(pid).cpu_times() for name, pid in pids.items()}
    sched = {name: schedstat(pid) for name, pid in pids.items()}
    wall = time.monotonic()
    protected = fio(target, seconds, bs, rate)
    wall = time.monotonic() - wall
    cores = {  # the share of a core each process used while the writer ran, and waited for one while runnable
        name: (sum(psutil.Process(pid).cpu_times()[:2]) - sum(cpu[name][:2])) / wall for name, pid in pids.items()
    }
    runqueue = {name: (schedstat(pid)[1] - sched[name][1]) / wall for name, pid in pids.items()}
    stop.set()
    for spy in spies:
        spy.wait(timeout=120)
    if profile_dir is not None:
        for name in pids:
            print(profile_summary(profile_dir / f"{label}-{name}.txt"), flush=True)
    points = [p for p in server.json("points", "--machine", machine.host_id) if p["created"] >= started]

    log = []  # the agent's lines from the churn on (a point due during the initial sync is not the churn's)
    for line in machine.log().splitlines():
        m = _STAMP.match(line)
        if m and datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() >= started:
            log.append(line)
    failed = [line.split("no point: ")[1][:160] for line in log if "no point: " in line]
    postponed = [line.split("point postponed: ")[1][:200] for line in log if "point postponed: " in line]
    if postponed:
        print(f"churn {bs} {rate}: postponed {len(postponed)} times; first: {postponed[0]}", flush=True)
    cuts = [m for line in log if (m := _CUT.search(line))]
    freezes = [float(m.group(1)) for m in cuts]
    for m in cuts:  # where each freeze went: the freeze itself, the tracer's drain, the slowest disk's capture
        print(f"churn {bs} {rate}: froze {m.group(1)} ms ({m.group(2) or 'no breakdown'})", flush=True)
    if failed:
        print(f"churn {bs}: {len(failed)} points not cut; first: {failed[0]}", flush=True)
    for line in [x for x in log if "WARNING mobility.replication" in x and "no point" not in x][:5]:
        print(f"churn {bs}: {line[:240]}", flush=True)
    if keep is not None:  # the agent's whole log, for a closer look (the lab's directory goes at the end)
        shutil.copyfile(machine.root / "var/log/mobility/agent.log", keep / f"churn-{bs}-{rate}-agent.log")
    return {
        "writer_mbps_unprotected": unprotected["mbps"],
        "writer_mbps_protected": protected["mbps"],
        "writer_p99_ms_unprotected": unprotected["p99_ms"],
        "writer_p99_ms_protected": protected["p99_ms"],
        "lag_p99_s": p99(lags),
        "lag_max_s": max(lags) if lags else float("nan"),
        "points": len(points),
        "points_failed": len(failed),
        "points_postponed": len(postponed),
        "writer_iops_protected": protected["iops"],
        "freeze_p99_ms": p99(freezes),
        "freeze_median_ms": statistics.median(freezes) if freezes else float("nan"),
        "rss_busy_max_mib": max(rss) if rss else float("nan"),
        "agent_cores": cores["agent"],
        "server_cores": cores["server"],
        "agent_runqueue_cores": runqueue["agent"],  # thread-seconds a second spent runnable, waiting for a CPU
        "server_runqueue_cores": runqueue["server"],
    }


# 5. PostgreSQL under pgbench ------------------------------------------------------------------------------------


def bench_pgbench(lab: Lab, server: Server, seconds: int) -> dict[str, float]:
    import pwd

    from tests.postgres import PostgresCluster, postgres_bin

    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    pg = pwd.getpwnam("postgres")
    disk = lab.disk("pgbench", 4 * GIB, ("ext4",))
    mount = disk.mounts[0]
    lab.workdir.chmod(0o711)  # the postgres user reaches its data directory through it (its files stay private)
    mount.chmod(0o755)
    cluster = PostgresCluster(mount / "pg", fsync=True)
    cluster.init()
    cluster.start()
    lab.defer("postgres on the protected disk", cluster.stop)

    def pgbench(*args: str, timeout: float = 3600) -> str:
        r = subprocess.run(
            [str(bindir / "pgbench"), "-h", str(cluster.socket_dir), "-p", str(cluster.port), "-U", "postgres", *args],
            user="postgres",
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if r.returncode:
            raise RuntimeError(f"pgbench {' '.join(args)}: {r.stderr[-2000:]}")
        return r.stdout

    def tps(out: str) -> float:
        m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out)
        if m is None:
            raise RuntimeError(f"no tps in pgbench's output: {out[-500:]}")
        return float(m.group(1))

    pgbench("-i", "-q", "-s", "20", "postgres")
    unprotected = tps(pgbench("-c", "4", "-j", "2", "-T", str(seconds), "postgres"))
    # Afresh: each run truncates the history at its start, and the balances are checked against it below.
    pgbench("-i", "-q", "-s", "20", "postgres")
    machine = lab.machine(server, "pgbench", config=AGENT)
    lab.expose(machine, disk)
    protect(server, machine, disk, policy="pgbench", interval="10s")
    agent = lab.start_agent(machine)
    lab.wait_state(machine, disk, "CONTINUOUS", timeout=3600, settled=False)
    lags: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            d = machine.disk_state(disk)
            if d.get("lag_seconds") is not None:
                lags.append(float(d["lag_seconds"]))
            stop.wait(1.0)

    threading.Thread(target=sample, daemon=True).start()
    started = time.time()
    protected = tps(pgbench("-c", "4", "-j", "2", "-T", str(seconds), "postgres"))
    stop.set()
    points = [p for p in server.json("points", "--machine", machine.host_id) if p["created"] >= started]
    freezes = [
        float(line.split("frozen ")[1].split(" ms")[0])
        for line in machine.log().splitlines()
        if " cut (" in line and "frozen " in line
    ]
    # The last point, failed over: the database starts on it, replays its WAL and is consistent.
    checked = 0.0
    if points:
        out = lab.workdir / "pgbench-failover"
        server.cli("failover", "--machine", machine.host_id, "--point", str(points[-1]["point_id"]), "--out", str(out))
        image = out / (disk.loop.removeprefix("/dev/") + ".img")
        loop = sh(["losetup", "--find", "--show", str(image)]).stdout.strip()
        lab.defer(f"loop {loop}", lambda: sh(["losetup", "--detach", loop], check=False))
        where = lab.workdir / "pgbench-restored"
        where.mkdir(exist_ok=True)
        sh(["mount", loop, str(where)])
        lab.defer(f"mount {where}", lambda: sh(["umount", str(where)], check=False))
        restored = PostgresCluster(where / "pg", fsync=True)
        restored.socket_dir.mkdir(exist_ok=True)
        os.chown(restored.socket_dir, pg.pw_uid, pg.pw_gid)
        (restored.data / "postmaster.pid").unlink(missing_ok=True)  # the source's: it was running at the freeze
        restored.start()  # crash recovery: the WAL is replayed
        lab.defer("postgres on the failed-over point", restored.stop)
        log = restored.log.read_text(errors="replace")
        replayed = "redo done" in log or "database system was not properly shut down" in log
        amcheck = subprocess.run(
            [
                str(bindir / "pg_amcheck"),
                "-h",
                str(restored.socket_dir),
                "-p",
                str(restored.port),
                "-U",
                "postgres",
                "--install-missing",
                "--heapallindexed",
                "postgres",
            ],
            user="postgres",
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        sums = restored.sql(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(bbalance) FROM pgbench_branches), "
            "(SELECT sum(tbalance) FROM pgbench_tellers), (SELECT coalesce(sum(delta), 0) FROM pgbench_history)"
        ).strip()
        values = {v or "0" for v in sums.split("|")}
        print(f"pgbench failover: replayed={replayed}, pg_amcheck exit {amcheck.returncode}, sums {sums}", flush=True)
        if amcheck.returncode:
            print(f"pg_amcheck: {amcheck.stdout[-1500:]} {amcheck.stderr[-1500:]}", flush=True)
        checked = float(replayed and amcheck.returncode == 0 and len(values) == 1)
        restored.stop()
        sh(["umount", str(where)], check=False)
        sh(["losetup", "--detach", loop], check=False)
        shutil.rmtree(out, ignore_errors=True)
    agent.terminate()
    agent.wait(timeout=60)
    cluster.stop()
    return {
        "tps_unprotected": unprotected,
        "tps_protected": protected,
        "tps_ratio": protected / unprotected,
        "lag_p99_s": p99(lags),
        "points": len(points),
        "freeze_p99_ms": p99(freezes),
        "failover_checked": checked,
    }


# 4. RSS across disk sizes --------------------------------------------------------------------------------------


def bench_rss(lab: Lab, server: Server, sizes: list[float]) -> dict[str, float]:
    figures: dict[str, float] = {}
    for gib in sizes:
        size = int(gib * GIB)
        disk = lab.disk(f"rss{gib:g}", size, ())
        rng = random.Random(5)  # noqa: S311
        fd = os.open(disk.loop, os.O_WRONLY)
        try:
            for _ in range(256):  # 256 MiB of data at random places, the rest zeros
                os.pwrite(fd, rng.randbytes(MIB), rng.randrange(size // MIB) * MIB)
        finally:
            os.close(fd)
        machine = lab.machine(server, f"rss{gib:g}", config=AGENT)
        lab.expose(machine, disk)
        protect(server, machine, disk)
        agent = lab.start_agent(machine)
        busy: list[float] = []
        stop = threading.Event()
        threading.Thread(target=sample_rss, args=(agent.pid, stop, busy), daemon=True).start()
        lab.wait_state(machine, disk, "CONTINUOUS", timeout=3600)
        stop.set()
        time.sleep(5)
        idle = psutil.Process(agent.pid).memory_info().rss / MIB
        figures[f"rss_busy_max_mib_{gib:g}gib"] = max(busy)
        figures[f"rss_idle_mib_{gib:g}gib"] = idle
        agent.terminate()
        agent.wait(timeout=60)
    small, large = (f"rss_busy_max_mib_{g:g}gib" for g in (sizes[0], sizes[-1]))
    figures["busy_large_over_small"] = figures[large] / figures[small]
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sync-gib", type=float, default=2.0)
    parser.add_argument("--resync-gib", type=float, default=4.0)
    parser.add_argument("--churn-seconds", type=int, default=60)
    parser.add_argument(
        "--churn", nargs="+", default=["4k@20m", "4k@40m", "64k@20m"], help="fio block size @ rate to churn with"
    )
    parser.add_argument("--rss-gib", type=float, nargs="+", default=[1.0, 16.0])
    parser.add_argument("--pgbench-seconds", type=int, default=60)
    parser.add_argument("--only", choices=("sync", "resync", "churn", "rss", "pgbench"), action="append")
    parser.add_argument("--keep-logs", type=Path, help="copy the churn agents' logs into this directory")
    parser.add_argument(
        "--profile",
        type=Path,
        help="sample the churn's agent and server with py-spy; collapsed stacks in this directory",
    )
    parser.add_argument("--profile-gil", action="store_true", help="with --profile: only the thread holding the GIL")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/replication needs root (loop devices, tracefs, FIFREEZE)", file=sys.stderr)
        return 2
    only = set(args.only or ("sync", "resync", "churn", "rss", "pgbench"))
    results: dict[str, dict[str, float]] = {}
    work = Path(tempfile.mkdtemp(prefix="bench-replication-", dir="/var/tmp"))
    try:
        with Lab(work) as lab:
            server = lab.server("server", "--store-reserve", "256M")
            data = corpus() if only & {"sync", "resync"} else b""
            steps: list[tuple[str, str, Callable[[], dict[str, float]]]] = [
                ("sync", "sync", lambda: bench_full_sync(lab, server, args.sync_gib, data)),
                ("resync", "resync", lambda: bench_resync(lab, server, args.resync_gib, data)),
                *[
                    (
                        "churn",
                        f"churn-{spec}",
                        lambda spec=spec: bench_churn(
                            lab,
                            server,
                            args.churn_seconds,
                            *spec.split("@"),
                            keep=args.keep_logs,
                            profile_dir=args.profile,
                            profile_gil=args.profile_gil,
                        ),
                    )
                    for spec in args.churn
                ],
                ("pgbench", "pgbench", lambda: bench_pgbench(lab, server, args.pgbench_seconds)),
                ("rss", "rss", lambda: bench_rss(lab, server, args.rss_gib)),
            ]
            for kind, name, step in steps:
                if kind in only:
                    results[name] = step()
                    print(name, json.dumps({k: round(v, 3) for k, v in results[name].items()}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
