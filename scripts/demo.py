"""The main job on embedded defaults, then the whole recovery loop: a configuration server on loopback; one source
machine bootstrapped into a sandbox root by the frozen bootstrapper, as a VM template would at boot, with its health
report; then (root) a loop-device disk of that machine (ext4, a writer appending numbered, fsynced records) protected
until CONTINUOUS, a crash-consistent point cut, `mobility-server test-failover` of it in libguestfs's appliance, and
the records the point holds against the writer's acknowledgements. The server, the daemon and the writer then run on
with the dashboard until Ctrl-C (`./demo --no-wait`: the demo ends after the records).

`./demo push` (root): the other way in. Two local test hosts (Debian 12 booted with systemd-nspawn, each in its
own network namespace with OpenSSH; scripts/testlab.py) and a configuration server in the lab's hub namespace;
`mobility-server push` installs and registers the agent on both over SSH.

Everything lives in .demo/ and is made anew on each run (the frozen programs are cached by a hash of the
sources), so a second run shows the same thing. Whatever ends the demo (Ctrl-C, SIGTERM, a failed step), what it
started is undone by PID and by name, in reverse (scripts/replication_lab.Lab)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent.host.paths import Paths
from agent.replication.tracing import TRACEFS, instance_name, remove_instance
from scripts import demo_records
from scripts.localserver import init_local_server, start_local_server, ui_url
from scripts.polling import wait_for
from scripts.replication_lab import Lab, Machine, stop

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / ".demo"
TREES = REPO / "tests" / "resources" / "distros"
HOSTNAME = "demo-source"
NEEDS_ROOT = (
    "loop devices (the demo machine's disk), fsfreeze (a crash-consistent point), the kernel's block tracepoints "
    "(the agent's change tracking) and QEMU with this machine's kernel image (libguestfs's appliance, where the test "
    "failover reads the point)"
)


def run(*cmd: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=False, timeout=900, cwd=REPO, **kw)  # type: ignore[call-overload,no-any-return]


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


class DemoFailed(Exception):
    """A step that did not do what the demo shows: its output is printed, the demo cleans up and exits 1."""


def server_cli(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mobility-server ARGS --data DATA`, its output shown; DemoFailed if it failed."""
    r = run(sys.executable, "-m", "server", *args, "--data", str(data))
    show(r)
    if r.returncode:
        raise DemoFailed(f"mobility-server {args[0]} exited {r.returncode}")
    return r


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (a CI timeout, `kill`) or SIGHUP clean up as Ctrl-C does


