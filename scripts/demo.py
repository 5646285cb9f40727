"""The main job on embedded defaults: a configuration server on loopback, and one source machine bootstrapped
into a sandbox root by the frozen bootstrapper, as a VM template would at boot, ending with its health report.

`./demo push` (root): the other way in. Two local test hosts (Debian 12 booted with systemd-nspawn, each in its
own network namespace with OpenSSH; scripts/testlab.py) and a configuration server in the lab's hub namespace;
`mobility-server push` installs and registers the agent on both over SSH.

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


def build(dist: Path) -> Path | None:
    step("packaging/build --tags DEBIAN12  (PyInstaller; cached by a hash of the sources)")
    r = run(str(REPO / "packaging" / "build"), "--tags", "DEBIAN12", "--out", str(dist))
    print("\n".join(line for line in r.stdout.splitlines() if "MiB" in line or "bundles in" in line))
    if r.returncode:
        show(r)
        return None
    (bundle,) = dist.glob("*_DEBIAN12-64_*.tar.gz")
    return bundle


def push_demo() -> int:
    from scripts.testlab import Lab, sshd_base_root

    if os.geteuid() != 0:
        print("./demo push needs root: network namespaces, loop devices and systemd-nspawn", file=sys.stderr)
        return 2
    work, dist = DEMO / "push", DEMO / "dist"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    bundle = build(dist)
    if bundle is None:
        return 1
    step("two test hosts: Debian 12 (debootstrap, cached in .cache/) booted with systemd-nspawn, OpenSSH, own netns")
    with Lab(work / "lab", sshd_base_root()) as lab:
        hosts = [lab.add_host("db1"), lab.add_host("web1")]
        lab.boot()
        for h in hosts:
            print(f"{h.name}: {h.address} (network namespace {h.netns}), root's key: {lab.key}")
        data = work / "server"
        step(f"mobility-server init --name {lab.hub_address}; repo add {bundle.name}; serve in the hub namespace")
        init_local_server(data, lab.hub_address)
        show(run(sys.executable, "-m", "server", "repo", "add", "--data", str(data), str(bundle)))
        server, address, _ = start_local_server(data, host=lab.hub_address, wrap=lab.in_hub([]))
        try:
            print(f"listening on {address}")
            argv = ["push", "--data", str(data), "--server", address, "--key", str(lab.key)]
            argv += ["--accept-new-host-keys", *[a for h in hosts for a in ("--host", h.address)]]
            step("mobility-server " + " ".join(a.removeprefix(f"{REPO}/") for a in argv))
            pushed = subprocess.run(lab.in_hub([sys.executable, "-m", "server", *argv]), cwd=REPO, check=False)
            for h in hosts:
                active = lab.exec_in(h, ["systemctl", "is-active", "mobility.service"]).stdout.strip()
                print(f"{h.name}: mobility.service {active}")
            step("mobility-server jobs")
            show(run(sys.executable, "-m", "server", "jobs", "--data", str(data)))
            step("mobility-server machines")
            show(run(sys.executable, "-m", "server", "machines", "--data", str(data)))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=15)
    return pushed.returncode


def main() -> int:
    if sys.argv[1:] == ["push"]:
        return push_demo()
    data, root, dist = DEMO / "server", DEMO / "root", DEMO / "dist"
    for stale in (data, root):
        shutil.rmtree(stale, ignore_errors=True)
    DEMO.mkdir(exist_ok=True)

    bundle = build(dist)
    if bundle is None:
        return 1
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

        # Its first start unpacks its runtime once into a cache: the demo's own, not this machine's /var/lib/mobility.
        cache = {**os.environ, "MOBILITY_BOOTSTRAP_CACHE": str(DEMO / "bootstrap-cache")}
        step("mobility-bootstrap --root .demo/root  (the frozen bootstrapper, as at boot)")
        show(run(str(dist / "mobility-bootstrap"), "--root", str(root), env=cache))
        step("mobility-bootstrap --root .demo/root  (the next boot: nothing to do)")
        started = time.perf_counter()
        r = run(str(dist / "mobility-bootstrap"), "--root", str(root), env=cache)
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
