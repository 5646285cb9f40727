"""Start `mobility-server serve` on a free loopback port as a child process (demo, benchmarks, tests)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_READY = re.compile(r"listening on (127\.0\.0\.1:(\d+)) fingerprint: (sha256:[0-9a-f]{64})")


def init_local_server(data: Path) -> str:
    """`mobility-server init` for 127.0.0.1; returns what it printed (the fingerprint line among it)."""
    r = subprocess.run(
        [sys.executable, "-m", "server", "init", "--data", str(data), "--name", "127.0.0.1"],
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


def start_local_server(data: Path, *args: str, port: int = 0) -> tuple[subprocess.Popen[str], str, str]:
    """The process, its ``127.0.0.1:PORT`` and its CA fingerprint, once it listens; raises if it did not start."""
    with server_log(data).open("a") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--data", str(data), "--listen", f"127.0.0.1:{port}", *args],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=REPO,
        )
    line = proc.stdout.readline() if proc.stdout else ""  # the server prints this line once it listens
    m = _READY.search(line)
    if not m:
        proc.kill()
        proc.wait(timeout=10)
        raise RuntimeError(f"mobility-server did not start: {line.strip()} {server_log(data).read_text()[-2000:]}")
    return proc, m.group(1), m.group(3)
