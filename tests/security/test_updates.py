"""Self-update as an attacker meets it: another machine (or a passphrase holder) reporting on a machine's upgrade job,
hostile values for rollouts and pins, a server that names a hostile update, and poisoned update state on a source
machine (the version ends up in a unit name, a path and a command line)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import RemoteError
from agent.host.paths import Paths
from agent.lifecycle.registration import heartbeat, report_job
from agent.shared import wire
from agent.update.state import Phase, TargetRecord, load_record, load_target, save_target
from scripts.polling import wait_for
from tests.bundle_factory import make_bundle
from tests.integration.serverproc import ServerProcess, error_code, raw_call, server_cli, start_server
from tests.security.sandbox import error_id, install, make_root, mobility, unpacked_bundle
from tests.security.test_api import cert_of, host_id_of, registered

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    s = start_server(tmp_path / "data", heartbeat_interval=2.0)
    yield s
    s.stop()


def cli(server: ServerProcess, *args: str) -> Any:
    r = server_cli(server.data, *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_only_the_machine_itself_reports_on_its_upgrade_job(server: ServerProcess, tmp_path: Path) -> None:
    """B cannot fail A's upgrade (which would pin A and halt the rollout), nor can a passphrase holder; a job B makes
    up for itself changes no rollout and pins nobody."""
    a = registered(server, tmp_path, "a", "a1" * 16)
    b = registered(server, tmp_path, "b", "b1" * 16)
    server_cli(server.data, "repo", "add", str(make_bundle(tmp_path / "bundles", "DEBIAN12", "0.1.1")), check=True)
    rollout = cli(server, "update", "--to", "0.1.1", "--machines", host_id_of(a))
    (member,) = rollout["machines"]
    job_id = member["job_id"]
    answer = heartbeat(Paths(a), {"status": "healthy", "time": time.time(), "checks": []})
    assert answer["update"] == {"version": "0.1.1", "job_id": job_id, "pinned": False}
    assert "update" not in heartbeat(Paths(b), {"status": "healthy", "time": time.time(), "checks": []})

    forged = {"kind": "upgrade", "state": "failed", "hostname": "a", "job_id": job_id, "error_id": "UPDATE-CRASHED"}
    status, doc = raw_call(server, "POST", wire.JOBS_PATH, json.dumps(forged).encode(), cert=cert_of(b))
    assert (status, error_code(doc)) == (403, "JOB-NOT-OWNED")
    with pytest.raises(RemoteError) as refused:
        report_job(Paths(tmp_path / "nobody"), forged, server.address, server.passphrase(), server.fingerprint)
    assert refused.value.id == "JOB-NOT-OWNED"
    own = {"kind": "upgrade", "state": "failed", "hostname": "b", "error_id": "UPDATE-CRASHED"}
    report_job(Paths(b), own)
    (now,) = cli(server, "updates")
    assert now["state"] == "running" and now["machines"][0]["state"] == "offered"
    # Then A itself moves to 0.1.1 and says so: the rollout pass that completes the rollout (every 2 s) reads what B
    # reported too, and a failure or a pin it had caused would stay (a failed member never succeeds again).
    beat = {"host_id": host_id_of(a), "agent_version": "0.1.1", "health": {"status": "healthy", "time": time.time()}}
    status, _ = raw_call(server, "POST", wire.HEARTBEAT_PATH, json.dumps(beat).encode(), cert=cert_of(a))
    assert status == 200
    report_job(Paths(a), {"kind": "upgrade", "state": "succeeded", "hostname": "a", "job_id": job_id})
    now = wait_for("the rollout pass to complete the rollout", lambda: (r := cli(server, "updates")[0])["state"] ==
                   "completed" and r, 30)  # fmt: skip
    assert [(m["host_id"], m["state"], m["error_id"]) for m in now["machines"]] == [(host_id_of(a), "succeeded", None)]
    assert {m["host_id"]: m["pinned"] for m in server.machines()} == {host_id_of(a): None, host_id_of(b): None}


def test_hostile_rollout_and_pin_values_change_nothing(server: ServerProcess, tmp_path: Path) -> None:
    a = registered(server, tmp_path, "a", "a2" * 16)
    server_cli(server.data, "repo", "add", str(make_bundle(tmp_path / "bundles", "DEBIAN12", "0.1.1")), check=True)
    refused = [
        ("update", "--to", "../../etc", "--all"),
        ("update", "--to", "0.1.1;reboot", "--all"),
        ("update", "--to", "0.1.1\nExecStart=/bin/sh", "--all"),
        ("update", "--to", "0.1.1", "--machines", "../a"),
        ("update", "--to", "0.1.1", "--machines", f"{host_id_of(a)}\x1b[2J"),
        ("update", "--to", "0.1.1", "--machines", host_id_of(a).upper()),
        ("update", "--to", "0.1.1", "--os-tag", "DEBIAN12\x07"),
        ("update", "--to", "0.1.1", "--all", "--os-tag", "DEBIAN12"),
        ("update", "--to", "0.1.1", "--all", "--wave", "0%"),
        ("update", "--to", "0.1.1", "--all", "--wave", "101%"),
        ("update", "--to", "0.1.1", "--all", "--wave", "1e9"),
        ("update", "--to", "0.1.1", "--all", "--wave-timeout", "-5m"),
        ("update", "--to", "0.1.1", "--all", "--halt"),
        ("pin", "not-a-host-id"),
        ("pin", host_id_of(a), "--to", "0.1.1/../../x"),
        ("unpin", "' OR 1=1 --"),
    ]
    for args in refused:
        r = server_cli(server.data, *args)
        assert r.returncode == 2 and r.stderr.startswith("error ") and "Traceback" not in r.stderr, (args, r.stderr)
        assert "\x1b" not in r.stderr
    for args, code in (
        (("update", "--to", "0.9.9", "--all"), "ROLLOUT-NO-BUNDLE"),
        (("update", "--to", "0.1.1", "--os-tag", "RHEL9"), "ROLLOUT-NO-MACHINES"),
        (("update", "--halt"), "ROLLOUT-NOT-RUNNING"),
        (("pin", "11111111-1111-4111-8111-111111111111"), "MACHINE-NOT-FOUND"),
    ):
        r = server_cli(server.data, *args)
        assert r.stderr.startswith(f"error {code}:"), (args, r.stderr)
    assert cli(server, "updates") == []
    (machine,) = server.machines()
    assert (machine["pinned"], machine["target_version"]) == (None, None)
    # A pin's reason is the operator's text: kept escaped, never a terminal escape or a line of its own.
    (pinned,) = cli(server, "pin", host_id_of(a), "--reason", "\x1b[31mred\nforged line")
    (machine,) = server.machines()
    for shown in (pinned["pin_reason"], machine["pin_reason"], server_cli(server.data, "updates", check=True).stdout):
        assert "\x1b" not in shown and "\nforged" not in shown


def test_every_refusal_of_a_rollout_or_a_pin_tells_the_operator_what_to_do(
    server: ServerProcess, tmp_path: Path
) -> None:
    """Each way `update`, `pin` and `unpin` refuse a command line they could parse, one command each: its own
    remediation, for the operator at the server (never the agent's `mobility configure`, never the bare "see
    --help", which only a command line argparse cannot parse gets: a number past its bounds, such as --max-failures 0,
    is argparse's refusal, tests/security/test_server_commands.py)."""
    a = registered(server, tmp_path, "a", "a3" * 16)
    server_cli(server.data, "repo", "add", str(make_bundle(tmp_path / "bundles", "DEBIAN12", "0.1.1")), check=True)
    unknown = "11111111-1111-4111-8111-111111111111"
    refusals = [
        ("update", "--halt", "--all"),
        ("update", "--all"),
        ("update", "--to", "0.1.1"),
        ("update", "--to", "0.1.1", "--os-tag", "NOT-A-TAG"),
        ("update", "--to", "0.1.1;reboot", "--all"),
        ("update", "--to", "0.1.1", "--all", "--wave", "0%"),
        ("update", "--to", "0.1.1", "--all", "--wave-timeout", "5x"),
        ("update", "--to", "0.1.1", "--machines", "../a"),
        ("update", "--to", "0.1.1", "--machines", unknown),
        ("update", "--to", "0.9.9", "--all"),
        ("update", "--to", "0.1.1", "--os-tag", "RHEL9"),
        ("update", "--halt"),
        ("pin", unknown),
        ("unpin", unknown),
    ]
    fixes: dict[str, tuple[str, ...]] = {}
    for args in refusals:
        r = server_cli(server.data, *args)
        assert r.returncode != 0 and r.stderr.startswith("error "), (args, r.stderr)
        (fix,) = [
            line.strip().removeprefix("fix: ") for line in r.stderr.splitlines() if line.strip().startswith("fix:")
        ]
        assert "mobility configure" not in fix and "--help" not in fix, (args, fix)
        fixes.setdefault(fix, ())
        fixes[fix] += (" ".join(args),)
    shared = {
        fix: cmds
        for fix, cmds in fixes.items()
        if len(cmds) > 1 and not all("unknown" in c or unknown in c for c in cmds)
    }
    assert not shared, shared  # only an unknown machine is the same refusal wherever it is named
    r = server_cli(server.data, "pin", unknown)
    assert r.stderr.startswith("error MACHINE-NOT-FOUND:") and "mobility-server machines" in r.stderr
    assert cli(server, "updates") == [] and host_id_of(a)


def test_a_server_that_names_a_hostile_update_is_not_followed(tmp_path: Path) -> None:
    """The heartbeat answer is input too: a version that is not dotted numbers or a job that is not a UUID is
    refused where it enters (agent/shared/wire.py), and nothing is recorded for the watcher or the bootstrapper."""
    for field in (
        {"version": "../../../etc"},
        {"version": "0.1.1", "job_id": "x; rm -rf /"},
        {"version": "0.1.1\n", "job_id": None},
        {"version": 11},
        {"version": "0.1.1", "pinned": "yes"},
        ["0.1.1"],
    ):
        with pytest.raises(wire.WireError):
            wire.UpdateTarget.from_json(field)


@pytest.mark.parametrize(
    "poison",
    [
        {"version": "0.1.1/../../../etc", "job_id": "11111111-1111-4111-8111-111111111111"},
        {"version": "0.1.1\nExecStart=/bin/sh", "job_id": "11111111-1111-4111-8111-111111111111"},
        {"version": "0.1.1", "job_id": "../x"},
        "not json",
        "fifo",
        "huge",
    ],
)
def test_poisoned_update_state_reads_as_nothing_to_do(poison: object, tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    assert install(root, unpacked_bundle(tmp_path / "bundle")).returncode == 0
    paths = Paths(root)
    state = root / "var/lib/mobility"
    for name in ("target.json", "update.json"):
        path = state / name
        if poison == "fifo":
            os.mkfifo(path)
        elif poison == "huge":
            path.write_bytes(b"{" + b" " * (2 << 20) + b"}")
        elif isinstance(poison, str):
            path.write_text(poison)
        else:
            record = {**poison, "from_version": "0.1.0", "to_version": poison["version"], "phase": "watching",
                      "started": 1.0}  # fmt: skip
            path.write_text(json.dumps(poison if name == "target.json" else record))
    target = load_target(paths)
    assert target is None or target.job_id is None  # a version that is not one, or a job that is not one
    assert load_record(paths) is None
    r = mobility("upgrade", "--root", str(root), "--json")  # nothing to do, and it says so: no hang, no traceback
    assert (r.returncode, json.loads(r.stdout)["state"]) == (0, "nothing to do"), r.stderr
    assert not (state / "upgrade.from").exists()
    units = {p.name for p in (root / "etc/systemd/system").rglob("mobility-upgrade@*")}
    assert units == {"mobility-upgrade@.service"}  # the template only: no instance named after a poisoned version


def test_the_update_state_is_written_only_inside_the_root(tmp_path: Path) -> None:
    """A root whose state directory is an absolute link: the target and the record land inside the root."""
    from tests.security.test_root_escapes import hostile_root, inside

    root, host = hostile_root(tmp_path)
    paths = Paths(root)
    save_target(paths, TargetRecord("0.1.1", "11111111-1111-4111-8111-111111111111"))
    assert inside(root, host, "var/lib/mobility/target.json").is_file()
    assert not (host / "var/lib/mobility/target.json").exists()
    assert Phase("watching").switched
    r = mobility("upgrade", "--root", str(root))
    assert error_id(r) == "AGENT-NOT-INSTALLED" and "Traceback" not in r.stderr
    assert not (host / "var/lib/mobility/update.json").exists()
