"""The built-in PostgreSQL recovery check (agent/recovery/postgresql.py) against real clusters of Debian's PostgreSQL
on this machine: one killed with -9 under pgbench recovers (its WAL replayed) and passes; a corrupt index and a broken
balance fail it, with what was wrong. Inside a failed-over VM, as operators meet it: tests/integration/
test_vm_protection.py."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from agent.recovery.postgresql import Cluster, Failed, check_cluster
from tests.conftest import require_root
from tests.postgres import PostgresCluster, new_cluster, postgres_bin

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    require_root()
    made = new_cluster(fsync=True)
    try:
        yield made
    finally:
        _pg_ctl(made, "stop", "-m", "immediate", check=False)
        made.remove()


def _bin(name: str) -> str:
    bindir = postgres_bin()
    assert bindir is not None
    return str(bindir / name)


def _pg_ctl(c: PostgresCluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", "postgres", "--", _bin("pg_ctl"), "-D", str(c.data), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=check,
    )


def described(c: PostgresCluster, online: bool) -> Cluster:
    """The test's cluster as the check sees one: started by pg_ctl (pg_ctlcluster's part on Debian)."""
    options = f"-p {c.port} -k {c.socket_dir} -c listen_addresses=''"
    start = ("runuser", "-u", "postgres", "--", _bin("pg_ctl"), "-D", str(c.data), "-l", str(c.log), "-w")
    return Cluster(
        "15/test",
        c.port,
        "postgres",
        str(c.data),
        Path(_bin("psql")).parent,
        str(c.socket_dir),
        (*start, "-o", options, "start"),
        str(c.log),
        online,
    )


def pgbench(c: PostgresCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", "postgres", "--", _bin("pgbench"), "-h", str(c.socket_dir), "-p", str(c.port), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_cluster_killed_under_pgbench_replays_its_wal_and_passes(cluster: PostgresCluster) -> None:
    assert pgbench(cluster, "-i", "-s", "2", "postgres").returncode == 0
    where = ["-h", str(cluster.socket_dir), "-p", str(cluster.port)]
    load = subprocess.Popen(
        ["runuser", "-u", "postgres", "--", _bin("pgbench"), *where, "-c", "4", "-T", "60", "postgres"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while int(cluster.sql("SELECT count(*) FROM pgbench_history")) < 200:
            assert time.monotonic() < deadline, "pgbench committed nothing"
            time.sleep(0.2)
        # A power cut: the postmaster and every backend it started, by PID, at once.
        assert cluster.proc is not None
        server = psutil.Process(cluster.proc.pid)
        for p in [server, *server.children(recursive=True)]:
            p.kill()
        cluster.proc.wait(timeout=30)
        cluster.proc = None
    finally:
        load.wait(timeout=120)

    lines = check_cluster(described(cluster, online=False), time.monotonic() + 300)
    assert lines[0].startswith("ready after ") and "accepting writes" in lines[0]
    assert "WAL replayed (redo starts at " in lines[0] and "redo done at " in lines[0], lines
    assert lines[1].startswith("pg_amcheck --all: no corruption")
    assert lines[2].startswith("pgbench invariant holds in database postgres (each balance sums to "), lines
    assert len(lines) == 3


def test_a_broken_balance_fails_with_the_sums(cluster: PostgresCluster) -> None:
    assert pgbench(cluster, "-i", "-s", "1", "postgres").returncode == 0
    assert pgbench(cluster, "-c", "2", "-t", "50", "postgres").returncode == 0
    check_cluster(described(cluster, online=True), time.monotonic() + 120)  # consistent as pgbench left it
    cluster.sql("UPDATE pgbench_tellers SET tbalance = tbalance + 7 WHERE tid = 1")
    with pytest.raises(Failed) as failed:
        check_cluster(described(cluster, online=True), time.monotonic() + 120)
    message = str(failed.value)
    assert message.startswith("pgbench invariant in database postgres: balances differ: accounts ")
    sums = [int(part.rsplit(" ", 1)[1]) for part in message.split(": ", 2)[2].split(", ")]
    assert sums[2] == sums[0] + 7 and sums[0] == sums[1] == sums[3]


def test_pgbench_run_again_empties_its_history_and_the_balances_still_hold(cluster: PostgresCluster) -> None:
    """pgbench empties pgbench_history when a run starts (unless -n): after a second run the history's deltas are
    the last run's only, while the three balances still agree. The check passes and says so (it failed every failed-
    over copy of bench/recovery.py's machine, whose pgbench ran three times); a torn balance still fails it."""
    assert pgbench(cluster, "-i", "-s", "1", "postgres").returncode == 0
    for _ in range(2):
        assert pgbench(cluster, "-c", "2", "-t", "50", "postgres").returncode == 0
    lines = check_cluster(described(cluster, online=True), time.monotonic() + 120)
    said = next(line for line in lines if line.startswith("pgbench invariant holds in database postgres ("))
    assert "pgbench empties its history when a run starts" in said or "each balance sums to" in said, lines
    cluster.sql("UPDATE pgbench_branches SET bbalance = bbalance - 3 WHERE bid = 1")
    with pytest.raises(Failed, match="pgbench invariant in database postgres: balances differ: accounts "):
        check_cluster(described(cluster, online=True), time.monotonic() + 120)


def test_a_corrupt_index_fails_pg_amcheck(cluster: PostgresCluster) -> None:
    cluster.sql(
        "CREATE TABLE orders (id int PRIMARY KEY, note text); "
        "INSERT INTO orders SELECT g, repeat('x', 50) FROM generate_series(1, 2000) g; CHECKPOINT"
    )
    index = cluster.data / cluster.sql("SELECT pg_relation_filepath('orders_pkey')").strip()
    cluster.stop()
    data = bytearray(index.read_bytes())
    data[8192 + 4000 : 8192 + 4400] = bytes(range(256)) + bytes(range(144))  # a torn leaf page
    index.write_bytes(bytes(data))
    cluster.start()
    with pytest.raises(Failed) as failed:
        check_cluster(described(cluster, online=True), time.monotonic() + 120)
    message = str(failed.value)
    assert message.startswith("pg_amcheck --all exited 2: "), message
    assert 'btree index "postgres.public.orders_pkey"' in message
