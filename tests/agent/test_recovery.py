"""Recovery checks (agent/recovery/): what runs, in which order and environment, how long, what it reports; the
PostgreSQL check's parsing; `mobility recovery-check` as a user meets it. The PostgreSQL check against a real cluster
is tests/integration/test_recovery_postgresql.py; inside a failed-over VM, tests/integration/test_vm_protection.py."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from agent.host.paths import Paths
from agent.lifecycle.failover import Failover
from agent.recovery.builtins import BUILTIN_HEADER, builtin_script, install_builtin_checks
from agent.recovery.postgresql import (
    PostgresqlCheck,
    find_clusters,
    invariant,
    parse_lsclusters,
    replay_summary,
    socket_dir,
)
from agent.recovery.runner import (
    Outcome,
    run_recovery_checks,
    runnable_name,
    tail,
)
from tests.agent.test_cli import mobility
from tests.conftest import require_root

POINT = "0b7f1a52-3c1e-4f57-9a0e-2f1d6c7b8e90"
SOURCE = "5d9c7f3e-1b2a-4c8d-9e0f-a1b2c3d4e5f6"


def check(root: Path, name: str, body: str, mode: int = 0o755) -> Path:
    d = root / "etc/mobility/recovery.d"
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(mode)
    return path


def test_names_and_files_that_are_not_run_are_reported_skipped(tmp_path: Path) -> None:
    check(tmp_path, "20-app", "exit 0")
    check(tmp_path, "10-db.sh", "exit 0")
    check(tmp_path, "30-app.dpkg-old", "exit 0")  # package leftovers and editor backups are never run
    check(tmp_path, "40-backup~", "exit 0")
    check(tmp_path, "50-notes", "exit 0", mode=0o644)
    (tmp_path / "etc/mobility/recovery.d/60-dir").mkdir()
    report = run_recovery_checks(Paths(tmp_path), None)
    assert [(r.name, r.outcome.value, r.summary) for r in report.results] == [
        ("10-db.sh", "passed", "exit 0"),
        ("20-app", "passed", "exit 0"),
        ("30-app.dpkg-old", "skipped", "not a name run-parts runs"),
        ("40-backup~", "skipped", "not a name run-parts runs"),
        ("50-notes", "skipped", "not an executable file"),
        ("60-dir", "skipped", "not an executable file"),
    ]
    assert report.failed == [] and run_recovery_checks(Paths(tmp_path / "none"), None).results == ()
    assert not runnable_name(".hidden") and not runnable_name("a b") and runnable_name("a_b-c.d")


def test_each_check_passes_or_fails_by_its_exit_code_in_name_order(tmp_path: Path) -> None:
    check(tmp_path, "b-fails", "echo looking; echo 'orders table: 3 rows missing' >&2; exit 4")
    check(tmp_path, "a-passes", "echo all good")
    report = run_recovery_checks(Paths(tmp_path), None)
    assert [(r.name, r.outcome) for r in report.results] == [("a-passes", Outcome.PASSED), ("b-fails", Outcome.FAILED)]
    failed = report.results[1]
    assert failed.summary == "exit 4: orders table: 3 rows missing"
    assert failed.output == "looking\norders table: 3 rows missing\n"
    assert report.failed == ["b-fails"] and report.to_json()["ok"] is False
    assert report.results[0].summary == "all good" and report.results[0].origin == "/etc/mobility/recovery.d/a-passes"


def test_a_check_past_its_time_is_killed_with_what_it_started(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    check(tmp_path, "slow", f"sleep 300 & echo $! > {pidfile}; echo started; wait")
    start = time.monotonic()
    report = run_recovery_checks(Paths(tmp_path), None, timeout=1.5)
    assert time.monotonic() - start < 10
    (slow,) = report.results
    assert slow.outcome is Outcome.FAILED and slow.summary == "killed after 2 s (its time budget)"
    assert "started" in slow.output
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists(), "the check's own child outlived it"


def test_a_check_learns_the_failover_it_runs_in(tmp_path: Path) -> None:
    out = tmp_path / "env"
    check(tmp_path, "env", f"{{ pwd; env | grep -E '^MOBILITY_(CHECK|FAILOVER)' | sort; }} > {out}")
    failover = Failover(True, POINT, SOURCE, 1.0)
    run_recovery_checks(Paths(tmp_path), failover, timeout=77)
    assert out.read_text().splitlines() == [
        "/",
        "MOBILITY_CHECK_TIMEOUT=77",
        "MOBILITY_FAILOVER=test",
        f"MOBILITY_FAILOVER_POINT={POINT}",
        f"MOBILITY_FAILOVER_SOURCE={SOURCE}",
    ]


def test_output_is_kept_to_its_tail(tmp_path: Path) -> None:
    check(tmp_path, "chatty", "i=0; while [ $i -lt 40000 ]; do echo line $i; i=$((i+1)); done; echo last words; exit 1")
    (chatty,) = run_recovery_checks(Paths(tmp_path), None).results
    assert len(chatty.output.encode()) <= 16 * 1024
    assert chatty.output.endswith("line 39999\nlast words\n") and chatty.output.startswith("line ")
    assert chatty.summary == "exit 1: last words"
    assert tail(b"abc\ndef\n", 5) == "def\n"


def test_only_runs_the_named_checks(tmp_path: Path) -> None:
    check(tmp_path, "a", "exit 0")
    check(tmp_path, "b", "exit 1")
    report = run_recovery_checks(Paths(tmp_path), None, only=["a"])
    assert [r.name for r in report.results] == ["a"]


def test_install_writes_the_built_in_checks_and_leaves_an_operator_s_alone(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    launcher = "/opt/mobility/current/mobility/mobility"
    assert install_builtin_checks(paths, launcher) == ["/etc/mobility/recovery.d/postgresql"]
    script = tmp_path / "etc/mobility/recovery.d/postgresql"
    assert script.read_text() == builtin_script("postgresql", launcher) and script.stat().st_mode & 0o777 == 0o755
    assert script.read_text().startswith(BUILTIN_HEADER)
    assert script.read_text().splitlines()[-1] == (
        f'exec {launcher} recovery-check --builtin postgresql --timeout "${{MOBILITY_CHECK_TIMEOUT:-540}}"'
    )
    assert install_builtin_checks(paths, launcher) == []  # as it is: nothing written
    script.chmod(0o644)  # the operator turned it off; an install into another directory keeps it off
    assert install_builtin_checks(paths, "/srv/m/current/mobility/mobility") == ["/etc/mobility/recovery.d/postgresql"]
    assert "/srv/m/current" in script.read_text() and script.stat().st_mode & 0o777 == 0o644
    script.write_text("#!/bin/sh\n# our own PostgreSQL check\nexit 0\n")
    assert install_builtin_checks(paths, launcher) == [] and "our own" in script.read_text()


# The PostgreSQL check's parsing ---------------------------------------------------------------------------------


def test_parse_lsclusters() -> None:
    log = "/var/log/postgresql/postgresql-15-main.log"
    text = (
        f"15  main    5432 online,recovery postgres /var/lib/postgresql/15/main {log}\n"
        "15  archive 5433 down   postgres /srv/pg/archive\n"
        "garbage line\n"
    )
    assert parse_lsclusters(text) == [
        ("15", "main", 5432, "online,recovery", "postgres", "/var/lib/postgresql/15/main", log),
        ("15", "archive", 5433, "down", "postgres", "/srv/pg/archive", None),
    ]


def test_socket_dir_from_the_configuration() -> None:
    assert socket_dir("") == "/var/run/postgresql"
    conf = "#unix_socket_directories = '/tmp'\nunix_socket_directories = '/run/pg, /tmp'\n"
    assert socket_dir(conf) == "/run/pg"
    assert socket_dir("unix_socket_directories = '@abstract'\n") == "/var/run/postgresql"


def test_replay_summary_reads_the_last_start() -> None:
    crashed = (
        "LOG:  starting PostgreSQL 15.8\nLOG:  redo starts at 0/1000\nLOG:  redo done at 0/2000\n"
        "LOG:  starting PostgreSQL 15.8\n"
        "LOG:  database system was not properly shut down; automatic recovery in progress\n"
        "LOG:  redo starts at 0/3A1F2B8\nLOG:  redo done at 0/4B00C10 system usage: ...\n"
    )
    assert replay_summary(crashed) == "WAL replayed (redo starts at 0/3A1F2B8, redo done at 0/4B00C10)"
    clean = crashed + "LOG:  starting PostgreSQL 15.8\nLOG:  database system is ready to accept connections\n"
    assert replay_summary(clean) == "its log says nothing about recovery"
    assert replay_summary("LOG: starting PostgreSQL\nLOG: redo is not required\n") == "no WAL to replay"


def test_pgbench_invariant() -> None:
    assert invariant([-4217, -4217, -4217, -4217]) == (True, "each balance sums to -4217")
    assert invariant([5, 5, 4, 5]) == (False, "balances differ: accounts 5, branches 5, tellers 4, history deltas 5")
    # pgbench run again: its history was emptied at the run's start (measured in bench/recovery.py's failed-over VM:
    # three runs, the history held the last one's deltas only). The balances still agree.
    holds, said = invariant([-43823, -43823, -43823, -281886])
    assert holds
    assert said.startswith("accounts, branches and tellers each sum to -43823; the history's deltas to -281886:")
    assert invariant([-43823, -43823, -43830, -281886])[0] is False  # a teller off: torn, whatever the history says
    assert invariant([812, 0, 0, 812]) == (
        True,
        "accounts and the history's deltas each sum to 812 (pgbench -N: no teller, no branch)",
    )
    assert invariant([812, 0, 0, 800])[0] is False


def test_no_postgresql_is_skipped_and_another_layout_fails(tmp_path: Path) -> None:
    result = PostgresqlCheck().run(Paths(tmp_path), 60)
    assert (result.outcome, result.summary) == (Outcome.SKIPPED, "no PostgreSQL on this machine")
    assert find_clusters(Paths(tmp_path)) == ([], "no PostgreSQL on this machine")
    server = tmp_path / "usr/pgsql-16/bin/postgres"  # as PGDG's RPMs lay it out: not postgresql-common's clusters
    server.parent.mkdir(parents=True)
    server.write_text("")
    result = PostgresqlCheck().run(Paths(tmp_path), 60)
    assert result.outcome is Outcome.FAILED
    assert result.summary.startswith("PostgreSQL is installed but not as postgresql-common manages it")


# `mobility recovery-check` -----------------------------------------------------------------------------------------


def mark(root: Path, kind: str) -> None:
    """The failover mark as `failover` writes it into a failed-over machine's root (agent/lifecycle/failover.py)."""
    (root / "etc/mobility").mkdir(parents=True, exist_ok=True)
    doc = {"mark": "mobility-failover", "version": 1, "kind": kind, "host_id": SOURCE, "point_id": POINT}
    (root / "etc/mobility/failover.json").write_text(json.dumps(doc))


