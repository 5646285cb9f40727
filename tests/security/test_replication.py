"""The process server's stream and the replication commands as an attacker meets them: a real server on loopback,
registered machines with their own certificates, hostile frames and arguments. Each case must be refused with a
stable error ID, keep every machine's replica as it was, and leave the server serving."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import zstandard

from agent.errors import RemoteError
from agent.host.paths import Paths
from agent.lifecycle.registration import authenticated_client
from agent.replication.chunks import Geometry, RootHasher, chunk_hash
from agent.replication.stream import Stream
from agent.shared.address import ServerAddress
from agent.shared.replication_wire import (
    HEADER,
    Codec,
    Header,
    Hello,
    Kind,
    PointClose,
    StreamError,
    frame,
    json_frame,
)
from server.process.store import RECORD, ChunkStore
from tests.conftest import REPO, require_root
from tests.integration.serverproc import (
    ServerProcess,
    configure_root,
    open_storage,
    raw_call,
    sandbox_root,
    secret_file,
    server_cli,
    start_server,
)
from tests.server.process.stores import locate

pytestmark = pytest.mark.integration

CHUNK = 64 * 1024
DISK = "/dev/sdb"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    require_root()
    s = start_server(tmp_path / "data", heartbeat_interval=2.0)
    yield s
    s.stop()


def machine(server: ServerProcess, tmp_path: Path, name: str, protect: bool = True) -> tuple[Paths, str]:
    root = sandbox_root(tmp_path / name, os.urandom(16).hex())
    code, out = configure_root(server, root, secret_file(tmp_path / f"{name}.pass", server.passphrase()))
    assert code == 0, out
    host_id = str(out["host_id"])
    if protect:
        storage = open_storage(server.data)
        try:
            storage.protect(host_id, [DISK], False, "default", False, time.time())
        finally:
            storage.close()
    return Paths(root), host_id


def connect(server: ServerProcess, paths: Paths | None) -> ssl.SSLSocket:
    if paths is not None:
        _, client = authenticated_client(paths)
        ctx = client.context
    else:
        ctx = ssl.create_default_context(cafile=str(server.data / "ca" / "ca.pem"))
    raw = socket.create_connection(("127.0.0.1", server.process_port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def answer(sock: ssl.SSLSocket) -> list[tuple[Header, bytes]]:
    """Every frame the server sends until it closes the stream (or 10 s pass)."""
    data = b""
    sock.settimeout(10)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError, ssl.SSLError):
        pass
    frames = []
    while len(data) >= HEADER.size:
        h = Header.unpack(data[: HEADER.size])
        frames.append((h, data[HEADER.size : HEADER.size + h.length]))
        data = data[HEADER.size + h.length :]
    return frames


def error_of(frames: list[tuple[Header, bytes]]) -> str | None:
    for h, payload in frames:
        if h.kind is Kind.ERROR:
            return StreamError.from_json(json.loads(payload)).code
    return None


def hello(size: int = 4 * CHUNK, disk: str = DISK) -> bytes:
    return json_frame(Kind.HELLO, Hello(disk, size, CHUNK).to_json())


def chunk(seq: int, index: int, data: bytes, digest: bytes | None = None, codec: Codec = Codec.RAW) -> bytes:
    payload = data if codec is Codec.RAW else zstandard.compress(data, 1)
    return frame(
        Kind.CHUNK, payload, flags=codec, seq=seq, offset=index * CHUNK, size=CHUNK, hash=digest or chunk_hash(data)
    )


def still_serving(server: ServerProcess, paths: Paths) -> None:
    sock = connect(server, paths)
    data = os.urandom(CHUNK)
    sock.sendall(hello() + chunk(1_000_000 + int(time.time() * 1000) % 1000, 0, data))
    sock.settimeout(10)
    got = b""
    while len(got) < 2 * HEADER.size:  # WELCOME (+ its payload) then an ACK
        got += sock.recv(65536)
        h = Header.unpack(got[: HEADER.size])
        rest = got[HEADER.size + h.length :]
        if len(rest) >= HEADER.size and Header.unpack(rest[: HEADER.size]).kind is Kind.ACK:
            break
    sock.close()


def test_hostile_streams_are_refused_with_stable_ids_and_the_server_keeps_serving(
    server: ServerProcess, tmp_path: Path
) -> None:
    paths, host_id = machine(server, tmp_path, "m1")
    seq_ok = json.loads(Path(paths.identity).read_text())["host_id"] == host_id
    assert seq_ok
    cases: list[tuple[str, bytes, str]] = [
        ("garbage", os.urandom(200), "REPL-PROTOCOL"),
        ("not HELLO first", chunk(1, 0, os.urandom(CHUNK)), "REPL-PROTOCOL"),
        (
            "disk outside /dev",
            json_frame(Kind.HELLO, {"disk": "/etc/../dev/sdb", "size": CHUNK, "chunk_size": CHUNK, "version": 1}),
            "REPL-PROTOCOL",
        ),
        ("nested JSON", frame(Kind.HELLO, b"[" * 60000), "REPL-PROTOCOL"),
        ("a huge declared frame", Header(Kind.CHUNK, 0, 1 << 31).pack(), "REPL-PROTOCOL"),
        ("unprotected disk", hello(disk="/dev/sdc"), "REPL-NOT-PROTECTED"),
        ("wrong hash", hello() + chunk(1, 0, os.urandom(CHUNK), digest=bytes(32)), "REPL-CHUNK-CORRUPT"),
        (
            "zstd bomb",
            hello()
            + frame(
                Kind.CHUNK,
                zstandard.compress(bytes(64 << 20), 1),
                flags=Codec.ZSTD,
                seq=1,
                offset=0,
                size=CHUNK,
                hash=chunk_hash(bytes(CHUNK)),
            ),
            "REPL-CHUNK-CORRUPT",
        ),
        ("chunk past the disk", hello() + chunk(1, 4, os.urandom(CHUNK)), "REPL-PROTOCOL"),
        (
            "unaligned chunk",
            hello() + frame(Kind.CHUNK, os.urandom(CHUNK), seq=1, offset=100, size=CHUNK, hash=bytes(32)),
            "REPL-PROTOCOL",
        ),
        (
            "a zero chunk with a payload",
            hello() + frame(Kind.CHUNK, b"x", flags=Codec.ZERO, seq=1, size=CHUNK),
            "REPL-PROTOCOL",
        ),
        (
            "a point with a made-up root",
            hello()
            + json_frame(
                Kind.POINT,
                {
                    "point_id": str(uuid.uuid4()),
                    "created": 1.0,
                    "root": "0" * 64,
                    "consistency": "crash-consistent",
                    "disks": [DISK],
                },
                seq=1,
            ),
            "REPL-POINT-MISMATCH",
        ),
        (
            "a point made in the year 1e300",
            hello()
            + json_frame(
                Kind.POINT,
                {
                    "point_id": str(uuid.uuid4()),
                    "created": 1e300,
                    "root": "0" * 64,
                    "consistency": "crash-consistent",
                    "disks": [DISK],
                },
                seq=1,
            ),
            "REPL-PROTOCOL",
        ),
        ("a sequence beyond 2^62", hello() + chunk(1 << 62, 0, os.urandom(CHUNK)), "REPL-PROTOCOL"),
        (
            "a point for another disk",
            hello()
            + json_frame(
                Kind.POINT,
                {
                    "point_id": str(uuid.uuid4()),
                    "created": 1.0,
                    "root": "0" * 64,
                    "consistency": "crash-consistent",
                    "disks": ["/dev/sdz"],
                },
                seq=1,
            ),
            "REPL-PROTOCOL",
        ),
    ]

    def refused(payload: bytes) -> str | None:
        sock = connect(server, paths)
        try:
            sock.sendall(payload)
            return error_of(answer(sock))
        finally:
            sock.close()

    for name, payload, expected in cases:
        got = refused(payload)
        assert got == expected, f"{name}: {got}"
    store = ChunkStore(server.data / "process")
    try:
        row = store.disk(host_id, DISK)
        assert row is not None and row.acked_seq == 0 and store.usage().chunks == 0  # nothing kept, nothing acked
        assert store.points(host_id) == []
    finally:
        store.close()
    # Last, as its first (valid) chunk may be kept before the second is read: a sequence going back.
    got = refused(hello() + chunk(5, 0, os.urandom(CHUNK)) + chunk(4, 1, os.urandom(CHUNK)))
    assert got == "REPL-PROTOCOL", f"sequence going back: {got}"
    still_serving(server, paths)


def test_a_stream_needs_a_certificate_of_this_server_and_writes_only_its_own_replica(
    server: ServerProcess, tmp_path: Path
) -> None:
    with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
        sock = connect(server, None)  # no client certificate: the TLS handshake itself fails
        sock.sendall(hello())
        if not sock.recv(1):
            raise ConnectionResetError("closed")
    a, host_a = machine(server, tmp_path, "a")
    b, host_b = machine(server, tmp_path, "b")
    data = os.urandom(CHUNK)
    sock = connect(server, a)
    sock.sendall(hello() + chunk(1, 0, data))
    time.sleep(1.0)
    sock.close()
    store = ChunkStore(server.data / "process")
    try:
        assert store.disk(host_b, DISK) is None  # A's /dev/sdb is A's: the name alone never reaches B's replica
        row = store.disk(host_a, DISK)
        assert row is not None and store.head(row)[:32] == chunk_hash(data)
    finally:
        store.close()
    still_serving(server, b)


def test_a_revoked_or_removed_machine_cannot_stream(server: ServerProcess, tmp_path: Path) -> None:
    """The stream checks the certificate as the API does: after `machines revoke` (or `remove`) the machine's
    certificate, still signed by our CA and unexpired, opens no stream and writes nothing."""
    revoked, host_r = machine(server, tmp_path, "r")
    removed, host_x = machine(server, tmp_path, "x")
    still_serving(server, revoked)
    assert server_cli(server.data, "machines", "revoke", host_r).returncode == 0
    assert server_cli(server.data, "machines", "remove", host_x).returncode == 0
    store = ChunkStore(server.data / "process")
    try:
        before = store.head(store.disk(host_r, DISK))  # type: ignore[arg-type]
    finally:
        store.close()
    for paths, code in ((revoked, "CERT-REVOKED"), (removed, "MACHINE-UNKNOWN")):
        sock = connect(server, paths)
        sock.sendall(hello() + chunk(2_000_000, 1, os.urandom(CHUNK)))
        assert error_of(answer(sock)) == code
        sock.close()
    store = ChunkStore(server.data / "process")
    try:
        assert store.head(store.disk(host_r, DISK)) == before  # type: ignore[arg-type]
        assert store.disk(host_x, DISK) is None
    finally:
        store.close()


def test_poisoned_replication_reports_are_refused_at_the_edge(server: ServerProcess, tmp_path: Path) -> None:
    paths, host_id = machine(server, tmp_path, "m1")
    cert = (paths.client_cert, paths.client_key)
    for report in (
        {"disks": [{"disk": "/dev/sdb", "state": "CONTINUOUS\x1b[2J", "throughput_bps": 0}]},
        {"disks": [{"disk": "/dev/../etc/shadow", "state": "CONTINUOUS", "throughput_bps": 0}]},
        {"disks": [{"disk": "/dev/sdb", "state": "STALLED", "throughput_bps": 0, "detail": "x\ny"}]},
        {"disks": [{"disk": "/dev/sdb", "state": "STALLED", "throughput_bps": float("nan")}]},
        {"disks": [{"disk": "/dev/sdb", "state": "STALLED", "throughput_bps": 0}] * 65},
        {"disks": "all"},
        {"disks": [], "last_point": 1e300},  # `protection` turned it into a date and failed, for the whole fleet
        {"disks": [{"disk": "/dev/sdb", "state": "CONTINUOUS", "throughput_bps": 0, "last_point": 1e300}]},
        {"disks": [{"disk": "/dev/sdb", "state": "CONTINUOUS", "throughput_bps": 1e300}]},
        {"disks": [], "freeze_ms": -1},
    ):
        body = json.dumps({"host_id": host_id, "agent_version": "0.1.0", "replication": report}).encode()
        status, doc = raw_call(server, "POST", "/v1/heartbeat", body, cert=cert)
        assert (status, doc.get("error", {}).get("code")) == (400, "BAD-REQUEST"), report
    # A report an older server stored before these bounds reads as no report: the listing still works.
    storage = open_storage(server.data)
    try:
        storage.record_replication([(host_id, time.time(), json.dumps({"disks": [], "last_point": 1e300}))])
    finally:
        storage.close()
    r = server_cli(server.data, "protection")
    assert r.returncode == 0 and "default" in r.stdout and "Traceback" not in r.stderr, r.stderr
    r = server_cli(server.data, "protection", "--json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)["machines"]
    assert row["host_id"] == host_id and row["replication"] is None


def test_hostile_command_line_arguments_lose_nothing(server: ServerProcess, tmp_path: Path) -> None:
    _, host_id = machine(server, tmp_path, "m1", protect=False)
    cases = [
        (["protect", "--machine", host_id, "--disk", "/dev/../etc/passwd"], "PROTECT-DISK-INVALID"),
        (["protect", "--machine", host_id, "--disk", "/dev/sdb", "--all-disks"], "PROTECT-DISK-INVALID"),
        (["protect", "--machine", host_id], "PROTECT-DISK-INVALID"),
        (["protect", "--machine", "nobody", "--disk", "/dev/sdb"], "MACHINE-NOT-FOUND"),
        (["protect", "--machine", host_id, "--disk", "/dev/sdb", "--policy", "missing"], "POLICY-NOT-FOUND"),
        (["policy", "set", "Bad/Name"], "POLICY-INVALID"),
        (["policy", "set", "p", "--interval", "0s"], "POLICY-INVALID"),
        (["policy", "set", "p", "--interval", "30d"], "POLICY-INVALID"),
        (["policy", "set", "p", "--bandwidth", "lots"], "POLICY-INVALID"),
        (["policy", "set", "p", "--retention", "0"], "POLICY-INVALID"),
        (["points", "--machine", "' OR 1=1 --"], "MACHINE-NOT-FOUND"),
        (["verify", "--point", "'; DROP TABLE points; --"], "POINT-NOT-FOUND"),
        (["failover", "--machine", host_id, "--point", "latest", "--out", str(tmp_path / "out")], "POINT-NOT-FOUND"),
        (["test-failover", "--machine", host_id, "--point", str(uuid.uuid4())], "POINT-NOT-FOUND"),
    ]
    for args, code in cases:
        r = server_cli(server.data, *args)
        assert r.returncode != 0 and f"error {code}:" in r.stderr, (args, r.stderr)
    storage = open_storage(server.data)
    try:
        assert storage.protections() == [] and [p.name for p in storage.policies()] == ["default"]
    finally:
        storage.close()
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.img").write_text("mine")
    from server.process.failover import materialise
    from server.process.store import Point

    store = ChunkStore(server.data / "process")
    try:
        from server.errors import FailoverOutExists

        with pytest.raises(FailoverOutExists):
            materialise(store, Point("p", host_id, 0.0, "crash-consistent", (), None, True), out)
    finally:
        store.close()
    assert (out / "keep.img").read_text() == "mine"


def test_failover_outputs_and_scratch_areas_that_are_not_directories(server: ServerProcess, tmp_path: Path) -> None:
    """`failover --out` and `test-failover --scratch` given a FIFO, a device, a file or a directory that holds
    files: a clear error, nothing hangs, nothing there is written or removed."""
    from agent.replication.chunks import Geometry, RootHasher
    from agent.replication.stream import Stream
    from agent.shared.address import ServerAddress
    from agent.shared.replication_wire import PointClose

    paths, host_id = machine(server, tmp_path, "m1")
    _, client = authenticated_client(paths)
    stream = Stream(ServerAddress("127.0.0.1", server.process_port), client.context, timeout=10)
    stream.connect(Hello(DISK, CHUNK, CHUNK))
    data = os.urandom(CHUNK)
    stream.send(Kind.CHUNK, data, flags=Codec.RAW, offset=0, size=CHUNK, digest=chunk_hash(data))
    root = RootHasher(Geometry(CHUNK, CHUNK))
    root.update(chunk_hash(data))
    close = PointClose(str(uuid.uuid4()), time.time(), root.hexdigest(), "raw-idle", (DISK,))
    stream.send(Kind.POINT, json.dumps(close.to_json()).encode())
    assert stream.drain(20)
    stream.close()

    fifo, afile, full = tmp_path / "fifo", tmp_path / "afile", tmp_path / "full"
    os.mkfifo(fifo)
    afile.write_text("mine")
    full.mkdir()
    (full / "sdb.img").write_text("mine too")
    for out, code in (
        (fifo, "IO-FAILED"),
        (Path("/dev/zero"), "IO-FAILED"),
        (afile, "IO-FAILED"),
        (full, "FAILOVER-OUT-EXISTS"),
    ):
        r = server_cli(server.data, "failover", "--machine", host_id, "--point", "latest", "--out", str(out))
        assert r.returncode != 0 and r.stderr.startswith(f"error {code}:") and "Traceback" not in r.stderr, (
            out,
            r.stderr,
        )
    for scratch in (fifo, Path("/dev/zero"), afile):
        r = server_cli(
            server.data, "test-failover", "--machine", host_id, "--point", "latest", "--scratch", str(scratch)
        )
        assert r.returncode != 0 and r.stderr.startswith("error IO-FAILED:"), (scratch, r.stderr)
        # failover marks its images in a scratch area too: refused there, it leaves no image behind.
        out = tmp_path / "marked"
        r = server_cli(
            server.data,
            "failover",
            "--machine",
            host_id,
            "--point",
            "latest",
            "--out",
            str(out),
            "--scratch",
            str(scratch),
        )
        assert r.returncode != 0 and r.stderr.startswith("error IO-FAILED:"), (scratch, r.stderr)
        assert sorted(p.name for p in out.iterdir()) == []
    assert afile.read_text() == "mine" and (full / "sdb.img").read_text() == "mine too" and fifo.is_fifo()
    assert sorted(p.name for p in full.iterdir()) == ["sdb.img"]
    out = tmp_path / "good"
    r = server_cli(server.data, "failover", "--machine", host_id, "--point", "latest", "--out", str(out), "--no-mark")
    assert r.returncode == 0 and (out / "sdb.img").read_bytes() == data, r.stderr

    # A point whose disk holds the start of an ext4 larger than the disk: found, but it does not mount.
    import subprocess

    fs = tmp_path / "fs.img"
    fs.write_bytes(bytes(1 << 20))
    subprocess.run(["mkfs.ext4", "-q", "-F", str(fs)], check=True, capture_output=True, timeout=60)
    head = fs.read_bytes()[:CHUNK]
    stream = Stream(ServerAddress("127.0.0.1", server.process_port), client.context, timeout=10)
    stream.connect(Hello(DISK, CHUNK, CHUNK))
    stream.send(Kind.CHUNK, head, flags=Codec.RAW, offset=0, size=CHUNK, digest=chunk_hash(head))
    root = RootHasher(Geometry(CHUNK, CHUNK))
    root.update(chunk_hash(head))
    close = PointClose(str(uuid.uuid4()), time.time() + 1, root.hexdigest(), "raw-idle", (DISK,))
    stream.send(Kind.POINT, json.dumps(close.to_json()).encode())
    assert stream.drain(20)
    stream.close()
    r = failover_cli(server, "test-failover", "--machine", host_id, "--point", close.point_id, "--json")
    report, _ = json.JSONDecoder().raw_decode(r.stdout)  # the report; the error follows it
    assert r.returncode == 1 and "error TEST-FAILOVER-FAILED:" in r.stderr and not report["ok"], r.stdout + r.stderr
    assert report["disks"][0]["filesystems"][0]["fstype"] == "ext4"


def point_of_disks(server: ServerProcess, paths: Paths, disks: dict[str, bytes], created: float | None = None) -> str:
    """A point over ``disks`` (each disk's whole content), sent through the agent's own stream client; its ID."""
    from agent.replication.chunks import Geometry, RootHasher
    from agent.replication.stream import Stream
    from agent.shared.address import ServerAddress
    from agent.shared.replication_wire import PointClose

    _, client = authenticated_client(paths)
    point_id = str(uuid.uuid4())
    for disk, data in disks.items():
        stream = Stream(ServerAddress("127.0.0.1", server.process_port), client.context, timeout=10)
        stream.connect(Hello(disk, len(data), CHUNK))
        root = RootHasher(Geometry(len(data), CHUNK))
        for offset in range(0, len(data), CHUNK):
            piece = data[offset : offset + CHUNK]
            stream.send(Kind.CHUNK, piece, flags=Codec.RAW, offset=offset, size=len(piece), digest=chunk_hash(piece))
            root.update(chunk_hash(piece))
        close = PointClose(point_id, created or time.time(), root.hexdigest(), "raw-idle", tuple(disks))
        stream.send(Kind.POINT, json.dumps(close.to_json()).encode())
        assert stream.drain(30)
        stream.close()
    return point_id


def test_absurd_times_already_stored_break_no_listing_and_no_failover(server: ServerProcess, tmp_path: Path) -> None:
    """A point's ``created`` and a heartbeat's ``last_point`` (and its other figures) stored as 1e300, as a store or
    a database written before the wire bounded them holds them: `points`, `failover --point latest` and
    `protection` (the whole fleet's listing) still list and fail over, and show such a time as what it is."""
    import sqlite3

    from tests.integration.serverproc import db_execute

    paths, host_id = machine(server, tmp_path, "m1")
    data = os.urandom(CHUNK)
    point_id = point_of_disks(server, paths, {DISK: data})
    index = sqlite3.connect(server.data / "process" / "index.db", timeout=30)
    with index:
        index.execute("UPDATE points SET created = 1e300 WHERE point_id = ?", (point_id,))
    index.close()
    absurd = {"throughput_bps": 1e300, "lag_seconds": 1e300, "eta_seconds": 1e300, "last_point": 1e300}
    report = {"disks": [{"disk": DISK, "state": "CONTINUOUS", **absurd}], "last_point": 1e300, "points": 1}
    db_execute(
        server.data,
        "UPDATE protection SET report = :r, reported_at = :t WHERE host_id = :h",
        {"r": json.dumps(report), "t": time.time(), "h": host_id},
    )
    out = tmp_path / "out"
    for args in (
        ["points", "--machine", host_id],
        ["points", "--machine", host_id, "--json"],
        ["protection"],
        ["protection", "--json"],
        ["failover", "--machine", host_id, "--point", "latest", "--out", str(out), "--no-mark"],
    ):
        r = server_cli(server.data, *args)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stderr)
        if args[0] == "points" and "--json" not in args:
            assert point_id in r.stdout and "not a time (1e+300)" in r.stdout, r.stdout
        if args[0] == "protection":
            assert DISK in r.stdout, r.stdout
    assert (out / "sdb.img").read_bytes() == data


def protect_disks(server: ServerProcess, host_id: str, *disks: str) -> None:
    storage = open_storage(server.data)
    try:
        storage.protect(host_id, list(disks), False, "default", False, time.time())
    finally:
        storage.close()


def failover_cli(
    server: ServerProcess, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", *args, "--data", str(server.data)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,  # a test failover boots the appliance: minutes under TCG on a loaded machine
        check=False,
        env=env,
    )


def images_in(out: Path) -> list[str]:
    """Every name in ``out`` (hidden ones too): what an operator, or a tool that globs for images, would find."""
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def test_a_failed_failover_leaves_no_image_that_looks_usable(server: ServerProcess, tmp_path: Path) -> None:
    """A corrupt chunk in the second disk, a full disk under --out, SIGTERM or Ctrl-C after the first image: the
    command fails with its error and --out holds no image, not a full-size sparse one, not a partial one. A
    failover killed outright (SIGKILL) leaves only a hidden partial file, which the next failover into the same
    directory clears before it writes."""
    from tests import faults

    paths, host_id = machine(server, tmp_path, "m1", protect=False)
    protect_disks(server, host_id, "/dev/sdb", "/dev/sdc")
    sdb, sdc = os.urandom(4 * CHUNK), os.urandom(4 * CHUNK)
    point_id = point_of_disks(server, paths, {"/dev/sdb": sdb, "/dev/sdc": sdc})
    argv = ("failover", "--machine", host_id, "--point", point_id, "--no-mark", "--out")

    # Stopped after the first image was written: nothing stays.
    for signum in (signal.SIGTERM, signal.SIGINT):
        out = tmp_path / f"stopped-{signum}"
        env = faults.environment(signal_at={"failover.step": {"step": "written", "disk": "/dev/sdb"}}, signum=signum)
        r = failover_cli(server, *argv, str(out), env=env)
        assert (r.returncode, r.stderr.split(":")[0]) == (75, "error FAILOVER-INTERRUPTED"), r.stderr
        assert images_in(out) == [], images_in(out)

    # Killed outright there: a hidden partial, never an image; the next failover clears it and writes both.
    out = tmp_path / "killed"
    env = faults.environment(kill_at={"failover.step": {"step": "written", "disk": "/dev/sdc"}})
    r = failover_cli(server, *argv, str(out), env=env)
    assert r.returncode == -signal.SIGKILL and not [n for n in images_in(out) if n.endswith(".img")], images_in(out)
    r = failover_cli(server, *argv, str(out))
    assert r.returncode == 0, r.stderr
    assert images_in(out) == ["point.json", "sdb.img", "sdc.img"]
    assert ((out / "sdb.img").read_bytes(), (out / "sdc.img").read_bytes()) == (sdb, sdc)

    # A full disk under --out (a 192 KiB tmpfs for two 256 KiB images): IO-FAILED, nothing left.
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(small)], check=True, timeout=30)
    try:
        r = failover_cli(server, *argv, str(small / "out"))
        assert (r.returncode, r.stderr.split(":")[0]) == (1, "error IO-FAILED"), r.stderr
        assert images_in(small / "out") == []
    finally:
        subprocess.run(["umount", str(small)], check=True, timeout=30)

    # A corrupt chunk of the second disk: POINT-CORRUPT, and the first disk's whole image is gone as well.
    store = ChunkStore(server.data / "process")
    try:
        located = locate(store, chunk_hash(sdc[2 * CHUNK : 3 * CHUNK]))
    finally:
        store.close()
    assert located is not None
    pack, offset, _ = located
    with pack.open("r+b") as f:
        f.seek(offset + 7)
        byte = f.read(1)
        f.seek(offset + 7)
        f.write(bytes([byte[0] ^ 0x10]))
    out = tmp_path / "corrupt"
    r = failover_cli(server, *argv, str(out))
    assert (r.returncode, r.stderr.split(":")[0]) == (1, "error POINT-CORRUPT"), r.stderr
    assert images_in(out) == []


