"""A real daemon process (`mobility run --root`) against a real configuration server on loopback."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import faults
from tests.conftest import REPO
from tests.integration.serverproc import (
    ServerProcess,
    agent_cli,
    configure_root,
    sandbox_root,
    secret_file,
    start_server,
    wait_for,
)

pytestmark = pytest.mark.integration


@dataclass
class Agent:
    root: Path
    proc: subprocess.Popen[str]
    notify: socket.socket
    grow: Path  # where a request to grow the daemon's memory is left (tests/faults/)

    def grow_memory(self, mib: int) -> None:
        """Real memory growth inside the daemon, as a leak would: it takes the request at its next tick."""
        (self.grow / "grow").write_text(str(mib))
        wait_for(f"the daemon to grow by {mib} MiB", lambda: not (self.grow / "grow").exists())

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.root / "var/lib/mobility/daemon.json").read_text()))
        except (OSError, ValueError):
            return {}

    def log(self) -> str:
        path = self.root / "var/log/mobility/agent.log"
        return path.read_text() if path.exists() else ""

    def health(self) -> tuple[int, dict[str, Any]]:
        r = agent_cli("health", "--root", str(self.root), "--json")
        return r.returncode, json.loads(r.stdout)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[ServerProcess, Agent]]:
    server = start_server(tmp_path / "data", heartbeat_interval=1.0)
    with ExitStack() as cleanup:  # whatever fails below, the server (and the daemon, once started) is stopped
        cleanup.callback(server.stop)
        root = sandbox_root(tmp_path / "m", "d1" * 16)
        assert configure_root(server, root, secret_file(tmp_path / "pass", server.passphrase()))[0] == 0
        r = agent_cli("freeze-provider", "install", "--root", str(root))  # ext4 and root: ready, recorded
        assert r.returncode == 0, r.stdout + r.stderr
        (root / "etc/mobility/mobility.conf").write_text(json.dumps({"health_seconds": 1}))
        (tmp_path / "grow").mkdir()  # memory growth requests for the daemon's fault point (tests/faults/)
        notify = cleanup.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(10)
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--root", str(root)],
            cwd=REPO,
            text=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**faults.environment(grow=str(tmp_path / "grow")), "NOTIFY_SOCKET": str(tmp_path / "notify")},
        )
        cleanup.callback(_kill, proc)
        yield server, Agent(root, proc, notify, tmp_path / "grow")


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def test_daemon_heartbeats_and_local_health_agrees_with_the_server(setup: tuple[ServerProcess, Agent]) -> None:
    server, agent = setup
    messages = set()
    while "READY=1" not in messages:
        messages.add(agent.notify.recv(4096).decode())
    wait_for("heartbeats", lambda: agent.status().get("heartbeats_sent", 0) >= 3)
    code, local = agent.health()
    assert (code, local["status"]) == (0, "healthy"), local
    (machine,) = wait_for("the server's view", lambda: [m for m in server.machines() if m["health"] == "healthy"])
    assert machine["state"] == "online"
    r = agent_cli("status", "--root", str(agent.root), "--json")
    status = json.loads(r.stdout)
    assert (status["daemon"], status["registration"], status["host_id"]) == (
        "running",
        "registered",
        machine["host_id"],
    )

    started = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=5) == 0
    assert time.monotonic() - started < 5
    code, local = agent.health()
    assert code == 2 and local["checks"][0]["message"] == "daemon not running"


def test_server_down_warns_keeps_a_backlog_and_catches_up(setup: tuple[ServerProcess, Agent]) -> None:
    server, agent = setup
    wait_for("first heartbeat", lambda: agent.status().get("heartbeats_sent", 0) >= 1)
    port = server.port
    server.stop()
    wait_for("backlog", lambda: agent.status().get("backlog", 0) >= 3)
    assert "server unreachable since" in agent.log()
    code, local = agent.health()
    server_check = next(c for c in local["checks"] if c["id"] == "HLT-SERVER")
    assert (code, server_check["status"]) == (1, "WARN")
    assert agent.proc.poll() is None  # the daemon keeps running

    restarted = start_server(server.data, heartbeat_interval=1.0, port=port)
    try:
        wait_for(
            "catch-up",
            lambda: agent.status().get("unreachable_since", 1) is None and agent.status().get("backlog") == 0,
        )
        assert "server reachable again" in agent.log()
        wait_for("online again", lambda: [m for m in restarted.machines() if m["state"] == "online"])
    finally:
        restarted.stop()


def test_memory_budget_warns_then_restarts_cleanly(setup: tuple[ServerProcess, Agent]) -> None:
    _, agent = setup
    checks = wait_for("a health report", lambda: agent.status().get("health", {}).get("checks"))
    rss = float(next(c for c in checks if c["id"] == "HLT-RSS")["value"].split()[0])
    budget, warn_at = rss + 26, rss + 8  # growing 16 MiB warns, growing 16 more passes the budget
    conf = {"health_seconds": 1, "memory_budget_mib": budget, "memory_warn_ratio": warn_at / budget}
    (agent.root / "etc/mobility/mobility.conf").write_text(json.dumps(conf))
    agent.proc.send_signal(signal.SIGHUP)
    wait_for("reload", lambda: "configuration reloaded" in agent.log())
    pid = agent.proc.pid
    started = agent.status()["started"]
    agent.grow_memory(16)
    wait_for("warning and shedding", lambda: "shedding caches" in agent.log())
    assert "restarting cleanly" not in agent.log()
    agent.grow_memory(16)
    wait_for("clean restart", lambda: "restarting cleanly" in agent.log() and agent.log().count("daemon started") == 2)
    assert agent.proc.poll() is None  # re-executed in place: the same process, as systemd expects
    # The record the restarted daemon writes, not the last one of the process before the restart.
    wait_for("the restarted daemon's record", lambda: agent.status().get("started", 0) > started)
    assert agent.status()["pid"] == pid
    after = wait_for(
        "a report after the restart",
        lambda: (s := agent.status()).get("health", {}).get("time", 0) >= s["started"] and s["health"]["checks"],
    )
    rss_after = float(next(c for c in after if c["id"] == "HLT-RSS")["value"].split()[0])
    assert rss_after < budget


def test_diagnostics_of_a_live_agent_hold_no_secret(setup: tuple[ServerProcess, Agent], tmp_path: Path) -> None:
    import tarfile

    server, agent = setup
    wait_for("first heartbeat", lambda: agent.status().get("heartbeats_sent", 0) >= 1)
    passphrase = server.passphrase()
    conf = agent.root / "etc/mobility/bootstrap.conf"
    conf.write_text(f"passphrase_file = {tmp_path / 'pass'}\n")
    out = tmp_path / "diag.tar.gz"
    r = agent_cli("diagnostics", "--root", str(agent.root), "-o", str(out))
    assert r.returncode == 0, r.stderr
    with tarfile.open(out) as tar:
        blob = b"".join(f.read() for m in tar.getmembers() if (f := tar.extractfile(m)) is not None)
    assert passphrase.encode() not in blob
    assert b"PRIVATE KEY" not in blob
    assert b"HLT-RSS" in blob