def test_recovery_check_refuses_a_machine_that_is_not_a_failover(tmp_path: Path) -> None:
    require_root()
    r = mobility("recovery-check", "--root", str(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith("error RECOVERY-NOT-A-FAILOVER: this machine is not a failover")
    r = mobility("recovery-check", "--root", str(tmp_path), "--here", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["checks"] == []
    r = mobility("recovery-check", "--root", str(tmp_path), "--here", "--builtin", "postgresql")
    assert (r.returncode, r.stdout) == (0, "skipped: no PostgreSQL on this machine\n"), r.stderr
    r = mobility("recovery-check", "--root", str(tmp_path), "--here", "--timeout", "nan")
    assert r.returncode == 2 and r.stderr.startswith("error USAGE: --timeout nan")
    r = mobility("recovery-check", "--root", str(tmp_path), "--here", "--builtin", "oracle")
    assert r.returncode == 2 and r.stderr.startswith("error USAGE: --builtin 'oracle': the built-in checks are")


def test_recovery_check_in_a_failover_reports_each_check(tmp_path: Path) -> None:
    require_root()
    mark(tmp_path, "test")
    check(tmp_path, "orders", "echo 'orders: 1204 rows, newest 2 s before the point'")
    check(tmp_path, "queue", "echo 'queue: 3 messages lost' >&2; exit 1")
    r = mobility("recovery-check", "--root", str(tmp_path))
    assert r.returncode == 1
    assert r.stderr.startswith("error RECOVERY-CHECK-FAILED: recovery checks failed: queue")
    lines = r.stdout.splitlines()
    assert lines[0] == f"this machine is a test failover of {SOURCE} at point {POINT}"
    assert lines[1].startswith("PASSED   orders") and lines[2].startswith("FAILED   queue")
    assert lines[-2:] == ["--- queue (/etc/mobility/recovery.d/queue), its last output:", "queue: 3 messages lost"]
    r = mobility("recovery-check", "--root", str(tmp_path), "--json", "--only", "orders")
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["ok"] is True and [c["name"] for c in doc["checks"]] == ["orders"]
    assert doc["failover"]["kind"] == "test" and doc["failover"]["point_id"] == POINT


@pytest.fixture(autouse=True)
def _no_environment_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MOBILITY_FAILOVER"):
            monkeypatch.delenv(name)
