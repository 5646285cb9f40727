"""The configuration server on a full disk: a real server whose data directory is a small tmpfs, filled up."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.host.paths import Paths
from agent.lifecycle.identity import new_key_and_csr
from agent.lifecycle.registration import heartbeat
from agent.shared import wire
from scripts.localserver import server_log
from tests.conftest import require_root
from tests.integration.serverproc import (
    ServerProcess,
    configure_root,
    error_code,
    raw_call,
    sandbox_root,
    secret_file,
    server_cli,
    start_server,
    wait_for,
)
from tests.postgres import new_cluster, on_postgresql

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    require_root()
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(where: Path) -> Path:
    """Write a file until the filesystem is full; return it (delete it to free the space)."""
    filler = where / "filler"
    block = b"\0" * (64 * 1024)
    with filler.open("wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(block)
                f.flush()
        with contextlib.suppress(OSError):
            while True:  # the last partial block
                os.write(f.fileno(), b"\0" * 512)
    return filler


def enrol_body(server: ServerProcess, machine_id: str) -> bytes:
    _, csr = new_key_and_csr(None)
    nonce = str(raw_call(server, "POST", wire.NONCE_PATH, b"")[1]["nonce"])
    req = wire.EnrolRequest(
        csr=csr.decode(),
        nonce=nonce,
        proof=wire.enrol_proof(server.passphrase(), nonce, csr),
        hostname="full-disk",
        os_tag="DEBIAN12",
        role="MS",
        platform="VmWare",
        facts=wire.MachineFacts(machine_id=machine_id),
        agent_version="0.1.0",
    )
    return json.dumps(req.to_json()).encode()


def test_full_disk_gives_json_errors_with_ids_and_loses_nothing(small_disk: Path, tmp_path: Path) -> None:
    """On SQLite the database's disk fills up; on PostgreSQL (MOBILITY_TEST_DATABASE=postgresql) the database server
    goes away (a cluster of this test's own, stopped and started again). Either way the server cannot write."""
    cluster = new_cluster() if on_postgresql() else None
    server = start_server(
        small_disk / "data", heartbeat_interval=2.0, database=cluster.new_database() if cluster else None
    )
    try:
        root = sandbox_root(tmp_path / "m", "1f" * 16)
        code, out = configure_root(server, root, secret_file(tmp_path / "pass", server.passphrase()))
        assert code == 0, out
        passphrase = server.passphrase()
        heartbeat(Paths(root), {"status": "healthy", "checks": []})  # the server has seen it: it vouches for it
        if cluster is not None:
            cluster.stop()
        else:
            filler = fill(small_disk)
            with pytest.raises(OSError) as full:
                (small_disk / "probe").write_bytes(b"x" * 8192)
            assert full.value.errno == errno.ENOSPC

        if cluster is not None:  # with the database gone, even a nonce (the rate limit reads it) is refused
            status, doc = raw_call(server, "POST", wire.NONCE_PATH, b"")
        else:
            status, doc = raw_call(server, "POST", wire.ENROL_PATH, enrol_body(server, "2f" * 16))
        assert (status, error_code(doc)) == (503, "DB-UNAVAILABLE"), doc
        r = server_cli(server.data, "token", "create", "--ttl", "1h")
        assert (r.returncode, r.stderr.split(":")[0]) == (1, "error DB-UNAVAILABLE"), r.stderr
        assert "Traceback" not in r.stderr
        # Heartbeats are answered from memory meanwhile, and kept until they can be written.
        heartbeat(Paths(root), {"status": "warning", "checks": []})

        if cluster is not None:
            cluster.start()
        else:
            filler.unlink()
            (small_disk / "probe").unlink(missing_ok=True)
        assert passphrase == server.passphrase()
        # The first call after the database came back may find a dead pooled connection (503, retried).
        status, doc = wait_for(
            "an enrolment to succeed",
            lambda: (r := raw_call(server, "POST", wire.ENROL_PATH, enrol_body(server, "3f" * 16)))[0] == 200 and r,
            timeout=30,
        )
        assert status == 200, doc
        assert server_cli(server.data, "token", "create", "--ttl", "1h").returncode == 0
        machines = wait_for(
            "the kept heartbeat to be written",
            lambda: [m for m in server.machines() if m["health"] == "warning"],
            timeout=10,
        )
        assert len(machines) == 1
        assert {m["hostname"] for m in server.machines()} == {"host-1f1f1f", "full-disk"}
    finally:
        server.stop()
        print(server_log(server.data).read_text()[-3000:])  # shown when the test fails: it lives on the tmpfs
        if cluster is not None:
            cluster.remove()