def test_two_disk_names_for_one_image_name_both_fail_over(server: ServerProcess, tmp_path: Path) -> None:
    """/dev/a_b and /dev/a/b would both be a_b.img: each gets its own image (named after its disk, with a hash of
    the name), and point.json says which disk each image is."""
    paths, host_id = machine(server, tmp_path, "m1", protect=False)
    protect_disks(server, host_id, "/dev/a_b", "/dev/a/b")
    first, second = os.urandom(2 * CHUNK), os.urandom(3 * CHUNK)
    point_of_disks(server, paths, {"/dev/a_b": first, "/dev/a/b": second})
    out = tmp_path / "out"
    r = failover_cli(
        server, "failover", "--machine", host_id, "--point", "latest", "--out", str(out), "--no-mark", "--json"
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    by_disk = dict(zip([d["disk"] for d in doc["disks"]], [Path(i) for i in doc["images"]], strict=True))
    assert by_disk["/dev/a_b"] != by_disk["/dev/a/b"] and {p.parent for p in by_disk.values()} == {out}
    assert (by_disk["/dev/a_b"].read_bytes(), by_disk["/dev/a/b"].read_bytes()) == (first, second)
    assert json.loads((out / "point.json").read_text()) == doc


def held_under(where: Path) -> list[str]:
    """Loop devices backed by a file under ``where`` (as losetup lists them) and mounts under it (mountinfo)."""
    r = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    loops = [line for line in r.stdout.splitlines() if str(where) in line]
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(where) in line]
    return loops + mounts