def main() -> int:
    argv = sys.argv[1:]
    if argv == ["push"]:
        return push_demo()
    if argv not in ([], ["--no-wait"]):
        print("usage: ./demo [--no-wait] | ./demo push", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)  # its terminal closed
    if os.geteuid() != 0:
        print(f"./demo: not root: it stops after the bootstrap. The whole loop needs root for {NEEDS_ROOT}.")
    for stale in (DEMO / "server", DEMO / "root", DEMO / "lab"):
        shutil.rmtree(stale, ignore_errors=True)
    DEMO.mkdir(exist_ok=True)
    lab = Lab(DEMO / "lab")
    try:
        code = whole_loop(lab, wait="--no-wait" not in argv)
    except DemoFailed as e:
        print(f"\n./demo: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("\n./demo: interrupted", file=sys.stderr)
        code = 130
    except Exception as e:  # a step that timed out or could not start: one line, then the same cleanup
        print(f"\n./demo: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    finally:
        # Everything the demo started, undone in reverse by PID and by name (writer, daemon, thaw, the agent's
        # tracing instance, mount, loop device, server), whatever failed in between; a second Ctrl-C waits for it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            lab.close()
        except RuntimeError as e:
            print(f"./demo: {e}", file=sys.stderr)
            code = 1
    return code


def whole_loop(lab: Lab, *, wait: bool) -> int:
    data, root, dist = DEMO / "server", DEMO / "root", DEMO / "dist"
    bundle = build(dist)
    if bundle is None:
        return 1
    step("mobility-server init --data .demo/server --name 127.0.0.1")
    print(init_local_server(data), end="")
    step(f"mobility-server repo add {bundle.name}")
    server_cli(data, "repo", "add", str(bundle))

    # Agents heartbeat every 2 s (30 by default): protection reaches the machine at its next heartbeat answer.
    step("mobility-server serve --data .demo/server --listen 127.0.0.1:0 --heartbeat-interval 2 --ui-listen ...:0")
    server, address, fingerprint = start_local_server(data, "--heartbeat-interval", "2", own_session=True)
    lab.defer(f"server {server.pid}", lambda: stop(server))
    print(f"listening on {address} fingerprint: {fingerprint}")

    step("a template: Debian 12 release files, its own machine-id, bootstrap.conf and a passphrase file")
    shutil.copytree(TREES / "debian12", root, symlinks=True)
    (root / "etc" / "machine-id").write_text(os.urandom(16).hex() + "\n")
    (root / "etc" / "hostname").write_text(f"{HOSTNAME}\n")
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
    r = run(str(dist / "mobility-bootstrap"), "--root", str(root), env=cache)
    show(r)
    if r.returncode:
        raise DemoFailed(f"mobility-bootstrap exited {r.returncode}")
    step("mobility-bootstrap --root .demo/root  (the next boot: nothing to do)")
    started = time.perf_counter()
    r = run(str(dist / "mobility-bootstrap"), "--root", str(root), env=cache)
    print(f"{r.stdout.strip()} ({(time.perf_counter() - started) * 1000:.0f} ms)")

    agent = root / "usr" / "local" / "mobility" / "current" / "mobility" / "mobility"
    step("the installed agent's daemon: .demo/root/usr/local/mobility/current/mobility/mobility run")
    machine = Machine(root, HOSTNAME, agent_started=time.time())
    daemon = subprocess.Popen(
        [str(agent), "run", "--root", str(root)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # a Ctrl-C reaches the demo only, which stops the daemon in its turn
    )
    machine.agent = daemon
    lab.defer(f"daemon {daemon.pid}", lambda: stop(daemon))
    status_file = root / "var" / "lib" / "mobility" / "daemon.json"

    def heartbeating() -> bool:
        if daemon.poll() is not None:
            raise DemoFailed(f"the daemon exited {daemon.returncode}: {machine.log()[-2000:]}")
        return status_file.exists() and json.loads(status_file.read_text()).get("heartbeats_sent", 0) >= 1

    wait_for("the daemon's first heartbeat", heartbeating, timeout=60)
    print(f"daemon pid {daemon.pid}: heartbeating")
    step("mobility status --root .demo/root")
    show(run(str(agent), "status", "--root", str(root)))
    step("mobility health --root .demo/root")
    show(run(str(agent), "health", "--root", str(root)))

    if os.geteuid() != 0:
        step("the rest needs root")
        print(f"Protecting a disk, cutting a point and testing its failover need root for {NEEDS_ROOT}: sudo ./demo")
        return 2

    step("a disk of the demo machine: a 64 MiB loop device (losetup --find) with ext4, mounted at .demo/lab/data-mnt0")
    disk = lab.disk("data", 64 << 20)
    lab.expose(machine, disk)  # its node in the machine's root, where the agent resolves it
    instance = TRACEFS / "instances" / instance_name(Paths(root.resolve()).state_dir)
    lab.defer("the agent's tracing instance", lambda: remove_instance(instance))  # a clean stop keeps it tracing
    lab.defer("thaw", lambda: run(str(agent), "thaw", "--root", str(root)))  # whatever a point left frozen
    lab.defer(f"daemon {daemon.pid}", lambda: stop(daemon))  # stopped before its disk goes
    print(f"{disk.loop}: ext4, mounted at {disk.mounts[0].relative_to(REPO)}; its node in .demo/root{disk.loop}")

    records, log = disk.mounts[0] / "records.txt", lab.workdir / "writer.log"
    step("a writer on it: numbered records appended to records.txt, each fsynced (acknowledged: .demo/lab/writer.log)")
    writer = subprocess.Popen(
        [sys.executable, "-m", "scripts.demo_records", str(log), str(records)],
        cwd=REPO,
        text=True,
        start_new_session=True,
    )
    lab.defer(f"writer {writer.pid}", lambda: stop(writer))
    print(f"writer pid {writer.pid}: a record every {demo_records.PACE:g} s")

    step(f"mobility-server protect --machine {HOSTNAME} --disk {disk.loop}")
    server_cli(data, "protect", "--machine", HOSTNAME, "--disk", disk.loop)
    seen: list[str] = []

    def continuous() -> bool:
        if daemon.poll() is not None:
            raise DemoFailed(f"the daemon exited {daemon.returncode}: {machine.log()[-2000:]}")
        if machine.status().get("updated", 0) < machine.agent_started:
            return False
        state = machine.disk_state(disk).get("state")
        if state and (not seen or seen[-1] != state):
            seen.append(state)
            print(f"  {disk.loop}: {state}", flush=True)
        return state == "CONTINUOUS"

    wait_for(f"{disk.loop} in CONTINUOUS", continuous, timeout=600)
    step("mobility status --root .demo/root")
    show(run(str(agent), "status", "--root", str(root)))

    step("mobility point --root .demo/root  (now: the filesystem frozen, what is left sent, thawed)")
    r = run(str(agent), "point", "--root", str(root), "--json", "--timeout", "300")
    if r.returncode:
        show(r)
        raise DemoFailed(f"mobility point exited {r.returncode}")
    point = json.loads(r.stdout)
    frozen = "; ".join(f"{m['mount']} ({m['type']} on {', '.join(m['disks'])})" for m in point.get("frozen", []))
    print(
        f"point {point['point_id']} ({point['consistency']}): froze {frozen or 'no filesystem'} for "
        f"{point['freeze_ms']} ms, {point['residual_chunks']} residual chunks"
    )
    step(f"mobility-server points --machine {HOSTNAME}")
    server_cli(data, "points", "--machine", HOSTNAME)

    step(
        f"mobility-server test-failover --machine {HOSTNAME} --point {point['point_id']}  (in libguestfs's appliance "
        "under QEMU, never mounted on this machine; the demo reads records.txt through the same appliance)"
    )
    recovered = test_failover(data, str(point["point_id"]), disk.loop)
    step("mobility-server jobs")
    server_cli(data, "jobs")
    step("mobility-server protection")
    server_cli(data, "protection")

    step("the records in the point (read in the appliance) against the writer's acknowledgements")
    result = demo_records.check(
        recovered, demo_records.read_log(log.read_text()), float(point["frozen_at"]), float(point["thawed_at"])
    )
    for problem in result.problems:
        print(f"  NOT AS PROMISED: {problem}")
    if not result.ok:
        raise DemoFailed("the point does not hold what a crash-consistent point promises")
    print(result.line(), flush=True)
    if not wait:
        return 0

    step("the dashboard")
    print(f"dashboard and /metrics: {ui_url(data)}  (no login on loopback: docs/monitoring.md)")
    print(
        f"The server, the demo machine's daemon and its writer run on ({HOSTNAME} cuts a point every 5 minutes). "
        "Ctrl-C stops them, unmounts and detaches the disk.",
        flush=True,
    )
    try:
        while server.poll() is None and daemon.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        print()
        return 0
    raise DemoFailed(f"the {'server' if server.poll() is not None else 'daemon'} stopped on its own")


def test_failover(data: Path, point_id: str, disk: str) -> bytes:
    """`mobility-server test-failover` run in this process (its output, its job, its exit code), with a hook that
    reads the records file of ``disk`` while the appliance has that filesystem mounted read-only; its bytes."""
    from agent.shared.cli import report_error
    from agent.shared.errors import MobilityError
    from server.cli import build_parser
    from server.errors import FailoverInterrupted
    from server.process.cli import cmd_test_failover
    from server.process.inspection import Reader

    read: dict[str, bytes] = {}

    def inspect(where: str, _device: str, reader: Reader) -> None:
        if where == disk and reader.exists("/records.txt"):
            read[where] = reader.read("/records.txt", limit=256 << 20)

    args = build_parser().parse_args(["test-failover", "--data", str(data), "--machine", HOSTNAME, "--point", point_id])
    try:
        code = cmd_test_failover(args, inspect)
    except FailoverInterrupted as e:  # Ctrl-C or SIGTERM while it ran: the demo stops as it does anywhere else
        report_error(e, json_out=False)
        raise KeyboardInterrupt from None
    except MobilityError as e:
        code = report_error(e, json_out=False)
    if code:
        raise DemoFailed(f"mobility-server test-failover exited {code}")
    if disk not in read:
        raise DemoFailed(f"records.txt was not found on {disk} in the point")
    return read[disk]


if __name__ == "__main__":
    sys.exit(main())
