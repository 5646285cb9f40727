"""bench/daemon_memory: the daemon's resident memory idle, and after 10,000 scheduler ticks and 1,000 heartbeats
against a real configuration server on loopback; its growth should be zero (flat).

    .venv/bin/python bench/daemon_memory.py [--ticks 10000]

Idle RSS is measured on a real `mobility run` process (from source, and the frozen one when
build/packaging/frozen exists); the ticks run in this process with a clock advancing 3 s a tick, so the 30 s
heartbeat fires 1,000 times against the real server."""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.daemon.config import AgentConfig  # noqa: E402
from agent.daemon.loop import Daemon, ServerLink  # noqa: E402
from agent.host.paths import Paths  # noqa: E402
from scripts.localserver import configure_agent, init_local_server, start_local_server  # noqa: E402

MIB = 1024 * 1024
TREES = REPO / "tests" / "resources" / "distros"


def registered_root(base: Path, data: Path, address: str, fingerprint: str) -> Path:
    root = base / "root"
    shutil.copytree(TREES / "debian12", root, symlinks=True)
    (root / "etc" / "machine-id").write_text(os.urandom(16).hex() + "\n")
    (root / "etc" / "mobility" / "freeze.d").mkdir(parents=True)
    secret = base / "pass"
    secret.write_text((data / "passphrase").read_text())
    secret.chmod(0o600)
    r = configure_agent(root, address, secret, fingerprint)
    if r.returncode:
        raise RuntimeError(f"configure failed: {r.stdout} {r.stderr}")
    return root


def idle_rss(command: list[str], settle: float = 6.0) -> float:
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(settle)
        if proc.poll() is not None:
            raise RuntimeError(f"{command[0]} exited with {proc.returncode} instead of running")
        samples = []
        for _ in range(5):
            samples.append(psutil.Process(proc.pid).memory_info().rss / MIB)
            time.sleep(0.5)
        return statistics.median(samples)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ticks", type=int, default=10_000)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    data = base / "data"
    init_local_server(data)
    server, address, fingerprint = start_local_server(data)
    try:
        root = registered_root(base, data, address, fingerprint)
        source = idle_rss([sys.executable, "-m", "agent", "run", "--root", str(root)])
        print(f"idle RSS, `mobility run` from source: {source:.1f} MiB")
        frozen = REPO / "build" / "packaging" / "frozen" / "mobility" / "mobility"
        if frozen.exists():
            print(f"idle RSS, frozen `mobility run`: {idle_rss([str(frozen), 'run', '--root', str(root)]):.1f} MiB")
        else:
            print("idle RSS, frozen: not measured (run packaging/build first)")

        me = psutil.Process()
        now = time.time()
        daemon = Daemon(Paths(root), AgentConfig(), ServerLink(Paths(root)), now=now)
        daemon.check_health()
        daemon.heartbeat()
        gc.collect()
        before = me.memory_info().rss / MIB
        start = time.perf_counter()
        checkpoints = []
        for i in range(args.ticks):
            now += 3.0
            daemon.tick(now)
            if (i + 1) % (args.ticks // 5) == 0:
                gc.collect()
                checkpoints.append(me.memory_info().rss / MIB)
        elapsed = time.perf_counter() - start
        gc.collect()
        after = me.memory_info().rss / MIB
        beats = daemon.status.heartbeats_sent
        daemon.link.close()
        print(f"{args.ticks} ticks, {beats} heartbeats to a real server in {elapsed:.1f} s")
        print(
            f"in-process RSS: {before:.1f} MiB before, {after:.1f} MiB after, growth {after - before:+.2f} MiB; "
            f"at each fifth: {', '.join(f'{c:.1f}' for c in checkpoints)} MiB"
        )
        status = json.loads((root / "var/lib/mobility/daemon.json").read_text())
        not_pass = [f"{c['id']} {c['status']}" for c in status["health"]["checks"] if c["status"] != "PASS"]
        print(
            f"daemon health at the end: {status['health']['status']} ({', '.join(not_pass) or 'all PASS'}), "
            f"backlog {status['backlog']}"
        )
    finally:
        server.terminate()
        server.wait(timeout=15)


if __name__ == "__main__":
    main()