def processes_naming(where: Path) -> list[str]:
    """Processes whose command line names something under ``where``: a test failover's appliance (guestfish, its
    QEMU), a booted point's QEMU."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.pid != os.getpid() and any(str(where) in arg for arg in cmdline):
            found.append(f"{proc.pid}: {' '.join(cmdline)[:200]}")
    return found


def areas_in(scratch: Path) -> list[str]:
    """What a test failover left in its scratch root (its lock file is the root's own)."""
    return [name for name in images_in(scratch) if name != ".lock"]


def test_a_stopped_test_failover_leaves_no_vm_loop_device_or_mount(server: ServerProcess, tmp_path: Path) -> None:
    """SIGTERM, Ctrl-C (SIGINT) or a closed terminal (SIGHUP) to a running `test-failover`: as its images are
    written, while a filesystem is mounted in the appliance (the process signals itself there through a fault
    point), and from outside while the appliance's VM boots: FAILOVER-INTERRUPTED, and no VM (no process naming its
    scratch area), loop device, mount or scratch area of it is left."""
    from tests import faults

    paths, host_id = machine(server, tmp_path, "m1")
    content = tmp_path / "content"
    content.mkdir()
    for n in range(200):
        (content / f"records-{n}").write_bytes(os.urandom(20_000))
    fs = tmp_path / "fs.img"
    fs.write_bytes(bytes(16 << 20))
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(fs)], check=True, capture_output=True, timeout=60)
    point_of_disks(server, paths, {DISK: fs.read_bytes()})
    scratch = tmp_path / "scratch"
    argv = ("test-failover", "--machine", host_id, "--point", "latest", "--scratch", str(scratch))

    def nothing_left() -> list[str]:
        return held_under(scratch) + areas_in(scratch) + processes_naming(scratch)

    for step, signum in (("written", signal.SIGTERM), ("mounted", signal.SIGINT)):
        env = faults.environment(signal_at={"failover.step": {"step": step}}, signum=signum)
        r = failover_cli(server, *argv, env=env)
        assert (r.returncode, r.stderr.split(":")[0]) == (75, "error FAILOVER-INTERRUPTED"), (step, r.stderr)
        assert nothing_left() == [], (step, nothing_left())

    # From outside, once the appliance's VM runs: its QEMU is killed with it, its overlay removed with the area.
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", *argv, "--data", str(server.data)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 300
        while not any("qemu" in p for p in processes_naming(scratch)):
            assert proc.poll() is None and time.monotonic() < deadline, "the appliance's VM never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGHUP)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, err.split(":")[0]) == (75, "error FAILOVER-INTERRUPTED"), err
    assert nothing_left() == [], nothing_left()


