"""server/storage.py on a real SQLite file: schema versions, one-transaction enrolment, who may write a job."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from agent.shared.wire import MachineFacts
from server.errors import DatabaseMissing, JobNotOwned
from server.storage import _SCHEMA_V1, SCHEMA_VERSION, NewMachine, Storage

FACTS = MachineFacts(machine_id="ab" * 16, product_uuid="4c4c4544-0000")


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
        "public_key": "-----BEGIN PUBLIC KEY-----\n...",
        "enrol_token_id": None,
        "heartbeat_interval": 30.0,
    }
    fields.update(changes)
    return NewMachine(**fields)  # type: ignore[arg-type]


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(tmp_path / "mobility.db", create=True)


def test_a_missing_database_is_refused_unless_created(tmp_path: Path) -> None:
    with pytest.raises(DatabaseMissing):
        Storage(tmp_path / "mobility.db")
    assert not (tmp_path / "mobility.db").exists()
    Storage(tmp_path / "mobility.db", create=True).close()
    assert (tmp_path / "mobility.db").stat().st_mode & 0o777 == 0o600


def test_a_version_1_database_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "mobility.db"
    old = sqlite3.connect(path)
    old.executescript(_SCHEMA_V1)
    host = "22222222-2222-4222-8222-222222222222"
    old.execute(
        "INSERT INTO machines VALUES (?, 'db1', 'DEBIAN12', 'MS', 'VmWare', '0.1.0', ?, NULL, 1, 'a', 2e9, NULL, 30, "
        "NULL)",
        (host, json.dumps(FACTS.to_json())),
    )
    old.execute("INSERT INTO jobs VALUES ('j1', ?, 'db1', 'install', 'running', NULL, NULL, NULL, 1, 1)", (host,))
    old.commit()
    old.close()
    s = Storage(path)
    assert s.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    found = s.find_by_facts(FACTS)
    assert found is not None and found.host_id == "22222222-2222-4222-8222-222222222222"
    assert found.public_key is None  # an old record holds no key: it cannot be taken over by a key proof either
    # A job written before jobs had owners: only its own host may update it.
    common = {"job_id": "j1", "host_id": None, "hostname": "db1", "kind": "install", "error_id": None}
    with pytest.raises(JobNotOwned):
        s.report_job(principals=["passphrase"], state="failed", remediation=None, detail=None, now=2, **common)
    s.report_job(
        principals=["host:22222222-2222-4222-8222-222222222222"],
        state="succeeded",
        remediation=None,
        detail=None,
        now=2,
        **common,
    )
    s.close()
    Storage(path).close()  # opening again changes nothing


def test_the_token_use_and_the_machine_are_one_transaction(storage: Storage) -> None:
    storage.add_token("tok000000001", "secret", None, 1, 0.0)
    with pytest.raises(sqlite3.IntegrityError):  # the machine cannot be written (NOT NULL): the use is not taken
        storage.enrol_machine(new_machine(hostname=None, enrol_token_id="tok000000001"), 1.0)
    assert storage.token("tok000000001") == ("secret", None, 1)
    assert storage.enrol_machine(new_machine(enrol_token_id="tok000000001"), 1.0)
    assert storage.token("tok000000001") == ("secret", None, 0)
    other = "33333333-3333-4333-8333-333333333333"
    assert not storage.enrol_machine(new_machine(other, enrol_token_id="tok000000001"), 2.0)  # used up
    assert storage.machine(other) is None
    storage.add_token("unlimited001", "secret", None, None, 0.0)
    assert storage.enrol_machine(new_machine(other, enrol_token_id="unlimited001"), 2.0)
    rows = storage.db.execute("SELECT host_id FROM machines WHERE enrol_token_id = 'unlimited001'").fetchall()
    assert rows == [(other,)]


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
        storage.db.execute("UPDATE machines SET health = ?, facts = ? WHERE host_id = ?", (health, facts, host))
        m = storage.machine(host)
        assert m is not None and (m.health, m.facts) == (None, MachineFacts())
