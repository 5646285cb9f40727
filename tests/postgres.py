"""A real PostgreSQL cluster for the tests (Debian's `postgresql` package): initdb into a temporary directory as the
`postgres` user, served on a free loopback port, stopped by its PID.

The server under test connects as the role `mobility` with a password that only a PGPASSFILE holds (mode 0600), as
docs/deployment.md tells operators to: the password never appears in a URL, an argument or a log. Each server gets
a database of its own (``new_database``)."""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROLE = "mobility"
_counter = itertools.count(1)


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory (/usr/lib/postgresql/N/bin), if any."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    return versions[-1].parent if versions else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresCluster:
    root: Path
    port: int = 0
    password: str = field(default_factory=lambda: secrets.token_urlsafe(16), repr=False)
    proc: subprocess.Popen[bytes] | None = None
    fsync: bool = False  # tests: durability across a power cut is PostgreSQL's, not ours to re-test
    listen: str = "127.0.0.1"
    netns: str | None = None  # serve inside this network namespace (the test lab's hub); psql uses the Unix socket

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def url(self, database: str) -> str:
        return f"postgresql://{ROLE}@{self.listen}:{self.port}/{database}"

    def _as_postgres(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), user="postgres", capture_output=True, text=True, timeout=120, check=False)

    def init(self) -> None:
        bindir = postgres_bin()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        pg = pwd.getpwnam("postgres")
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        for p in (self.root, self.socket_dir):
            os.chown(p, pg.pw_uid, pg.pw_gid)
        r = self._as_postgres(
            str(bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
        )
        if r.returncode:
            raise RuntimeError(f"initdb failed: {r.stderr[-2000:]}")
        if self.listen != "127.0.0.1":  # initdb allows only loopback peers: let the address's own subnet in
            with (self.data / "pg_hba.conf").open("a") as f:
                f.write(f"host all all {self.listen}/24 scram-sha-256\n")

    def start(self) -> None:
        bindir = postgres_bin()
        assert bindir is not None
        self.port = self.port or free_port()
        pg = pwd.getpwnam("postgres")
        # In a namespace: nsenter joins it, drops to postgres and execs the server (its PID is the server's).
        wrap = (
            ["nsenter", f"--net=/run/netns/{self.netns}", f"--setuid={pg.pw_uid}", f"--setgid={pg.pw_gid}"]
            if self.netns
            else []
        )
        with self.log.open("ab") as log:
            os.chown(self.log, pg.pw_uid, -1)
            self.proc = subprocess.Popen(
                [
                    *wrap,
                    str(bindir / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.socket_dir),
                    "-c",
                    f"listen_addresses={self.listen}",
                    "-c",
                    f"fsync={'on' if self.fsync else 'off'}",
                    "-c",
                    "max_connections=300",
                    "-c",
                    "shared_buffers=128MB",
                ],
                user=None if self.netns else "postgres",
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 60
        while self._psql("SELECT 1").returncode:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"postgres did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def _psql(self, sql: str, database: str = "postgres") -> subprocess.CompletedProcess[str]:
        bindir = postgres_bin()
        assert bindir is not None
        return self._as_postgres(
            str(bindir / "psql"),
            "-h",
            str(self.socket_dir),
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            database,
            "-v",
            "ON_ERROR_STOP=1",
            "-qAtc",
            sql,
        )

    def sql(self, sql: str, database: str = "postgres") -> str:
        r = self._psql(sql, database)
        if r.returncode:
            raise RuntimeError(f"psql {sql!r}: {r.stderr.strip()}")
        return r.stdout

    def create_role(self) -> None:
        self.sql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{self.password}'")
        # The password reaches libpq only through the password file (PGPASSFILE), never a URL or an argument.
        with passfile().open("a") as f:
            f.write(f"{self.listen}:{self.port}:*:{ROLE}:{self.password}\n")

    def local_url(self, url: str) -> str:
        """The same database through the cluster's Unix socket: reachable from inside a network namespace (local
        connections need no password here)."""
        return f"postgresql://{ROLE}@/{url.rsplit('/', 1)[1]}?host={self.socket_dir}&port={self.port}"

    def new_database(self, prefix: str = "mobility") -> str:
        """A new empty database owned by the server's role; its URL (no password)."""
        name = f"{prefix}_{os.getpid()}_{next(_counter)}"
        self.sql(f"CREATE DATABASE {name} OWNER {ROLE}")
        return self.url(name)

    def stop(self) -> None:
        """Fast shutdown by PID (SIGINT), then SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def new_cluster(fsync: bool = False, listen: str = "127.0.0.1", netns: str | None = None) -> PostgresCluster:
    """An initialised, running cluster in a fresh directory the `postgres` user can reach (not under pytest's
    root-only temporary directories), with the server's role and its password file."""
    cluster = PostgresCluster(Path(tempfile.mkdtemp(prefix="mobility-pg-")), fsync=fsync, listen=listen, netns=netns)
    try:
        cluster.init()
        cluster.start()
        cluster.create_role()
    except BaseException:
        cluster.remove()
        raise
    return cluster


@dataclass
class _Session:
    cluster: PostgresCluster | None = None
    passfile: Path | None = None


_session = _Session()


def passfile() -> Path:
    """This test process's password file, which it and the server processes it starts use (PGPASSFILE)."""
    if _session.passfile is None:
        fd, name = tempfile.mkstemp(prefix="mobility-pgpass-")
        os.close(fd)
        _session.passfile = Path(name)
        _session.passfile.chmod(0o600)
        os.environ["PGPASSFILE"] = name
    return _session.passfile


def shared_cluster() -> PostgresCluster:
    """One cluster for the whole test session, started on first use (conftest.py stops it at the end). Its
    password is in ``passfile()``, which the server processes the tests start inherit as PGPASSFILE."""
    if _session.cluster is None:
        _session.cluster = new_cluster()
    return _session.cluster


def stop_shared_cluster() -> None:
    if _session.cluster is not None:
        with contextlib.suppress(Exception):
            _session.cluster.remove()
        _session.cluster = None
    if _session.passfile is not None:
        _session.passfile.unlink(missing_ok=True)


def on_postgresql() -> bool:
    """Whether the server suites run against PostgreSQL this session (MOBILITY_TEST_DATABASE=postgresql)."""
    return os.environ.get("MOBILITY_TEST_DATABASE", "sqlite") == "postgresql"
