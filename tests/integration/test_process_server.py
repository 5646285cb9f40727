"""The process server for real: `mobility-server serve` on loopback, a registered machine streaming chunks over
mutual TLS with the agent's own stream client, acknowledgements that mean durable, and kill -9 at any moment."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ProcessServerUnreachable, RemoteError, ReplicaLost
from agent.host.paths import Paths
from agent.lifecycle.registration import authenticated_client
from agent.replication.chunks import Geometry, RootHasher, chunk_hash, zero_hash
from agent.replication.stream import Stream
from agent.shared.address import ServerAddress
from agent.shared.replication_wire import Codec, Hello, Kind, PointClose
from server.process.store import ChunkStore
from tests.conftest import require_root
from tests.integration.serverproc import (
    ServerProcess,
    configure_root,
    open_storage,
    sandbox_root,
    secret_file,
    start_server,
)

pytestmark = pytest.mark.integration

CHUNK = 64 * 1024
DISK = "/dev/sdb"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    require_root()
    s = start_server(tmp_path / "data", heartbeat_interval=2.0)
    yield s
    s.stop()


def machine(server: ServerProcess, tmp_path: Path, name: str = "m1", protect: bool = True) -> Paths:
    root = sandbox_root(tmp_path / name, os.urandom(16).hex())
    code, out = configure_root(server, root, secret_file(tmp_path / f"{name}.pass", server.passphrase()))
    assert code == 0, out
    if protect:
        storage = open_storage(server.data)
        try:
            storage.protect(str(out["host_id"]), [DISK], False, "default", False, time.time())
        finally:
            storage.close()
    return Paths(root)


def stream_for(server: ServerProcess, paths: Paths) -> Stream:
    _, client = authenticated_client(paths)
    return Stream(ServerAddress("127.0.0.1", server.process_port), client.context, timeout=10)


def host_of(paths: Paths) -> str:
    import json

    return str(json.loads(paths.identity.read_text())["host_id"])


def send_chunk(stream: Stream, index: int, data: bytes) -> int:
    return stream.send(Kind.CHUNK, data, flags=Codec.RAW, offset=index * CHUNK, size=len(data), digest=chunk_hash(data))


def test_chunks_are_acknowledged_after_they_are_durable_and_a_point_closes(
    server: ServerProcess, tmp_path: Path
) -> None:
    paths = machine(server, tmp_path)
    size = 8 * CHUNK
    stream = stream_for(server, paths)
    welcome = stream.connect(Hello(DISK, size, CHUNK))
    assert (welcome.acked_seq, welcome.known) == (0, False)
    disk = [os.urandom(CHUNK) if i % 2 else bytes(CHUNK) for i in range(8)]
    for i, data in enumerate(disk):
        if any(data):
            send_chunk(stream, i, data)
    root = RootHasher(Geometry(size, CHUNK))
    root.update(b"".join(chunk_hash(c) for c in disk))
    import uuid

    point = PointClose(str(uuid.uuid4()), time.time(), root.hexdigest(), "crash-consistent", (DISK,), 3.0)
    import json

    stream.send(Kind.POINT, json.dumps(point.to_json()).encode())
    assert stream.drain(20)
    stream.close()
    store = ChunkStore(server.data / "process")
    try:
        found = store.resolve_point(host_of(paths), "latest")
        assert found.point_id == point.point_id
        manifest = store.manifest(found.disks[0])
        assert manifest == b"".join(chunk_hash(c) for c in disk)
        for i, data in enumerate(disk):
            assert store.read(manifest[i * 32 : (i + 1) * 32], CHUNK) == data
    finally:
        store.close()
    assert server.stop() == 0  # a clean shutdown: the committer drained and stopped


def test_kill_9_mid_stream_loses_nothing_acknowledged(server: ServerProcess, tmp_path: Path) -> None:
    """The server is killed at random moments while a machine streams; every chunk it acknowledged before a kill
    is in the replica after the restart, and the stream resumes from the server's last durable sequence."""
    paths = machine(server, tmp_path)
    count = 64
    size = count * CHUNK
    rng = random.Random(15)  # noqa: S311 - reproducible test data, not secrets
    latest: dict[int, bytes] = {}  # chunk index -> the data of its newest acknowledged write
    in_flight: dict[int, list[bytes]] = {}  # sent, neither acknowledged nor handed back yet
    stream = stream_for(server, paths)
    stream.connect(Hello(DISK, size, CHUNK))

    def send(index: int, data: bytes) -> None:
        def acked() -> None:
            latest[index] = data
            in_flight[index].remove(data)

        in_flight.setdefault(index, []).append(data)
        stream.send(
            Kind.CHUNK,
            data,
            flags=Codec.RAW,
            offset=index * CHUNK,
            size=CHUNK,
            digest=chunk_hash(data),
            on_ack=acked,
            on_lost=lambda: in_flight[index].remove(data),
        )

    acked_at_kills = []
    for kill in range(4):
        deadline = time.monotonic() + rng.uniform(0.3, 1.2)
        while time.monotonic() < deadline:
            send(rng.randrange(count), rng.randbytes(CHUNK))
        stream.pump(0)
        snapshot = dict(latest)
        maybe = {i: list(d) for i, d in in_flight.items()}  # committed perhaps, not acknowledged yet
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)
        acked_at_kills.append(len(snapshot))
        restarted = start_server(server.data, heartbeat_interval=2.0)
        server.proc, server.port = restarted.proc, restarted.port
        store = ChunkStore(server.data / "process")
        try:
            row = store.disk(host_of(paths), DISK)
            assert row is not None and row.acked_seq >= stream.acked
            head = store.head(row)
            for index, data in snapshot.items():
                got = bytes(head[index * 32 : (index + 1) * 32])
                allowed = {chunk_hash(d): d for d in [data, *maybe.get(index, [])]}
                assert got in allowed, f"kill {kill}: the acknowledged write of chunk {index} is lost"
                assert store.read(got, CHUNK) == allowed[got]
        finally:
            store.close()
        stream.address = ServerAddress("127.0.0.1", server.process_port)
        for attempt in range(50):
            try:
                stream.connect(Hello(DISK, size, CHUNK))  # what the server made durable settles, the rest is lost
                break
            except ProcessServerUnreachable:
                time.sleep(0.1 * (attempt + 1))
    assert stream.drain(30)
    assert all(acked_at_kills) and not any(in_flight.values())