# Issue 20: a machine's points, authorisation for a stream's life, one bad frame, memory, connections -----------


def stream_of(server: ServerProcess, paths: Paths) -> Stream:
    _, client = authenticated_client(paths)
    return Stream(ServerAddress("127.0.0.1", server.process_port), client.context, timeout=20)


def send_data(stream: Stream, index: int, data: bytes) -> None:
    stream.send(Kind.CHUNK, data, flags=Codec.RAW, offset=index * CHUNK, size=CHUNK, digest=chunk_hash(data))


def close_point(stream: Stream, disk: list[bytes], point_id: str | None = None, name: str = DISK) -> str:
    root = RootHasher(Geometry(len(disk) * CHUNK, CHUNK))
    root.update(b"".join(chunk_hash(d) for d in disk))
    point = PointClose(point_id or str(uuid.uuid4()), time.time(), root.hexdigest(), "raw-idle", (name,))
    stream.send(Kind.POINT, json.dumps(point.to_json()).encode())
    return point.point_id


def ended_with(stream: Stream, within: float) -> str:
    """The error ID the server ends an open (idle) stream with, within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            stream.pump(0.5)
        except RemoteError as e:
            return e.id
    raise AssertionError(f"the stream is still open after {within:.0f} s")


def listed_points(server: ServerProcess, host_id: str) -> list[str]:
    r = server_cli(server.data, "points", "--machine", host_id, "--json")
    assert r.returncode == 0, r.stderr
    return [str(p["point_id"]) for p in json.loads(r.stdout)]


def test_a_point_id_of_another_machine_changes_nothing_of_its_point(server: ServerProcess, tmp_path: Path) -> None:
    """Machine B, with its own certificate, closes a point with machine A's point ID (points were keyed by the ID
    alone: A's failover then wrote B's bytes). B's stream ends with REPL-POINT-ID-TAKEN; A's point, listing and
    failover image are A's, and B lists no point."""
    a, host_a = machine(server, tmp_path, "a")
    b, host_b = machine(server, tmp_path, "b")
    a_disk, b_disk = [os.urandom(CHUNK) for _ in range(2)], [os.urandom(CHUNK) for _ in range(2)]
    stream = stream_of(server, a)
    stream.connect(Hello(DISK, 2 * CHUNK, CHUNK))
    for i, data in enumerate(a_disk):
        send_data(stream, i, data)
    taken = close_point(stream, a_disk)
    assert stream.drain(20)
    stream.close()
    stream = stream_of(server, b)
    stream.connect(Hello(DISK, 2 * CHUNK, CHUNK))
    for i, data in enumerate(b_disk):
        send_data(stream, i, data)
    close_point(stream, b_disk, taken)
    with pytest.raises(RemoteError) as e:
        stream.drain(20)
    assert e.value.id == "REPL-POINT-ID-TAKEN"
    assert listed_points(server, host_a) == [taken] and listed_points(server, host_b) == []
    out = tmp_path / "a-failover"
    r = server_cli(server.data, "failover", "--machine", host_a, "--point", taken, "--out", str(out), "--no-mark")
    assert r.returncode == 0, r.stderr
    assert (out / "sdb.img").read_bytes() == b"".join(a_disk)
    r = server_cli(server.data, "failover", "--machine", host_b, "--point", taken, "--out", str(tmp_path / "b"))
    assert r.returncode != 0 and "error POINT-NOT-FOUND:" in r.stderr
    still_serving(server, b)


