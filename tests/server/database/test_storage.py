"""The data-access layer (server/database/storage.py and the aggregates it sums) on both engines (a SQLite file
and a real PostgreSQL 15): schema migrations, one-transaction enrolment, who may write a job, monotonic heartbeats,
shared nonces and failure counts, certificate revocation."""

from __future__ import annotations

import itertools
import json
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from agent.lifecycle.identity import new_key_and_csr
from agent.shared.wire import HealthReport, MachineFacts
from server.database import migrations
from server.database.connection import parse_database
from server.database.heartbeats import Beat
from server.database.machines import NewMachine, key_id
from server.database.migrations.legacy import SCHEMA_V1
from server.database.schema import metadata
from server.database.storage import Storage
from server.errors import (
    CertRevoked,
    CertSuperseded,
    DatabaseMissing,
    DatabaseSchemaNewer,
    DatabaseSchemaOld,
    DatabaseUrlInvalid,
    JobNotOwned,
    UnknownMachine,
)
from tests.conftest import REPO

FACTS = MachineFacts(machine_id="ab" * 16, product_uuid="4c4c4544-0000")
V2_FIXTURE = REPO / "tests" / "resources" / "db" / "mobility-v2.db"


def public_pem() -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    _, csr = new_key_and_csr(None)
    key = x509.load_pem_x509_csr(csr).public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def new_machine(host_id: str = "11111111-1111-4111-8111-111111111111", **changes: object) -> NewMachine:
    fields: dict[str, object] = {
        "host_id": host_id,
        "hostname": "web1",
        "os_tag": "DEBIAN12",
        "role": "MS",
        "platform": "VmWare",
        "agent_version": "0.1.0",
        "facts": FACTS,
        "cloned_from": None,
        "cert_serial": "1f",
        "cert_not_after": 2e9,
        "public_key": public_pem(),
        "enrol_token_id": None,
        "heartbeat_interval": 30.0,
    }
    fields.update(changes)
    return NewMachine(**fields)  # type: ignore[arg-type]


@pytest.fixture
def storage(database: str) -> Storage:
    s = Storage.open(parse_database(database), create=True)
    yield s  # type: ignore[misc]
    s.close()


def execute(storage: Storage, sql: str, **params: object) -> None:
    with storage.transaction() as tx:
        tx.conn.execute(text(sql), params)


def test_a_missing_database_is_refused_unless_created(tmp_path: Path) -> None:
    db = parse_database(str(tmp_path / "mobility.db"))
    with pytest.raises(DatabaseMissing):
        Storage.open(db)
    assert not (tmp_path / "mobility.db").exists()
    Storage.open(db, create=True).close()
    assert (tmp_path / "mobility.db").stat().st_mode & 0o777 == 0o600


def test_an_empty_database_is_refused_unless_created(database: str) -> None:
    if database.startswith("sqlite"):
        Path(database.removeprefix("sqlite:///")).touch(mode=0o600)
    with pytest.raises(DatabaseMissing):
        Storage.open(parse_database(database))
    Storage.open(parse_database(database), create=True).close()
    Storage.open(parse_database(database)).close()


def test_the_migrated_schema_is_the_one_the_queries_use(storage: Storage) -> None:
    """Every table, column and index of server/database/schema.py exists after the migrations, on both engines."""
    with storage.engine.connect() as conn:
        found = inspect(conn)
        for table in metadata.sorted_tables:
            columns = {c["name"] for c in found.get_columns(table.name)}
            assert columns == {c.name for c in table.columns}, table.name
            indexes = {i["name"] for i in found.get_indexes(table.name)}
            assert {i.name for i in table.indexes} <= indexes, table.name
        assert migrations.current(conn) == migrations.HEAD


def test_the_known_revisions_are_alembics() -> None:
    assert migrations.alembic_revisions() == (list(migrations.REVISIONS), migrations.HEAD)


