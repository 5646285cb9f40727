"""Start `mobility-server serve` on a free port as a child process (demo, benchmarks, tests): on loopback, or on an
address inside a network namespace when ``wrap`` is ``ip netns exec NS``."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_READY = re.compile(r"listening on (\S+:(\d+)) fingerprint: (sha256:[0-9a-f]{64})")


def init_local_server(
    data: Path, name: str = "127.0.0.1", database: str | None = None, also: Sequence[str] = ()
) -> str:
    """`mobility-server init` for ``name`` and the names in ``also`` (on ``database``, a PostgreSQL URL, if given:
    the data directory records it for every later command); returns what it printed (the fingerprint line among
    it)."""
    names = [arg for n in (name, *also) for arg in ("--name", n)]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "server",
            "init",
            "--data",
            str(data),
            *names,
            *(["--database", database] if database else []),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=REPO,
    )
    if r.returncode:
        raise RuntimeError(f"mobility-server init failed: {r.stderr.strip()}")
    return r.stdout


def server_log(data: Path) -> Path:
    """Where the server's log (its stderr) goes: beside the data directory, never into a pipe that could fill."""
    return data.parent / f"{data.name}-server.log"


def process_port(data: Path) -> int | None:
    """The port of a running server's process-server role (replication streams), from its log; None without one."""
    found = re.findall(r"process server receiving on \S+:(\d+)", server_log(data).read_text())
    return int(found[-1]) if found else None


def ui_url(data: Path) -> str | None:
    """Where a running server's dashboard and /metrics listen (``http://HOST:PORT`` on loopback, ``https://...``
    elsewhere), from its log; None without one."""
    found = re.findall(r"dashboard and /metrics on (\S+) \(", server_log(data).read_text())
    return str(found[-1]) if found else None


def configure_agent(
    root: Path, address: str, secret: Path, fingerprint: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    """`mobility configure --json` of the machine at ``root`` with a server at ``address`` (the passphrase or token
    in the file ``secret``), as a process; the caller reads its code and output."""
    argv = ["configure", "--root", str(root), "-i", address, "-P", str(secret), "--cs-fingerprint", fingerprint]
    return subprocess.run(
        [sys.executable, "-m", "agent", *argv, "--json", *extra],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )


def start_local_server(
    data: Path,
    *args: str,
    port: int = 0,
    host: str = "127.0.0.1",
    wrap: Sequence[str] = (),
    env: dict[str, str] | None = None,
    own_session: bool = False,
) -> tuple[subprocess.Popen[str], str, str]:
    """The process, its ``HOST:PORT`` and its CA fingerprint, once it listens; raises if it did not start.
    ``wrap`` (e.g. ``ip netns exec NS``) execs the server, so the process is the server's own PID; ``env`` is its
    environment (e.g. tests.faults.environment(...) for a fault plan); ``own_session``: out of the terminal's process
    group, so that a Ctrl-C reaches only the caller, which stops the server in its turn."""
    if "--ui-listen" not in args:  # the dashboard's default port is fixed: several servers at once need free ones
        args = (*args, "--ui-listen", "127.0.0.1:0")
    with server_log(data).open("a") as log:
        proc = subprocess.Popen(
            [*wrap, sys.executable, "-m", "server", "serve", "--data", str(data), "--listen", f"{host}:{port}", *args],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=REPO,
            env=env,
            start_new_session=own_session,
        )
    line = proc.stdout.readline() if proc.stdout else ""  # the server prints this line once it listens
    m = _READY.search(line)
    if not m:
        proc.kill()
        proc.wait(timeout=10)
        raise RuntimeError(f"mobility-server did not start: {line.strip()} {server_log(data).read_text()[-2000:]}")
    return proc, m.group(1), m.group(3)
