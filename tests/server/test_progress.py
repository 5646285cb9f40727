"""Progress of the long commands (server/progress.py): on a terminal `verify`, `failover` and `repo add` draw bytes
done, the rate and the time left on stderr; with --json, or when stderr is not a terminal, nothing extra at all.
The commands run as processes whose stderr is a real pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from server.process.service import store_dir
from server.process.store import ChunkStore, PointPut
from tests.bundle_factory import make_bundle
from tests.conftest import REPO
from tests.integration.serverproc import init_server, open_storage
from tests.server.database.test_storage import new_machine
from tests.server.process.test_store import CHUNK, close, put, root_of

HOST = "11111111-1111-4111-8111-111111111111"
SIZE = 64 * CHUNK  # 4 MiB: a bar with figures in MiB


@pytest.fixture
def point(tmp_path: Path) -> tuple[Path, str]:
    """A data directory whose store holds one point of a 4 MiB disk of HOST (a registered machine)."""
    data = tmp_path / "data"
    init_server(data)
    storage = open_storage(data)
    storage.enrol_machine(new_machine(HOST), 0.0)
    storage.close()
    store = ChunkStore(store_dir_of(data), writer=True, reserve=0)
    try:
        row, _ = store.open_disk(HOST, "/dev/sdb", SIZE, CHUNK)
        chunks = [os.urandom(CHUNK) if i % 4 == 0 else bytes(CHUNK) for i in range(SIZE // CHUNK)]
        puts = [put(row.disk_key, i, c, i + 1) for i, c in enumerate(chunks)]
        point_id = str(uuid.uuid4())
        store.commit([*puts, PointPut(row.disk_key, close(point_id, root_of(chunks, SIZE)), len(chunks) + 1)])
    finally:
        store.close()
    return data, point_id


def store_dir_of(data: Path) -> Path:
    from server.datadir import DataDir

    return store_dir(DataDir(data))


def on_terminal(*args: str) -> tuple[int, str, str]:
    """``mobility-server ARGS`` with stderr on a pseudo-terminal (stdout a pipe): exit code, stdout, the terminal."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", *args],
        stdout=subprocess.PIPE,
        stderr=slave,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "160", "TERM": "xterm"},
    )
    os.close(slave)
    seen = bytearray()
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            proc.kill()
            raise AssertionError(f"no output for 60 s: {seen.decode(errors='replace')[-2000:]}")
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    out = proc.stdout.read().decode() if proc.stdout else ""
    return proc.wait(timeout=60), out, seen.decode(errors="replace")


def piped(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", *args], capture_output=True, text=True, cwd=REPO, timeout=120, check=False
    )


def test_verify_and_failover_show_bytes_rate_and_time_left_on_a_terminal(
    point: tuple[Path, str], tmp_path: Path
) -> None:
    data, point_id = point
    code, out, terminal = on_terminal("verify", "--point", point_id, "--data", str(data))
    assert code == 0 and f"point {point_id}: OK" in out, terminal
    assert "verifying /dev/sdb" in terminal and "4.0/4.0 MiB" in terminal and "ETA" in terminal
    assert "/s" in terminal  # the rate
    assert "verifying" not in out  # stdout stays the result

    code, out, terminal = on_terminal(
        "failover",
        "--machine",
        HOST,
        "--point",
        "latest",
        "--out",
        str(tmp_path / "images"),
        "--no-mark",
        "--data",
        str(data),
    )
    assert code == 0 and (tmp_path / "images" / "sdb.img").stat().st_size == SIZE, terminal
    assert "/dev/sdb -> sdb.img" in terminal and "4.0/4.0 MiB" in terminal and "ETA" in terminal


def test_nothing_extra_with_json_or_without_a_terminal(point: tuple[Path, str], tmp_path: Path) -> None:
    data, point_id = point
    code, out, terminal = on_terminal("verify", "--point", point_id, "--json", "--data", str(data))
    assert code == 0 and json.loads(out)["ok"] is True
    assert terminal == ""  # --json: nothing on the terminal either
    r = piped("verify", "--point", point_id, "--data", str(data))
    assert r.returncode == 0 and r.stderr == ""
    r = piped(
        "failover",
        "--machine",
        HOST,
        "--point",
        "latest",
        "--out",
        str(tmp_path / "x"),
        "--no-mark",
        "--data",
        str(data),
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_repo_add_shows_the_copy_of_each_bundle(tmp_path: Path) -> None:
    data = tmp_path / "data"
    init_server(data)
    bundle = make_bundle(tmp_path, "DEBIAN12", "0.2.0")
    code, out, terminal = on_terminal("repo", "add", str(bundle), "--data", str(data))
    assert code == 0 and f"added {bundle.name}" in out, terminal
    assert f"copying {bundle.name}" in terminal and "ETA" in terminal
    second = make_bundle(tmp_path, "UBUNTU-22.04", "0.2.0")
    r = piped("repo", "add", str(second), "--data", str(data))
    assert r.returncode == 0 and r.stderr == "", r.stderr
