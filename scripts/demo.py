"""The main job on embedded defaults, as far as it exists today:

a configuration server on loopback (init + serve), one source machine registered from a sandbox root
(real Debian 12 release files, its own machine-id), a heartbeat, and the server's view of the machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from agent.paths import Paths
from agent.registration import heartbeat
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

        step("heartbeat with a health report (the daemon's job, next issue)")
        print(json.dumps(heartbeat(Paths(root), {"status": "healthy", "checks": []})))

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