def test_revoked_unprotected_and_replaced_certificates_end_open_streams(server: ServerProcess, tmp_path: Path) -> None:
    """Authorisation holds for a stream's life, not only at its HELLO: `machines revoke`, `unprotect` and a
    certificate a renewal replaced end the machine's open streams within seconds, with the ID the agent shows, and
    a point sent after the change is not listed."""
    from agent.lifecycle.registration import heartbeat, renew_certificate

    changes = {
        "revoke": (lambda host: server_cli(server.data, "machines", "revoke", host), "CERT-REVOKED"),
        "unprotect": (lambda host: server_cli(server.data, "unprotect", "--machine", host), "REPL-NOT-PROTECTED"),
    }
    for name, (change, code) in changes.items():
        paths, host_id = machine(server, tmp_path, name)
        storage = open_storage(server.data)
        try:
            storage.protect(host_id, [DISK, "/dev/sdc"], False, "default", False, time.time())
        finally:
            storage.close()
        idle, busy = stream_of(server, paths), stream_of(server, paths)
        idle.connect(Hello(DISK, CHUNK, CHUNK))
        busy.connect(Hello("/dev/sdc", CHUNK, CHUNK))
        data = os.urandom(CHUNK)
        send_data(busy, 0, data)
        assert busy.drain(20)
        assert change(host_id).returncode == 0
        close_point(busy, [data], name="/dev/sdc")  # at once: before any periodic check could run
        with pytest.raises(RemoteError) as e:
            busy.drain(20)
        assert e.value.id == code, name
        started = time.monotonic()
        assert ended_with(idle, 10) == code, name
        assert time.monotonic() - started < 8, name
        assert listed_points(server, host_id) == [], name
    paths, host_id = machine(server, tmp_path, "renewed")
    stream = stream_of(server, paths)  # with the certificate of now
    stream.connect(Hello(DISK, CHUNK, CHUNK))
    renew_certificate(paths)
    heartbeat(paths, {"status": "healthy"})  # the renewed certificate's first use replaces the old one
    assert ended_with(stream, 10) == "CERT-SUPERSEDED"
    renewed = stream_of(server, paths)  # the agent reconnects with its new certificate
    renewed.connect(Hello(DISK, CHUNK, CHUNK))
    data = os.urandom(CHUNK)
    send_data(renewed, 0, data)
    close_point(renewed, [data])
    assert renewed.drain(20)
    assert len(listed_points(server, host_id)) == 1


