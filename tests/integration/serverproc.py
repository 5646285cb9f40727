"""A real `mobility-server` process on loopback for integration tests (init + serve, stopped by PID)."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.localserver import configure_agent, init_local_server, process_port, start_local_server
from scripts.polling import wait_for  # noqa: F401 (re-exported: tests import it from here)
from scripts.testlab import debian_root  # noqa: F401 (re-exported: tests import it from here)
from server.database.connection import database_for
from server.database.storage import Storage
from server.datadir import DataDir
from tests.conftest import DISTROS, REPO
from tests.postgres import on_postgresql, shared_cluster


def server_cli(data: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", *args, "--data", str(data)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=check,
    )


def agent_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``mobility ARGS`` as a process (``env``: e.g. tests.faults.environment(...) for a fault plan)."""
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
        env=env,
    )


@dataclass
class ServerProcess:
    data: Path
    proc: subprocess.Popen[str]
    port: int
    fingerprint: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def process_port(self) -> int:
        """The port of the process server role (replication streams), from the server's log."""
        port = process_port(self.data)
        assert port is not None, "the server runs no process server role"
        return port

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=5)

    def machines(self) -> list[dict[str, object]]:
        return list(json.loads(server_cli(self.data, "machines", "--json", check=True).stdout))

    def jobs(self) -> list[dict[str, object]]:
        return list(json.loads(server_cli(self.data, "jobs", "--json", check=True).stdout))

    def passphrase(self) -> str:
        return server_cli(self.data, "passphrase", "show", check=True).stdout.strip()


def init_server(data: Path, database: str | None = None) -> str:
    """`init` on the session's database engine: with MOBILITY_TEST_DATABASE=postgresql, a new database of the
    shared PostgreSQL cluster (recorded in the data directory, so every later command uses it)."""
    if database is None and on_postgresql():
        database = shared_cluster().new_database()
    out = init_local_server(data, database=database)
    m = re.search(r"^fingerprint: (sha256:[0-9a-f]{64})$", out, re.M)
    assert m, out
    return m.group(1)


def start_server(
    data: Path,
    heartbeat_interval: float = 30.0,
    port: int = 0,
    database: str | None = None,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """``env``: the server's environment, e.g. tests.faults.environment(...) for a fault plan."""
    if not (data / ".initialised").exists():
        init_server(data, database)
    proc, address, fingerprint = start_local_server(
        data, "--heartbeat-interval", str(heartbeat_interval), port=port, env=env
    )
    return ServerProcess(data, proc, int(address.rsplit(":", 1)[1]), fingerprint)


def sandbox_root(where: Path, machine_id: str, tree: str = "debian12") -> Path:
    """A source machine's root: real Debian release files plus its own machine-id and hostname."""
    shutil.copytree(DISTROS / tree, where, symlinks=True)
    (where / "etc" / "machine-id").write_text(machine_id + "\n")
    (where / "etc" / "hostname").write_text(f"host-{machine_id[:6]}\n")
    return where


def secret_file(where: Path, secret: str) -> Path:
    where.write_text(secret + "\n")
    os.chmod(where, 0o600)
    return where


def configure_root(server: ServerProcess, root: Path, secret_path: Path, *extra: str) -> tuple[int, dict[str, object]]:
    r = configure_agent(root, server.address, secret_path, server.fingerprint, *extra)
    return r.returncode, json.loads(r.stdout) if r.stdout.strip().startswith("{") else {"stderr": r.stderr}


def fetch_as(server: ServerProcess, root: Path, os_tag: str, dest: Path) -> Path:
    """What a registered machine at ``root`` downloads and verifies (TUF, mutual TLS) for ``os_tag``."""
    from agent.host.paths import Paths
    from agent.lifecycle.fetch import fetch_bundle
    from agent.lifecycle.registration import authenticated_client

    paths = Paths(root)
    _, client = authenticated_client(paths)
    try:
        return fetch_bundle(
            f"https://{server.address}",
            client.context,
            (paths.tuf_dir / "root.json").read_bytes(),
            paths.tuf_dir / "metadata",
            os_tag,
            dest,
        )
    finally:
        client.close()


def raw_call(
    server: ServerProcess,
    method: str,
    path: str,
    body: bytes,
    cert: tuple[Path, Path] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """One HTTPS request as any client could send it (optionally with a client certificate): status and JSON."""
    ctx = ssl.create_default_context(cafile=str(server.data / "ca" / "ca.pem"))
    if cert:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        status, data = resp.status, resp.read()
    finally:
        conn.close()
    return status, json.loads(data)


def open_storage(data: Path) -> Storage:
    """The database of the server whose data directory is ``data``, as its commands open it."""
    return Storage.open(database_for(DataDir(data), None), pool_size=0)


def db_execute(data: Path, sql: str, params: dict[str, Any] | None = None) -> None:
    """Change the server's database behind its back (a row as an older or compromised server left it)."""
    from sqlalchemy import text

    storage = open_storage(data)
    try:
        with storage.transaction() as tx:
            tx.conn.execute(text(sql), params or {})
    finally:
        storage.close()


def error_code(doc: dict[str, Any]) -> object:
    err = doc.get("error")
    return err.get("code") if isinstance(err, dict) else doc
