"""The main job on embedded defaults, as far as it exists today:

a configuration server on loopback (init + serve), one source machine registered from a sandbox root (real
Debian 12 release files, its own machine-id), the daemon heartbeating, the machine's status and health report,
and the server's view of it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from scripts.localserver import start_local_server

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / ".demo"
TREES = REPO / "tests" / "resources" / "distros"


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *cmd], capture_output=True, text=True, check=False, timeout=120, cwd=REPO
    )


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def main() -> int:
    data, root = DEMO / "server", DEMO / "root"
    if not (data / ".initialised").exists():
        step("mobility-server init --data .demo/server --name 127.0.0.1")
        shutil.rmtree(data, ignore_errors=True)
        r = run("server", "init", "--data", str(data), "--name", "127.0.0.1")
        print(r.stdout + r.stderr, end="")
        if r.returncode:
            return r.returncode
    if not root.exists():
        shutil.copytree(TREES / "debian12", root, symlinks=True)
        (root / "etc" / "machine-id").write_text(os.urandom(16).hex() + "\n")
        (root / "etc" / "hostname").write_text("demo-source\n")

    step("mobility-server serve --data .demo/server --listen 127.0.0.1:0")
    server, address, fingerprint = start_local_server(data)
    try:
        print(f"listening on {address} fingerprint: {fingerprint}")

        step("mobility detect-os --root .demo/root")
        print(run("agent", "detect-os", "--root", str(root)).stdout, end="")

        step(f"mobility configure --root .demo/root -i {address} -P <passphrase file> --cs-fingerprint ...")
        secret = DEMO / "passphrase"
        secret.write_text((data / "passphrase").read_text())
        secret.chmod(0o600)
        r = run(
            "agent", "configure", "--root", str(root), "-i", address, "-P", str(secret), "--cs-fingerprint", fingerprint
        )
        print(r.stdout + r.stderr, end="")
        if r.returncode:
            return r.returncode

        step("mobility run --root .demo/root  (the daemon, in the background for a few seconds)")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--root", str(root)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            status_file = root / "var" / "lib" / "mobility" / "daemon.json"
            for _ in range(100):  # bounded: 20 s at most
                if status_file.exists() and json.loads(status_file.read_text()).get("heartbeats_sent", 0) >= 1:
                    break
                time.sleep(0.2)
            print(f"daemon pid {daemon.pid}: heartbeating")

            step("mobility status --root .demo/root")
            print(run("agent", "status", "--root", str(root)).stdout, end="")

            step("mobility health --root .demo/root")
            r = run("agent", "health", "--root", str(root))
            print(r.stdout, end="")
        finally:
            daemon.terminate()
            daemon.wait(timeout=10)

        step("mobility-server machines")
        server.send_signal(signal.SIGTERM)  # a clean stop flushes the heartbeat batch to the database
        server.wait(timeout=15)
        print(run("server", "machines", "--data", str(data)).stdout, end="")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