def test_one_machines_bad_frame_harms_no_other_stream(server: ServerProcess, tmp_path: Path) -> None:
    """A frame with a sequence of 2^63 failed the whole group commit with SQLite's OverflowError: every machine's
    stream in that batch, and its chunk stayed in the pack unindexed. It is refused at the edge now, on its stream
    only, while another machine's stream goes on and is acknowledged."""
    good, host_good = machine(server, tmp_path, "good")
    bad, host_bad = machine(server, tmp_path, "bad")
    stream = stream_of(server, good)
    stream.connect(Hello(DISK, 4 * CHUNK, CHUNK))
    disk = [os.urandom(CHUNK) for _ in range(4)]
    send_data(stream, 0, disk[0])
    sock = connect(server, bad)
    sock.sendall(hello() + chunk(1 << 63, 0, os.urandom(CHUNK)))
    for i, data in enumerate(disk[1:], 1):
        send_data(stream, i, data)
    assert error_of(answer(sock)) == "REPL-PROTOCOL"
    sock.close()
    assert stream.drain(20)
    stream.close()
    store = ChunkStore(server.data / "process")
    try:
        row = store.disk(host_good, DISK)
        assert row is not None and bytes(store.head(row)) == b"".join(chunk_hash(d) for d in disk)
        bad_row = store.disk(host_bad, DISK)
        assert bad_row is not None and bad_row.acked_seq == 0 and store.usage().chunks == 4
        kept = store.db.execute("SELECT COUNT(*) * ? + SUM(stored) FROM chunks", (RECORD.size,)).fetchone()[0]
        assert sum(p.stat().st_size for p in store.packs_dir.glob("*.pack")) == kept  # no byte the index does not name
    finally:
        store.close()