def test_an_unprotected_disk_is_refused(server: ServerProcess, tmp_path: Path) -> None:
    paths = machine(server, tmp_path, protect=False)
    stream = stream_for(server, paths)
    with pytest.raises(RemoteError) as e:
        stream.connect(Hello(DISK, CHUNK, CHUNK))
    assert e.value.id == "REPL-NOT-PROTECTED"


def test_the_replica_hashes_come_back_for_a_checksum_resync(server: ServerProcess, tmp_path: Path) -> None:
    paths = machine(server, tmp_path)
    size = 3 * CHUNK + 4096
    stream = stream_for(server, paths)
    stream.connect(Hello(DISK, size, CHUNK))
    data = os.urandom(CHUNK)
    send_chunk(stream, 1, data)
    assert stream.drain(10)
    got: list[tuple[int, bytes]] = []
    welcome = stream.connect(Hello(DISK, size, CHUNK, want_hashes=True), lambda start, h: got.append((start, h)))
    assert welcome.known and welcome.acked_seq == 1
    assert got == [(0, zero_hash(CHUNK) + chunk_hash(data) + zero_hash(CHUNK) + zero_hash(4096))]
    # The store is replaced by an empty one (a restore, a store moved aside): it holds less than it acknowledged.
    stream.close()
    assert server.stop() == 0
    (server.data / "process").rename(server.data / "process.old")
    restarted = start_server(server.data, heartbeat_interval=2.0)
    server.proc, server.port = restarted.proc, restarted.port
    stream.address = ServerAddress("127.0.0.1", server.process_port)
    with pytest.raises(ReplicaLost):
        stream.connect(Hello(DISK, size, CHUNK))


def test_one_process_server_per_store_and_api_instances_send_agents_to_it(
    server: ServerProcess, tmp_path: Path
) -> None:
    """Instances that share a data directory share its chunk store, which one process server writes: a second
    `serve --role process` is refused (PS-STORE-BUSY); a second plain `serve` serves the API only and takes the
    process server role over once the first stops. `serve --role api --process-address HOST:PORT` runs the API
    only and tells protected machines where the process server is."""
    import json
    import subprocess
    import sys

    from scripts.localserver import server_log, start_local_server
    from tests.conftest import REPO
    from tests.integration.serverproc import raw_call

    paths = machine(server, tmp_path)
    cert = (paths.client_cert, paths.client_key)
    body = json.dumps({"host_id": host_of(paths), "agent_version": "0.1.0"}).encode()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "server", "serve", "--data", str(server.data), *args]
        return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60, check=False)

    r = run("--listen", "127.0.0.1:0", "--role", "process")
    assert r.returncode == 1 and "error PS-STORE-BUSY:" in r.stderr, r.stderr
    r = run("--role", "api")
    assert r.returncode == 2 and "error USAGE:" in r.stderr and "--process-address" in r.stderr
    api_proc, address, _ = start_local_server(
        server.data, "--role", "api", "--process-address", f"127.0.0.1:{server.process_port}"
    )
    standby, standby_address, _ = start_local_server(server.data)
    try:
        api = ServerProcess(server.data, api_proc, int(address.rsplit(":", 1)[1]), server.fingerprint)
        status, answer = raw_call(api, "POST", "/v1/heartbeat", body, cert=cert)
        assert status == 200 and answer["protection"]["process"] == {"host": "127.0.0.1", "port": server.process_port}
        second = ServerProcess(server.data, standby, int(standby_address.rsplit(":", 1)[1]), server.fingerprint)
        status, answer = raw_call(second, "POST", "/v1/heartbeat", body, cert=cert)
        assert status == 200 and "protection" not in answer  # it does not know where: it says nothing
        stream = stream_for(server, paths)  # the one process server takes the stream
        stream.connect(Hello(DISK, CHUNK, CHUNK))
        stream.close()
        assert server.stop() == 0  # the role's holder stops: the standby takes it over
        deadline = time.monotonic() + 60
        while "(the role taken over)" not in server_log(server.data).read_text():
            assert time.monotonic() < deadline and standby.poll() is None, "no takeover"
            time.sleep(0.5)
        stream = stream_for(server, paths)  # process_port: the last one the log names, the standby's
        stream.connect(Hello(DISK, CHUNK, CHUNK))
        stream.close()
        status, answer = raw_call(second, "POST", "/v1/heartbeat", body, cert=cert)
        assert answer["protection"]["process"]["port"] == server.process_port
    finally:
        for proc in (api_proc, standby):
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0