def test_urls_with_passwords_are_refused() -> None:
    with pytest.raises(DatabaseUrlInvalid):
        parse_database("postgresql://mobility:hunter2@db.example/mobility")
    with pytest.raises(DatabaseUrlInvalid):
        parse_database("postgresql://mobility@db.example")  # no database name
    with pytest.raises(DatabaseUrlInvalid):
        parse_database("mysql://x@y/z")
    db = parse_database("postgresql://mobility@db.example:5433/fleet")
    assert (db.postgresql, str(db)) == (True, "postgresql+psycopg://mobility@db.example:5433/fleet")
    for url in (
        "postgresql://mobility@db.example/fleet?password=hunter2",
        "postgresql://mobility@db.example/fleet?sslmode=require&sslpassword=hunter2",
        "postgresql://mobility@db.example/fleet?passwd=hunter2",  # not a libpq parameter: its value is not shown
        "postgresql://mobility:hunter2@db.example:notaport/fleet",
        "postgresql://mobility:hunter2@[::1/fleet",
        "postgresql://mobility@db.example:0/fleet",
        "host=db.example dbname=fleet password=hunter2",
        "sqlite://mobility:hunter2@host/x.db",
    ):
        with pytest.raises(DatabaseUrlInvalid) as refused:
            parse_database(url)
        assert "hunter2" not in refused.value.message, url
    # What a URL may carry besides: libpq's other parameters, recorded and shown as given.
    db = parse_database("postgresql://mobility@/fleet?host=/run/postgresql&passfile=/etc/mobility/pgpass")
    assert (
        str(db) == "postgresql+psycopg://mobility@/fleet?host=%2Frun%2Fpostgresql&passfile=%2Fetc%2Fmobility%2Fpgpass"
    )
    assert parse_database("postgres://mobility@[::1]:5433/fleet").postgresql


def test_a_database_made_by_the_sqlite_only_server_upgrades_in_place(tmp_path: Path) -> None:
    """tests/resources/db/mobility-v2.db was written by the server before Alembic (PRAGMA user_version 2): three
    machines (one enrolled with a token), two jobs, a token and a retired passphrase. `upgrade` keeps all of it."""
    path = tmp_path / "mobility.db"
    shutil.copy(V2_FIXTURE, path)
    before = sqlite3.connect(path)
    counts = {t: before.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("machines", "jobs", "tokens")}  # noqa: S608
    keys = dict(before.execute("SELECT host_id, public_key FROM machines").fetchall())
    before.close()
    assert counts == {"machines": 3, "jobs": 2, "tokens": 1}
    db = parse_database(str(path))
    with pytest.raises(DatabaseSchemaOld):
        Storage.open(db)  # a server never runs on an old schema: `upgrade` first
    assert Storage.upgrade(db) == ("legacy", migrations.HEAD)
    s = Storage.open(db)
    try:
        machines = {m.host_id: m for m in s.machines()}
        assert len(machines) == 3 and {m: x.public_key for m, x in machines.items()} == keys
        healthy = [m for m in machines.values() if m.health is not None]
        assert [(m.hostname, m.health.status) for m in healthy] == [("fixture-0", "healthy")]  # type: ignore[union-attr]
        found = s.find_by_facts(MachineFacts(machine_id="b2" * 16, product_uuid="uuid-1"))
        assert found is not None and found.enrol_token_id is not None
        assert s.host_enrolled_with(found.enrol_token_id) == found.host_id
        token = s.token(found.enrol_token_id)
        assert token is not None and token[2] == 4  # five uses, one taken by the enrolment
        assert [(j.kind, j.state) for j in s.jobs()] == [("install", "succeeded"), ("push", "running")]
        assert s.retired_passphrases(1_790_000_000.0) == ["old fixture passphrase"]
        # The key index was filled from the stored keys: a retried enrolment finds its machine by key.
        for m in machines.values():
            with s.transaction() as tx:
                again = tx.machine_with_key(key_id(m.public_key or ""))
            assert again is not None and again.host_id == m.host_id
    finally:
        s.close()
    assert Storage.upgrade(db) == (migrations.HEAD, migrations.HEAD)  # a second upgrade changes nothing


