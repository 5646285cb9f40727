"""The main job on embedded defaults: a configuration server on loopback, and one source machine bootstrapped
into a sandbox root by the frozen bootstrapper, as a VM template would at boot, ending with its health report.

Everything lives in .demo/ and is made anew on each run (the frozen programs are cached by a hash of the
sources), so a second run shows the same thing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from scripts.localserver import init_local_server, start_local_server

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / ".demo"
TREES = REPO / "tests" / "resources" / "distros"


def run(*cmd: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=False, timeout=900, cwd=REPO, **kw)  # type: ignore[call-overload]


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def show(r: subprocess.CompletedProcess[str]) -> None:
    print(r.stdout + r.stderr, end="")


def main() -> int:
    data, root, dist = DEMO / "server", DEMO / "root", DEMO / "dist"
    for stale in (data, root):
        shutil.rmtree(stale, ignore_errors=True)
    DEMO.mkdir(exist_ok=True)

    step("packaging/build --tags DEBIAN12  (PyInstaller; cached by a hash of the sources)")
    r = run(str(REPO / "packaging" / "build"), "--tags", "DEBIAN12", "--out", str(dist))
    print("\n".join(line for line in r.stdout.splitlines() if "MiB" in line or "bundles in" in line))
    if r.returncode:
        show(r)
        return r.returncode
    (bundle,) = dist.glob("*_DEBIAN12-64_*.tar.gz")

    step("mobility-server init --data .demo/server --name 127.0.0.1")
    print(init_local_server(data), end="")
    step(f"mobility-server repo add {bundle.name}")
    show(run(sys.executable, "-m", "server", "repo", "add", "--data", str(data), str(bundle)))

    step("mobility-server serve --data .demo/server --listen 127.0.0.1:0")
    server, address, fingerprint = start_local_server(data)
    try:
        print(f"listening on {address} fingerprint: {fingerprint}")

        step("a template: Debian 12 release files, its own machine-id, bootstrap.conf and a passphrase file")
        shutil.copytree(TREES / "debian12", root, symlinks=True)
        (root / "etc" / "machine-id").write_text(os.urandom(16).hex() + "\n")
        (root / "etc" / "hostname").write_text("demo-source\n")
        conf = root / "etc" / "mobility"
        conf.mkdir(parents=True)
        (conf / "passphrase").write_text((data / "passphrase").read_text())
        (conf / "passphrase").chmod(0o600)
        (conf / "bootstrap.conf").write_text(
            f"server = {address}\nfingerprint = {fingerprint}\npassphrase_file = /etc/mobility/passphrase\n"
        )
        print((conf / "bootstrap.conf").read_text(), end="")

        step("mobility-bootstrap --root .demo/root  (the frozen bootstrapper, as at boot)")
        show(run(str(dist / "mobility-bootstrap"), "--root", str(root)))
        step("mobility-bootstrap --root .demo/root  (the next boot: nothing to do)")
        started = time.perf_counter()
        r = run(str(dist / "mobility-bootstrap"), "--root", str(root))
        print(f"{r.stdout.strip()} ({(time.perf_counter() - started) * 1000:.0f} ms)")

        agent = root / "usr" / "local" / "mobility" / "current" / "mobility" / "mobility"
        step("the installed agent's daemon: .demo/root/usr/local/mobility/current/mobility/mobility run")
        daemon = subprocess.Popen(
            [str(agent), "run", "--root", str(root)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            status_file = root / "var" / "lib" / "mobility" / "daemon.json"
            for _ in range(100):  # bounded: 20 s at most
                if status_file.exists() and json.loads(status_file.read_text()).get("heartbeats_sent", 0) >= 1:
                    break
                time.sleep(0.2)
            print(f"daemon pid {daemon.pid}: heartbeating")
            step("mobility status --root .demo/root")
            show(run(str(agent), "status", "--root", str(root)))
            step("mobility health --root .demo/root")
            show(run(str(agent), "health", "--root", str(root)))
        finally:
            daemon.terminate()
            daemon.wait(timeout=10)

        server.send_signal(signal.SIGTERM)  # a clean stop flushes the heartbeat batch to the database
        server.wait(timeout=15)
        step("mobility-server jobs")
        show(run(sys.executable, "-m", "server", "jobs", "--data", str(data)))
        step("mobility-server machines")
        show(run(sys.executable, "-m", "server", "machines", "--data", str(data)))
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
