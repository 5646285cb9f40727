"""Protection of a real machine, and recovery that boots (issue 21 items 3-5; issue 20 item 8 on a real kernel).

A Debian 12 VM with PostgreSQL whose root volume group, and root on it, spans two disks (a partition of /dev/vda and
the whole /dev/vdb, grown as an operator grows a machine onto a new disk), bootstrapped as a template clone would be,
is protected (`--all-disks`) by a server on the host that it reaches through `guestfwd` only (API and process
server). Its initial sync ends CONTINUOUS; its points freeze root XFS (over both disks) and /boot ext4 together and
are crash-consistent, not raw-busy: the stacked-device freeze (/sys/block/*/slaves) proven on device-mapper, which
this machine's kernel has not. Then pgbench runs while two points are cut, each right after the test commits a row
it records, and a ticker commits numbered rows and records each once committed; the source's plug is pulled, and
each point is failed over and booted (two VMs at once, the lab's most):

- the latest with `mobility-server test-failover --boot`, as an operator tests a point: the server boots it in a
  throwaway VM with no network, marked a test failover, and runs the machine's own /etc/mobility/recovery.d checks:
  PostgreSQL replays its WAL, `pg_amcheck --all` and pgbench's balance invariant hold (the agent's PostgreSQL check),
  and the newest transaction committed before the point's freeze is there (an operator's check: the ticker's last
  acknowledged row, and the row the test committed right before asking for the point);
- the earlier one as a *real* failover, from `failover`'s images booted with the mark as an SMBIOS string and a route to
  the server: it registers as a new machine `failover_of` the source, and the same checks pass with `mobility
  recovery-check`, as the docs tell operators to run after a real failover. The source's record and points stay as
  they were. Three VM boots and one appliance in all."""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.recovery.builtins import BUILTIN_HEADER
from scripts.vmlab import CRYPTO_CPU, DEBIAN12, VM, Lab, image
from scripts.vmlab.guest import grow_root_onto
from scripts.vmlab.mobility import (
    MOBILITY,
    LabServer,
    agent_status,
    boot_point,
    failover_mark,
    install_bootstrapper,
    wait_registered,
)
from tests.conftest import require_root

pytestmark = [pytest.mark.integration, pytest.mark.vm]

PG = DEBIAN12.with_packages("pg", "postgresql-15")
HEARTBEAT = 5.0
EXPECTED_FROZEN = [
    {"mount": "/", "type": "xfs", "disks": ["/dev/vda", "/dev/vdb"]},
    {"mount": "/boot", "type": "ext4", "disks": ["/dev/vda"]},
]
# An operator's check (docs/recovery-checks.md), of two things:
# - the newest transaction committed before the point's freeze is in the failed-over database: a ticker (below)
#   commits tick n, and only once the commit returned appends n to /var/lib/marks/ticks, all the while (under
#   pgbench's load, through the freeze). The freeze takes the database's files and that file at one instant, so the
#   point's newest tick is the file's last one, or one more (committed, the append not yet made): anything less is
#   a lost commit, and nothing else can be more;
# - the row the test committed right before asking for the point is there: its number is written to
#   /var/lib/marks/last (fsynced) after the commit, so the point holds both or the check fails. The last line is the
#   check's summary.
MARKS_CHECK = """\
#!/bin/sh
set -eu
q() { runuser -u postgres -- psql -XAtq -v ON_ERROR_STOP=1 -d bench -c "$1"; }
acked=$(tail -n 1 /var/lib/marks/ticks)
newest=$(q "SELECT max(n) FROM ticks")
echo "ticks: $acked acknowledged before the freeze, the newest in the database $newest"
[ -n "$acked" ] && [ "$newest" -ge "$acked" ] && [ "$newest" -le $((acked + 1)) ]
want=$(cat /var/lib/marks/last)
got=$(q "SELECT count(*) FROM marks WHERE n = $want")
echo "marks: row $want (committed before the point) found $got time(s)"
[ "$got" = 1 ]
"""
# The ticker: one psql session runs the statements in order, so tick n's `\\!` append (a shell) runs only once its
# INSERT (autocommit) has returned, committed; a few ticks a second.
TICKER = """\
#!/bin/sh
n=0
while n=$((n + 1)); do
  echo "INSERT INTO ticks VALUES ($n);"
  printf '%s\\n' "\\\\! echo $n >> /var/lib/marks/ticks"
  echo "SELECT pg_sleep(0.1);"
done | psql -XAtq -v ON_ERROR_STOP=1 -d bench >/dev/null
"""
TICKS = re.compile(r"ticks: (\d+) acknowledged before the freeze, the newest in the database (\d+)\n")


def assert_newest_commit_recovered(output: str) -> None:
    """The marks check's first line: the newest tick acknowledged before the freeze (and no later one) recovered."""
    said = TICKS.search(output)
    assert said is not None, output
    acked, newest = int(said[1]), int(said[2])
    assert acked > 0 and acked <= newest <= acked + 1, output