def test_a_version_1_database_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "mobility.db"
    old = sqlite3.connect(path)
    old.executescript(SCHEMA_V1)
    host = "22222222-2222-4222-8222-222222222222"
    old.execute(
        "INSERT INTO machines VALUES (?, 'db1', 'DEBIAN12', 'MS', 'VmWare', '0.1.0', ?, NULL, 1, 'a', 2e9, NULL, 30, "
        "NULL)",
        (host, json.dumps(FACTS.to_json())),
    )
    old.execute("INSERT INTO jobs VALUES ('j1', ?, 'db1', 'install', 'running', NULL, NULL, NULL, 1, 1)", (host,))
    old.commit()
    old.close()
    Storage.upgrade(parse_database(str(path)))
    s = Storage.open(parse_database(str(path)))
    found = s.find_by_facts(FACTS)
    assert found is not None and found.host_id == host
    assert found.public_key is None  # an old record holds no key: it cannot be taken over by a key proof either
    # A job written before jobs had owners: only its own host may update it.
    common = {"job_id": "j1", "host_id": None, "hostname": "db1", "kind": "install", "error_id": None}
    with pytest.raises(JobNotOwned):
        s.report_job(principals=["passphrase"], state="failed", remediation=None, detail=None, now=2, **common)
    s.report_job(principals=[f"host:{host}"], state="succeeded", remediation=None, detail=None, now=2, **common)
    s.close()


def test_the_token_use_and_the_machine_are_one_transaction(storage: Storage) -> None:
    storage.add_token("tok000000001", "secret", None, 1, 0.0)
    with pytest.raises(IntegrityError):  # the machine cannot be written (NOT NULL): the use is not taken
        storage.enrol_machine(new_machine(hostname=None, enrol_token_id="tok000000001"), 1.0)
    assert storage.token("tok000000001") == ("secret", None, 1)
    assert storage.enrol_machine(new_machine(enrol_token_id="tok000000001"), 1.0)
    assert storage.token("tok000000001") == ("secret", None, 0)
    other = "33333333-3333-4333-8333-333333333333"
    assert not storage.enrol_machine(new_machine(other, enrol_token_id="tok000000001"), 2.0)  # used up
    assert storage.machine(other) is None
    storage.add_token("unlimited001", "secret", None, None, 0.0)
    assert storage.enrol_machine(new_machine(other, enrol_token_id="unlimited001"), 2.0)
    assert storage.host_enrolled_with("unlimited001") == other