def test_pause_resume_and_a_new_policy_as_the_docs_write_them_keep_the_disks(
    server: ServerProcess, tmp_path: Path
) -> None:
    """`protect --machine web1 --pause | --resume` (docs/replication.md) needs no --disk: the machine keeps the disks
    it protects, and its next heartbeat answer says paused (or not); --policy alone changes only the policy. A machine
    that protects nothing is told to name its disks."""
    from agent.lifecycle.registration import heartbeat
    from tests.integration.serverproc import server_cli, wait_for

    paths = machine(server, tmp_path, "web1")
    hostname = (paths.root / "etc" / "hostname").read_text().strip()

    def answered() -> tuple[object, object]:
        protection = heartbeat(paths, {"status": "healthy", "checks": []})["protection"]
        return protection["paused"], protection["disks"]

    for flag, paused in (("--pause", True), ("--resume", False), ("--pause", True)):
        r = server_cli(server.data, "protect", "--machine", hostname, flag)
        assert r.returncode == 0 and DISK in r.stdout and ("(paused)" in r.stdout) is paused, r.stderr
        wait_for(f"the heartbeat answer after {flag}", lambda want=paused: answered() == (want, [DISK]))
    assert server_cli(server.data, "policy", "set", "gold", "--interval", "10m").returncode == 0
    r = server_cli(server.data, "protect", "--machine", hostname, "--policy", "gold")
    assert r.returncode == 0 and "policy gold (paused)" in r.stdout, r.stderr
    row = open_storage(server.data)
    try:
        now = row.protection(host_of(paths))
        assert now is not None and (now.disks, now.all_disks, now.paused, now.policy.name) == (
            (DISK,),
            False,
            True,
            "gold",
        )
    finally:
        row.close()
    assert server_cli(server.data, "unprotect", "--machine", hostname).returncode == 0
    for flag in ("--pause", "--resume"):
        r = server_cli(server.data, "protect", "--machine", hostname, flag)
        assert (r.returncode, r.stderr.split(":")[0]) == (2, "error PROTECT-DISK-INVALID"), r.stderr
    r = server_cli(server.data, "protect", "--machine", hostname)
    assert (r.returncode, r.stderr.split(":")[0]) == (2, "error PROTECT-DISK-INVALID"), r.stderr


def test_a_renewed_certificate_ends_the_old_stream_and_the_disk_carries_on_with_the_new_one(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A disk's replicator streams with the machine's certificate; the machine renews it and uses the new one. The
    process server ends the stream of the replaced certificate within seconds (CERT-SUPERSEDED), and the replicator
    reconnects with the new certificate, back in CONTINUOUS without the error."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    from agent.lifecycle.registration import heartbeat, renew_certificate
    from agent.replication.devices import BlockDevice
    from agent.replication.sync import DiskReplicator
    from tests.integration.serverproc import wait_for

    paths = machine(server, tmp_path)
    backing = tmp_path / "disk.img"
    backing.write_bytes(os.urandom(8 * CHUNK))
    loop = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    try:
        st = os.stat(loop)
        device = BlockDevice(DISK, Path(loop), os.major(st.st_rdev), os.minor(st.st_rdev), Path(loop).name)
        (tmp_path / "state").mkdir()

        def context() -> Any:
            return authenticated_client(paths)[1].context

        stream = Stream(ServerAddress("127.0.0.1", server.process_port), context(), timeout=10)
        with ThreadPoolExecutor(2) as pool:
            replicator = DiskReplicator(device, tmp_path / "state", stream, pool, boot_id="boot", context=context)
            replicator.start()
            try:
                wait_for("the initial sync", lambda: replicator.state == "CONTINUOUS", timeout=60)
                renew_certificate(paths)
                heartbeat(paths, {"status": "healthy"})  # the new certificate's first use: the old one is replaced
                wait_for("the old stream's end", lambda: replicator.error == "CERT-SUPERSEDED", timeout=15)
                wait_for(
                    "the stream of the new certificate",
                    lambda: replicator.error is None and replicator.stream.connected,
                    timeout=15,
                )
                assert replicator.state == "CONTINUOUS"
            finally:
                replicator.stop()
                replicator.join(30)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False, timeout=30)