def _peak(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_hostile_input_costs_the_server_bounded_memory(server: ServerProcess, tmp_path: Path) -> None:
    """The server's peak RSS (reset before each case) around: a 32 KiB zstd frame that declares 1 GiB (it took
    1 GiB), skippable frames after a chunk's frame (kept in the pack: 128 times the chunk), a HELLO of 2^36 bytes
    in 4 KiB chunks asking for the replica's hashes (a 512 MiB list) and one of 2^20 chunks, what agents use, whose
    32 MiB of hashes now come slice by slice."""
    paths, _ = machine(server, tmp_path, "m1")
    pid = server.proc.pid
    rss = psutil.Process(pid).memory_info
    data = os.urandom(CHUNK // 2) + bytes(CHUNK // 2)
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(1 << 30))
    assert len(bomb) < 40 * 1024
    skippable = struct.pack("<II", 0x184D2A50, 8 << 20) + bytes(8 << 20)
    cases: list[tuple[str, bytes, str]] = [
        ("a frame declaring 1 GiB", _zstd_chunk(bomb, data), "REPL-CHUNK-CORRUPT"),
        ("skippable frames after", _zstd_chunk(zstandard.compress(data, 1) + skippable, data), "REPL-CHUNK-CORRUPT"),
        (
            "2^24 chunks",
            json_frame(Kind.HELLO, Hello(DISK, 1 << 36, 4096, want_hashes=True).to_json()),
            "REPL-DISK-TOO-LARGE",
        ),
    ]
    for name, payload, code in cases:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak starts again from the RSS of now
        before = rss().rss
        sock = connect(server, paths)
        sock.sendall(payload)
        assert error_of(answer(sock)) == code, name
        sock.close()
        assert _peak(pid) - before < 48 << 20, f"{name}: the server's RSS rose by {(_peak(pid) - before) >> 20} MiB"
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = rss().rss
    stream = stream_of(server, paths)
    hashes = 0

    def count(first: int, part: bytes) -> None:
        nonlocal hashes
        assert first == hashes
        hashes += len(part) // 32

    stream.connect(Hello(DISK, 1 << 36, 1 << 16, want_hashes=True), count)
    stream.close()
    assert hashes == 1 << 20
    assert _peak(pid) - before < 20 << 20, f"hashes of 2^20 chunks: +{(_peak(pid) - before) >> 20} MiB"
    store = ChunkStore(server.data / "process")
    try:
        assert store.usage().chunks == 0 and all(p.stat().st_size == 0 for p in store.packs_dir.glob("*.pack"))
    finally:
        store.close()
    still_serving(server, paths)


def _zstd_chunk(payload: bytes, data: bytes) -> bytes:
    return hello() + frame(
        Kind.CHUNK, payload, flags=Codec.ZSTD, seq=1, offset=0, size=len(data), hash=chunk_hash(data)
    )


def test_idle_connections_to_the_process_port_leave_the_api_serving(tmp_path: Path) -> None:
    """1,100 idle TCP connections to the process port made the API fail: they shared the server's open files. With
    1,024 open files the server takes 768 connections; the process port holds at most a quarter of them before
    their TLS handshake and closes the rest at once, the API answers heartbeats meanwhile, and the held ones are
    closed when their handshake's 10 s are up."""
    import resource

    from agent.lifecycle.registration import heartbeat
    from scripts.localserver import start_local_server
    from tests.integration.serverproc import init_server

    require_root()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
    data = tmp_path / "data"
    init_server(data)
    proc, address, fingerprint = start_local_server(
        data, "--heartbeat-interval", "2", wrap=["prlimit", "--nofile=1024:1024", "--"]
    )
    server = ServerProcess(data, proc, int(address.rsplit(":", 1)[1]), fingerprint)
    idle: list[socket.socket] = []
    try:
        paths, _ = machine(server, tmp_path, "m1")
        for _ in range(1100):
            idle.append(socket.create_connection(("127.0.0.1", server.process_port), timeout=10))
        opened = time.monotonic()
        assert heartbeat(paths, {"status": "healthy"})["interval"] == 2.0
        assert heartbeat(paths, {"status": "healthy"})["interval"] == 2.0
        closed = 0
        for sock in idle:
            sock.settimeout(max(0.1, opened + 15 - time.monotonic()))
            try:
                closed += sock.recv(1) == b""
            except ConnectionResetError:
                closed += 1
        assert closed == len(idle) and time.monotonic() - opened < 15
        assert psutil.Process(proc.pid).num_fds() < 256
        still_serving(server, paths)
    finally:
        for sock in idle:
            sock.close()
        server.stop()