def test_concurrent_enrolments_never_overdraw_a_token(storage: Storage) -> None:
    storage.add_token("tok000000002", "secret", None, 5, 0.0)
    results: list[bool] = []
    lock = threading.Lock()

    def enrol(i: int) -> None:
        ok = storage.enrol_machine(new_machine(f"44444444-4444-4444-8444-{i:012d}", enrol_token_id="tok000000002"), 1.0)
        with lock:
            results.append(ok)

    threads = [threading.Thread(target=enrol, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == [False] * 11 + [True] * 5
    assert storage.token("tok000000002") == ("secret", None, 0)
    assert len(storage.machines()) == 5


def test_job_owners(storage: Storage) -> None:
    a, b = "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa", "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb"
    storage.add_token("pushtoken001", "s", None, 1, 0.0)
    storage.enrol_machine(new_machine(a), 0.0)
    storage.enrol_machine(new_machine(b, enrol_token_id="pushtoken001"), 0.0)
    job = {"hostname": "h", "kind": "install", "error_id": None, "remediation": None, "detail": None}
    mine = storage.report_job(principals=[f"host:{a}"], job_id=None, host_id=a, state="running", now=1, **job)
    with pytest.raises(JobNotOwned):
        storage.report_job(principals=[f"host:{b}"], job_id=mine, host_id=b, state="failed", now=2, **job)
    with pytest.raises(JobNotOwned):
        storage.report_job(principals=["passphrase"], job_id=mine, host_id=None, state="failed", now=2, **job)
    recorded = storage.job(mine)
    assert recorded is not None and (recorded.host_id, recorded.state, recorded.owner) == (a, "running", f"host:{a}")

    push = storage.record_job(job_id=None, host_id=None, state="running", now=1, owner="token:pushtoken001", **job)
    with pytest.raises(JobNotOwned):
        storage.report_job(principals=[f"host:{a}"], job_id=push, host_id=a, state="succeeded", now=2, **job)
    storage.report_job(principals=[f"host:{b}"], job_id=push, host_id=b, state="succeeded", now=2, **job)
    storage.report_job(principals=["token:pushtoken001"], job_id=push, host_id=None, state="failed", now=3, **job)
    recorded = storage.job(push)
    assert recorded is not None and (recorded.host_id, recorded.state) == (b, "failed")


def test_stored_documents_that_are_not_what_they_should_be_read_as_unknown(storage: Storage) -> None:
    host = "cccccccc-cccc-4ccc-8ccc-cccccccccccc"
    storage.enrol_machine(new_machine(host), 0.0)
    for health, facts in (("[1, 2]", "5"), ('{"status": "fine"}', '{"macs": [1]}'), ("{", "{")):
        execute(storage, "UPDATE machines SET health = :h, facts = :f WHERE host_id = :id", h=health, f=facts, id=host)
        m = storage.machine(host)
        assert m is not None and (m.health, m.facts) == (None, MachineFacts())


def test_an_older_heartbeat_never_overwrites_a_newer_one(storage: Storage) -> None:
    """Two instances flush independently: the one holding the older beat may write last."""
    host = "dddddddd-dddd-4ddd-8ddd-dddddddddddd"
    storage.enrol_machine(new_machine(host), 0.0)
    storage.record_heartbeats([Beat(host, 200.0, "0.2.0", '{"status": "healthy"}')])
    storage.record_heartbeats([Beat(host, 100.0, "0.1.0", '{"status": "critical"}')])
    m = storage.machine(host)
    assert m is not None and (m.last_seen, m.agent_version, m.health.status if m.health else None) == (
        200.0,
        "0.2.0",
        "healthy",
    )
    storage.record_history([(host, 50.0, 201.0, HealthReport("critical", 50.0))])
    m = storage.machine(host)
    assert m is not None and m.health is not None and m.health.status == "healthy"  # history is not current
    assert [(r[0], r[2].status if r[2] else None) for r in storage.history(host)] == [(50.0, "critical")]


def test_nonces_are_used_once_and_failures_are_counted_for_every_instance(database: str) -> None:
    a = Storage.open(parse_database(database), create=True)
    b = Storage.open(parse_database(database))  # a second instance on the same database
    try:
        assert a.use_nonce("n1", 100.0)
        assert not b.use_nonce("n1", 100.0)
        a.record_failure("10.0.0.1", 10.0)
        b.record_failure("10.0.0.1", 11.0)
        b.record_failure("10.0.0.2", 11.0)
        assert a.failures("10.0.0.1", 5.0) == (2, 10.0)
        assert a.failures("10.0.0.1", 10.5) == (1, 11.0)
        assert a.prune(101.0) == 1  # the expired nonce; the failures are kept for an hour
        assert b.use_nonce("n1", 200.0)  # pruned after it expired: its ID could be used again, but its MAC could not
    finally:
        a.close()
        b.close()


def test_revoked_removed_and_superseded_certificates(storage: Storage) -> None:
    host = "eeeeeeee-eeee-4eee-8eee-eeeeeeeeeeee"
    storage.enrol_machine(new_machine(host, cert_serial="a1"), 0.0)
    assert storage.present_certificate(host, "A1").host_id == host  # OpenSSL's upper-case form
    storage.renew_certificate(host, "b2", 3e9, public_pem())
    assert storage.present_certificate(host, "a1").host_id == host  # the renewal's answer may have been lost
    storage.renew_certificate(host, "c3", 3e9, public_pem())
    assert storage.present_certificate(host, "c3").host_id == host  # first use of the new one: it is current
    for old in ("a1", "b2"):
        with pytest.raises(CertSuperseded):
            storage.present_certificate(host, old)
    m = storage.machine(host)
    assert m is not None and (m.cert_serial, m.pending_serial) == ("c3", None)
    assert storage.revoke(host, 5.0) and not storage.revoke(host, 6.0)
    with pytest.raises(CertRevoked):
        storage.present_certificate(host, "c3")
    assert storage.remove(host) and not storage.remove(host)
    with pytest.raises(UnknownMachine):
        storage.present_certificate(host, "c3")


def test_a_newer_schema_is_refused(storage: Storage) -> None:
    execute(storage, "UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(DatabaseSchemaNewer):
        Storage.open(storage.db)


def test_init_refuses_a_database_that_holds_a_server(storage: Storage, tmp_path: Path) -> None:
    """`init` makes a new CA: another server's machines in the database given to it would no longer match it."""
    from server.cli import main

    url = str(storage.db) if storage.postgresql else f"sqlite:///{storage.db.sqlite_path}"
    assert main(["init", "--data", str(tmp_path / "data"), "--database", url]) == 2
    assert not (tmp_path / "data" / ".initialised").exists()


def test_protection_policies_and_reported_status(storage: Storage) -> None:
    """Replication's tables: a policy is read back whole (a bandwidth past 32 bits too), a machine's protection
    comes with its policy in the credentials the heartbeat path reads, an older report never replaces a newer one,
    and protecting again keeps the last report."""
    from agent.shared.replication_wire import DiskReport, Policy, ReplicationReport

    host, other = "ffffffff-ffff-4fff-8fff-ffffffffffff", "12121212-1212-4121-8121-121212121212"
    storage.enrol_machine(new_machine(host), 0.0)
    storage.enrol_machine(new_machine(other, hostname="db1", public_key=public_pem()), 0.0)
    assert storage.policy("default") == Policy() and storage.policy("gold") is None
    gold = Policy("gold", 60.0, 120.0, 1 << 40, 7)
    storage.set_policy(gold)
    storage.set_policy(Policy("gold", 60.0, 120.0, 1 << 40, 8))
    assert storage.policy("gold") == Policy("gold", 60.0, 120.0, 1 << 40, 8)
    assert [p.name for p in storage.policies()] == ["default", "gold"]

    storage.protect(host, ["/dev/sdb", "/dev/sdc"], False, "gold", False, 10.0)
    row = storage.protection(host)
    assert row is not None and (row.disks, row.all_disks, row.paused, row.policy.retention) == (
        ("/dev/sdb", "/dev/sdc"),
        False,
        False,
        8,
    )
    assert row.covers("/dev/sdc") and not row.covers("/dev/sdd")
    credentials = storage.credentials([host, other])
    assert credentials[host].protection == row and credentials[other].protection is None

    report = ReplicationReport((DiskReport("/dev/sdb", "CONTINUOUS", throughput_bps=1.0),), points=3)
    older = ReplicationReport((DiskReport("/dev/sdb", "STALLED", throughput_bps=0.0),))
    storage.record_replication([(host, 200.0, json.dumps(report.to_json()))])
    storage.record_replication([(host, 100.0, json.dumps(older.to_json())), (other, 100.0, "{}")])
    assert storage.protection(host).report == report  # type: ignore[union-attr]
    storage.protect(host, ["/dev/sdb"], False, "gold", True, 20.0)
    row = storage.protection(host)
    assert row is not None and (row.disks, row.paused, row.report) == (("/dev/sdb",), True, report)
    assert storage.protection(other) is None  # a report from a machine that protects nothing is not kept

    # Pause, resume and a new policy change only those: the disks and the report stay.
    assert storage.change_protection(host, 30.0, paused=False)
    assert storage.change_protection(host, 31.0, policy="default")
    row = storage.protection(host)
    assert row is not None and (row.disks, row.paused, row.policy.name, row.report) == (
        ("/dev/sdb",),
        False,
        "default",
        report,
    )
    assert storage.change_protection(other, 32.0, paused=True) is False and storage.protection(other) is None

    execute(storage, "UPDATE protection SET report = :r", r='{"disks": [{"disk": "/etc/shadow"}]}')
    assert storage.protection(host).report is None  # type: ignore[union-attr]
    assert [p.host_id for p in storage.protections()] == [host]
    assert storage.remove(host) and storage.protections() == []
    assert storage.unprotect(host) is False


def test_every_migration_is_taken_back_and_made_again(database: str) -> None:
    """`alembic downgrade` (an operator going back a version, on a copy or after a failed upgrade) leaves the schema of
    each older revision, down to an empty database; upgrading again gives the schema the server declares."""
    from alembic import command

    def tables(conn: object) -> dict[str, set[str]]:
        found = inspect(conn)
        return {t: {c["name"] for c in found.get_columns(t)} for t in found.get_table_names() if t != "alembic_version"}

    s = Storage.open(parse_database(database), create=True)
    try:
        with s.engine.connect() as conn, conn.begin():
            head = tables(conn)
            assert head == {t.name: {c.name for c in t.columns} for t in metadata.sorted_tables}
            seen = []
            for revision in reversed(("base", *migrations.REVISIONS[:-1])):
                command.downgrade(migrations._config(conn), revision)
                seen.append(tables(conn))
                assert migrations.current(conn) == (None if revision == "base" else revision)
            assert seen[-1] == {} and all(len(a) >= len(b) for a, b in itertools.pairwise(seen))
            assert "key_id" not in seen[-2]["machines"] and "target_version" in seen[-4]["machines"]
            migrations.upgrade(conn)
            assert tables(conn) == head
    finally:
        s.close()


def test_the_fleet_as_the_dashboard_reads_it(storage: Storage) -> None:
    """One narrow read of every machine: the health status from the head of its report (a report stored in another
    shape is read whole; one that is not a report is unknown), the protection with its report as stored."""
    ids = [f"{n}{n}{n}{n}{n}{n}{n}{n}-1111-4111-8111-111111111111" for n in range(1, 6)]
    for n, h in enumerate(ids):
        storage.enrol_machine(new_machine(h, hostname=f"m{n}", facts=MachineFacts(machine_id=f"{n:032x}")), 0.0)
    storage.record_heartbeats([Beat(ids[0], 10.0, "0.1.0", json.dumps({"status": "critical", "checks": []}))])
    storage.record_heartbeats([Beat(ids[1], 10.0, "0.1.0", '{"checks": [], "status": "warning"}')])  # another order
    storage.record_heartbeats([Beat(ids[2], 10.0, "0.1.0", "not a report")])
    storage.protect(ids[3], ["/dev/sdb"], False, "default", True, 5.0)
    storage.record_replication([(ids[3], 11.0, '{"disks": []}')])
    rows = {r.host_id: r for r in storage.fleet()}
    assert [rows[h].health for h in ids] == ["critical", "warning", "unknown", None, None]
    assert rows[ids[3]].policy is not None and rows[ids[3]].policy.name == "default" and rows[ids[3]].paused
    assert (rows[ids[3]].reported_at, rows[ids[3]].report_json) == (11.0, '{"disks": []}')
    assert rows[ids[0]].policy is None and rows[ids[0]].online(20.0) and not rows[ids[0]].online(200.0)


def test_a_machines_jobs_and_the_newest_of_a_kind_or_state(storage: Storage) -> None:
    host = "11111111-1111-4111-8111-111111111111"
    for n, (kind, state) in enumerate(
        [("install", "succeeded"), ("upgrade", "failed"), ("test-failover", "succeeded"), ("push", "failed")]
    ):
        storage.record_job(job_id=f"j{n}", host_id=host if n < 3 else None, hostname="web1", kind=kind, state=state,
                           error_id=None, remediation=None, detail=None, now=float(n))  # fmt: skip
    assert [j.job_id for j in storage.jobs_for(host)] == ["j2", "j1", "j0"]
    assert [j.job_id for j in storage.jobs_for(host, limit=1)] == ["j2"]
    assert [j.job_id for j in storage.recent_jobs(kind="test-failover")] == ["j2"]
    assert [j.job_id for j in storage.recent_jobs(states=("failed", "succeeded with warnings"))] == ["j3", "j1"]
    assert [j.job_id for j in storage.recent_jobs(states=("failed",), limit=1)] == ["j3"]