@pytest.fixture
def server(dist: Path, tmp_path: Path) -> Iterator[LabServer]:
    bundles = sorted(dist.glob("*_DEBIAN12-64_*.tar.gz"))
    assert bundles, f"no DEBIAN12 bundle in {dist}"
    s = LabServer.start(tmp_path / "data", bundles, heartbeat_interval=HEARTBEAT)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    require_root()
    with Lab(tmp_path / "lab") as made:
        yield made


def sql(vm: VM, query: str, database: str = "bench") -> str:
    return vm.run(
        f"cd / && runuser -u postgres -- psql -XAtq -v ON_ERROR_STOP=1 -d {database} -c {shlex.quote(query)}"
    ).check(query)


def cut_point(vm: VM) -> dict[str, Any]:
    """`mobility point --json` in the guest. A point refused for a passing reason is asked for again: a residual too
    large to freeze for, under load, or a disk not in CONTINUOUS (a guest starved of CPU by a loaded host can lose
    block events, and then its disk resyncs, as it must); what the disks said is in the failure."""
    deadline = time.monotonic() + 1800
    seen: list[str] = []
    while True:
        r = vm.ssh(f"{MOBILITY} point --json", timeout=900)
        doc = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
        if r.returncode == 0 and doc.get("ok"):
            return doc
        disks = agent_status(vm).get("replication", {}).get("disks", [])
        seen.append(f"{r.stderr.strip()[:200]} / {[(d.get('disk'), d.get('state'), d.get('detail')) for d in disks]}")
        if time.monotonic() > deadline:
            raise AssertionError("no point in 30 min:\n" + "\n".join(seen[-10:]))
        time.sleep(10)


def recovery_report(vm: VM) -> dict[str, dict[str, Any]]:
    """`mobility recovery-check --json` in a failed-over machine: each check by name."""
    r = vm.run(f"{MOBILITY} recovery-check --json", timeout=1500)
    doc, _ = json.JSONDecoder().raw_decode(r.output[r.output.index("{") :])  # the console may add lines after it
    assert r.code == 0 and doc["ok"] is True, r.output
    return {c["name"]: c for c in doc["checks"]}


def assert_database_recovered(output: str) -> None:
    """The agent's PostgreSQL check said the cluster replayed its WAL and is consistent."""
    assert "WAL replayed (redo starts at " in output, output
    assert "pg_amcheck --all: no corruption" in output, output
    assert "pgbench invariant holds in database bench" in output, output


