"""server/database/operators.py on both engines, and `mobility-server operator` and `audit`: a token is shown once and
kept only as a hash, sessions end (and end with their operator), the audit log is written before a change and says how
it ended."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from sqlalchemy import text

from server.database.connection import parse_database
from server.database.operators import Operators
from server.database.storage import Storage
from server.errors import OperatorExists, OperatorInvalid, OperatorNotFound
from tests.integration.serverproc import init_server, server_cli


@pytest.fixture
def operators(database: str) -> Operators:
    s = Storage.open(parse_database(database), create=True)
    yield Operators(s)  # type: ignore[misc]
    s.close()


def test_a_token_is_kept_only_as_its_hash_and_proves_its_operator(operators: Operators) -> None:
    token = operators.add("alice", 100.0)
    other = operators.add("bob", 100.0)
    assert token.startswith("mop_") and token != other
    with operators.storage.reading() as tx:
        stored = " ".join(str(v) for row in tx.conn.execute(text("SELECT * FROM operators")) for v in row)
    assert token not in stored and token.split("_", 2)[2] not in stored  # the secret may hold "_" itself
    assert operators.by_token(token) == "alice" and operators.by_token(other) == "bob"
    forged = token[:-1] + ("A" if token[-1] != "A" else "B")
    for wrong in (forged, "", "mop_", "x" * 10_000, token + "x", token.replace("mop_", "mbt_")):
        assert operators.by_token(wrong) is None, wrong
    with pytest.raises(OperatorExists):
        operators.add("alice", 101.0)
    for name in ("Alice", "-x", "a" * 65, "a b", "", "é"):
        with pytest.raises(OperatorInvalid):
            operators.add(name, 101.0)
    assert [o.name for o in operators.listing()] == ["alice", "bob"]


def test_sessions_end_at_their_time_and_with_their_operator(operators: Operators) -> None:
    operators.add("alice", 0.0)
    session = operators.open_session("alice", 1000.0, 60.0)
    assert operators.session(session, 1059.0) == ("alice", 1060.0)
    assert operators.session(session, 1060.0) is None  # ended
    assert operators.session("", 1000.0) is None and operators.session("x" * 500, 1000.0) is None
    assert operators.prune(1061.0) == 1
    again = operators.open_session("alice", 2000.0, 60.0)
    operators.remove("alice")
    assert operators.session(again, 2001.0) is None  # removing an operator ends its sessions at once
    with pytest.raises(OperatorNotFound):
        operators.remove("alice")


def test_a_certificate_logs_in_only_while_valid(operators: Operators) -> None:
    operators.add("carol", 0.0, cert_fingerprint="sha256:" + "ab" * 32, cert_not_after=500.0)
    assert operators.by_certificate("sha256:" + "ab" * 32, 499.0) == "carol"
    assert operators.by_certificate("sha256:" + "ab" * 32, 501.0) is None
    assert operators.by_certificate("sha256:" + "cd" * 32, 1.0) is None


def test_the_audit_log_is_written_ahead_and_newest_first(operators: Operators) -> None:
    first = operators.audit("alice", "dashboard (session) from 10.0.0.5", "pause protection", "web1 (h)", None, 10.0)
    second = operators.audit(
        "bob", "dashboard (bearer token)", "halt rollout", "the running rollout", "bad\nbuild", 20.0
    )
    operators.finish(second, "done", 21.0)
    entries = operators.audit_log()
    assert [(e.id, e.operator, e.outcome) for e in entries] == [(second, "bob", "done"), (first, "alice", None)]
    assert entries[0].detail == "bad\\nbuild"  # shown as text, never a forged line
    assert len(operators.audit_log(limit=1)) == 1


def test_the_operator_and_audit_commands(tmp_path: Path) -> None:
    data = tmp_path / "data"
    init_server(data)
    added = server_cli(data, "operator", "add", "alice", "--cert-out", str(tmp_path))
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert token.startswith("mop_") and token not in added.stderr and "shown this once" in added.stderr
    for name, mode in (("alice.key", 0o600), ("alice.p12", 0o600), ("alice.crt", 0o644)):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode, name
    listed = json.loads(server_cli(data, "operator", "list", "--json", check=True).stdout)
    assert [(o["name"], o["certificate"].startswith("sha256:")) for o in listed] == [("alice", True)]
    again = server_cli(data, "operator", "add", "alice")
    assert (again.returncode, again.stderr.split(":")[0]) == (2, "error OPERATOR-EXISTS")
    # --cert-out is a directory, and never has a key replaced: nothing is made, no operator added.
    (tmp_path / "bob.key").write_text("someone's key\n")
    for where in (tmp_path / "alice.key", tmp_path):
        other = server_cli(data, "operator", "add", "bob", "--cert-out", str(where))
        assert (other.returncode, other.stderr.split(":")[0]) == (2, "error USAGE"), other.stderr
    assert (tmp_path / "bob.key").read_text() == "someone's key\n" and not (tmp_path / "bob.crt").exists()
    assert "bob" not in server_cli(data, "operator", "list", check=True).stdout
    bad = server_cli(data, "operator", "add", "Not Valid")
    assert (bad.returncode, bad.stderr.split(":")[0]) == (2, "error OPERATOR-INVALID")
    assert server_cli(data, "operator", "remove", "alice").returncode == 0
    gone = server_cli(data, "operator", "remove", "alice")
    assert (gone.returncode, gone.stderr.split(":")[0]) == (2, "error OPERATOR-NOT-FOUND")
    audit = json.loads(server_cli(data, "audit", "--json", check=True).stdout)
    assert [(e["action"], e["target"], e["outcome"].split(":")[0]) for e in audit] == [
        ("remove operator", "alice", "OPERATOR-NOT-FOUND"),
        ("remove operator", "alice", "done"),
        ("add operator", "alice", "done"),
    ]
    assert all(e["via"] == "command line" and "(command line)" in e["operator"] for e in audit)
    table = server_cli(data, "audit", check=True).stdout
    assert "remove operator" in table and token not in table