def booted_test_failover(server: LabServer, host_id: str, point_id: str) -> dict[str, Any]:
    """`mobility-server test-failover --boot --json` of a point: its report, which must say ok."""
    argv = ["test-failover", "--machine", host_id, "--point", point_id, "--boot", "--json"]
    r = server.cli(*argv, "--boot-timeout", "15m", "--check-timeout", "25m", check=False, timeout=3600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    report, _ = json.JSONDecoder().raw_decode(r.stdout)
    assert report["ok"] is True, report
    return report  # type: ignore[no-any-return]


def test_a_database_under_load_fails_over_to_points_that_recover(
    lab: Lab, server: LabServer, dist: Path, tmp_path: Path
) -> None:
    # The source: root LVM over two disks, the agent bootstrapped as a template clone would be.
    db = lab.vm("db", image(PG), server.spec(hostname="db", blank_disks=(1024,), cpu=CRYPTO_CPU))
    lab.start(db)
    db.wait_booted()
    root = grow_root_onto(db, "/dev/vdb")
    assert {s.pv for s in root} == {"/dev/vda3", "/dev/vdb"}
    install_bootstrapper(db, dist, server, server.token())
    started = db.ssh("systemctl start mobility-bootstrap.service", timeout=900)
    assert started.returncode == 0, started.stderr
    source = wait_registered(server, set(), "db")["host_id"]
    # The agent installed its PostgreSQL check; the operator adds one of their own.
    assert db.run("head -c 200 /etc/mobility/recovery.d/postgresql").output.startswith(BUILTIN_HEADER)
    put = db.ssh("install -m 755 /dev/stdin /etc/mobility/recovery.d/20-marks", stdin=MARKS_CHECK.encode())
    assert put.returncode == 0, put.stderr
    db.run("cd / && runuser -u postgres -- createdb bench", timeout=120).check("createdb")
    db.run("cd / && runuser -u postgres -- pgbench -i -q -s 5 bench", timeout=900).check("pgbench -i")
    sql(db, "CREATE TABLE marks (n int PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())")
    sql(db, "CREATE TABLE ticks (n int PRIMARY KEY)")
    db.run("install -d -o postgres -m 755 /var/lib/marks").check()
    put = db.ssh("install -m 755 /dev/stdin /usr/local/bin/ticker", stdin=TICKER.encode())
    assert put.returncode == 0, put.stderr

    # Protected whole: both disks, an initial sync, CONTINUOUS.
    server.cli("protect", "--machine", source, "--all-disks")
    row = server.wait_continuous(source, 2)
    assert row.report is not None and sorted(d.disk for d in row.report.disks) == ["/dev/vda", "/dev/vdb"]

    # Issue 20 item 8 on a real kernel: the LV over both disks and /boot frozen together, crash-consistent.
    idle = cut_point(db)
    assert (idle["consistency"], idle["frozen"]) == ("crash-consistent", EXPECTED_FROZEN), idle
    logged = db.run(f"grep -F 'point {idle['point_id']} cut' /var/log/mobility/agent.log").check()
    assert "cut (crash-consistent): froze / (xfs on /dev/vda, /dev/vdb); /boot (ext4 on /dev/vda) for " in logged

    # pgbench runs while points are cut; right before each, the test commits a row it records.
    db.run("systemd-run --unit pgbench --uid postgres pgbench -c 2 -j 1 -T 3600 bench").check("pgbench")
    db.run("systemd-run --unit ticker --uid postgres /usr/local/bin/ticker").check("ticker")
    points: list[tuple[str, int]] = []
    for n in (1, 2):
        before = int(sql(db, "SELECT count(*) FROM pgbench_history"))
        ticks = int(sql(db, "SELECT count(*) FROM ticks"))
        deadline = time.monotonic() + 120
        while int(sql(db, "SELECT count(*) FROM pgbench_history")) < before + 50 or (
            int(sql(db, "SELECT count(*) FROM ticks")) < ticks + 10
        ):
            assert time.monotonic() < deadline, "pgbench or the ticker commits nothing"
            time.sleep(2)
        sql(db, f"INSERT INTO marks (n) VALUES ({n:d})")  # noqa: S608 - an int the test chose
        db.run(f"mkdir -p /var/lib/marks && echo {n} > /var/lib/marks/last && sync /var/lib/marks/last").check()
        point = cut_point(db)
        assert (point["consistency"], point["frozen"]) == ("crash-consistent", EXPECTED_FROZEN), point
        for unit in ("pgbench", "ticker"):  # under load all along
            assert db.run(f"systemctl is-active {unit}").output.strip() == "active", unit
        points.append((point["point_id"], n))
    db.kill()  # the source is gone, as in a disaster: no clean shutdown (and no wait on PostgreSQL's checkpoint)

    listed = json.loads(server.cli("points", "--machine", source, "--json").stdout)
    assert {p for p, _ in points} <= {p["point_id"] for p in listed}
    seen = server.machine(source)
    assert seen is not None
    # The latest point as an operator tests one: booted by the server, isolated, its own checks run in it.
    report = booted_test_failover(server, source, points[1][0])
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == {"postgresql", "20-marks"}, checks
    assert all(c["ok"] is True for c in checks.values()), checks
    assert_database_recovered(checks["postgresql"]["output"])
    assert_newest_commit_recovered(checks["20-marks"]["output"])
    assert checks["20-marks"]["output"].endswith("marks: row 2 (committed before the point) found 1 time(s)\n")
    assert [s["step"] for s in report["steps"]] == [
        "materialise",
        "prepare",
        "boot",
        "check 20-marks",
        "check postgresql",
        "destroy",
    ]
    assert 0 < report["rto_seconds"] <= report["seconds"]

    # The earlier point as a real failover (an operator may choose any point), booted from failover's images with a
    # route to the server.
    images = server.fail_over(source, points[0][0], tmp_path / "failover")
    real = boot_point(
        lab,
        "real",
        image(PG),
        images,
        failover_mark("failover", source, points[0][0]),
        server.forwards(),
        cpu=CRYPTO_CPU,
    )
    lab.start(real)
    real.wait_booted()

    # It registers as a machine of its own, failover_of the source, at its point.
    made = wait_registered(server, {source}, "db", timeout=900)
    assert (made["failover_of"], made["failover_point"], made["cloned_from"]) == (source, points[0][0], None)
    assert agent_status(real)["host_id"] == made["host_id"]

    # It recovers: PostgreSQL replays its WAL and is consistent, and holds the row committed before its point.
    checks = recovery_report(real)
    assert set(checks) == {"postgresql", "20-marks"}, checks
    assert checks["postgresql"]["outcome"] == "passed", checks["postgresql"]
    assert_database_recovered(checks["postgresql"]["output"])
    assert_newest_commit_recovered(checks["20-marks"]["output"])
    assert checks["20-marks"]["summary"] == "marks: row 1 (committed before the point) found 1 time(s)"
    assert sql(real, "SELECT max(n) FROM marks") == "1\n"

    # The source's record is as the source left it, with its points; nothing else registered.
    now = server.machine(source)
    assert now is not None and (now["last_seen"], now["health_report"]) == (seen["last_seen"], seen["health_report"])
    assert {m["host_id"] for m in server.machines()} == {source, made["host_id"]}
    assert json.loads(server.cli("points", "--machine", source, "--json").stdout) == listed
