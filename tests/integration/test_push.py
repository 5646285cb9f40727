"""The real test of push install: hosts that are Debian 12 systems (and one Debian 11) booted with systemd
(systemd-nspawn), each in its own network namespace with its own address, root filesystem and OpenSSH server
(scripts/testlab.py). The configuration server and `mobility-server push` run in the lab's hub namespace, as on a
real network."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from scripts.localserver import init_local_server, server_log, start_local_server
from scripts.testlab import Host, Lab, sshd_base_root
from tests.conftest import DISTROS, REPO, require_root
from tests.integration.serverproc import server_cli, wait_for
from tests.postgres import new_cluster

pytestmark = pytest.mark.integration


@dataclass
class World:
    lab: Lab
    data: Path
    server: subprocess.Popen[str]
    address: str  # the server as the hosts reach it
    hosts: dict[str, Host]

    def push(self, *args: str, key: Path | None = None) -> tuple[int, dict[str, dict[str, Any]]]:
        """`mobility-server push --json`, run in the hub; the results by host name."""
        argv = [sys.executable, "-m", "server", "push", "--data", str(self.data), "--server", self.address, "--json"]
        if "--password-file" not in args:
            argv += ["--key", str(key or self.lab.key)]
        r = subprocess.run(
            self.lab.in_hub([*argv, *args]), capture_output=True, text=True, cwd=REPO, timeout=900, check=False
        )
        assert r.stdout.strip().startswith("{"), r.stderr
        doc = json.loads(r.stdout)
        by_target = {f"{h.address}:22": name for name, h in self.hosts.items()}
        return r.returncode, {by_target.get(r["host"], r["host"]): r for r in doc["hosts"]}

    def hosts_args(self, *names: str) -> list[str]:
        return [a for n in names for a in ("--host", self.hosts[n].address)]

    def jobs(self) -> dict[str, dict[str, Any]]:
        return {j["job_id"]: j for j in json.loads(server_cli(self.data, "jobs", "--json", check=True).stdout)}

    def machines(self) -> list[dict[str, Any]]:
        return list(json.loads(server_cli(self.data, "machines", "--json", check=True).stdout))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, dist: Path) -> Iterator[World]:
    require_root()
    base = sshd_base_root()
    work = tmp_path_factory.mktemp("push")
    with Lab(work / "lab", base) as lab:
        hosts = {
            "web1": lab.add_host("web1", users=("operator",)),
            "web2": lab.add_host("web2"),
            "web3": lab.add_host("web3", root_password="correct horse battery staple"),
            "web4": lab.add_host("web4"),
            "tmpfs": lab.add_host("tmpfs", disk="overlay"),  # a root that cannot be frozen
            "nosftp": lab.add_host("nosftp", sftp=False),
            "full": lab.add_host("full", disk="full"),
            "fedora": lab.add_host("fedora", os_release=DISTROS / "fedora30/etc/os-release"),
            "broken": lab.add_host("broken"),
            "deb11": lab.add_host("deb11", base=sshd_base_root("bullseye")),  # glibc 2.31, older than the build's
            "lb1": lab.add_host("lb1"),  # pushed through a balancer to two instances (docs/deployment.md)
        }
        # The install directory's place is taken by a file: the install on this host fails.
        (hosts["broken"].root / "usr/local/mobility").write_text("not a directory\n")
        lab.boot()
        data = work / "data"
        init_local_server(data, lab.hub_address)
        for bundle in (*dist.glob("*_DEBIAN12-64_*.tar.gz"), *dist.glob("*_DEBIAN11-64_*.tar.gz")):
            server_cli(data, "repo", "add", str(bundle), check=True)
        proc, address, _ = start_local_server(
            data, "--heartbeat-interval", "2", host=lab.hub_address, wrap=lab.in_hub([])
        )
        try:
            yield World(lab, data, proc, address, hosts)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def daemon_active(world: World, name: str) -> bool:
    r = world.lab.exec_in(world.hosts[name], ["systemctl", "is-active", "mobility.service"])
    return r.stdout.strip() == "active"


def leftovers(host: Host) -> list[str]:
    where = host.root / "var/lib/mobility-push"
    return sorted(p.name for p in where.iterdir()) if where.exists() else []


def test_push_to_several_hosts_in_parallel(world: World) -> None:
    # A push killed half-way three hours ago left its directory (and token file) on web2; a fresh one is kept.
    work = world.hosts["web2"].root / "var/lib/mobility-push"
    for name, age in (("killed-push", 3 * 3600), ("running-push", 0)):
        (work / name).mkdir(parents=True, mode=0o700)
        (work / name / "token").write_text("mbt_old_token\n")
        os.utime(work / name, (time.time() - age, time.time() - age))
    code, results = world.push("--accept-new-host-keys", *world.hosts_args("web1", "web2", "tmpfs"))
    assert code == 0, results
    assert {n: r["state"] for n, r in results.items()} == {
        "web1": "succeeded",
        "web2": "succeeded",
        "tmpfs": "succeeded with warnings",
    }
    assert results["tmpfs"]["error"]["code"] == "FREEZE-NOT-READY"
    assert {r["os_tag"] for r in results.values()} == {"DEBIAN12"}

    # Every host registered with its own identity, its daemon running under its own systemd and heartbeating.
    host_ids = {n: r["host_id"] for n, r in results.items()}
    assert len(set(host_ids.values())) == 3
    machines = {m["host_id"]: m for m in world.machines()}
    assert {machines[h]["hostname"] for h in host_ids.values()} == {"web1", "web2", "tmpfs"}
    for name in results:
        assert daemon_active(world, name), name
    wait_for(
        "heartbeats from the three daemons",
        lambda: all(m["state"] == "online" for m in world.machines() if m["host_id"] in host_ids.values()),
        timeout=60,
    )
    # One job per host, the server's: kind push, with the host's identity; the install log kept per job.
    jobs = world.jobs()
    for name, r in results.items():
        job = jobs[r["job_id"]]
        assert (job["kind"], job["state"], job["host_id"]) == ("push", r["state"], host_ids[name])
        assert "bootstrap [6/6] start the daemon" in (world.data / "push-logs" / f"{r['job_id']}.log").read_text()
        assert leftovers(world.hosts[name]) == (["running-push"] if name == "web2" else [])
    shutil.rmtree(work / "running-push")
    # Strict host keys from now on: each host's own key was recorded.
    known = (world.data / "known_hosts").read_text()
    for name in results:
        assert world.hosts[name].known_hosts_line + "\n" in known
    # The single-use tokens are gone, and no token reached a log on either side.
    assert "mbt_" not in server_log(world.data).read_text()
    for name in results:
        root = world.hosts[name].root
        assert "mbt_" not in (root / "var/log/mobility/install.log").read_text()

    # Pushing again changes nothing: the same identities, nothing reinstalled.
    log_before = (world.hosts["web1"].root / "var/log/mobility/install.log").read_text()
    code, again = world.push(*world.hosts_args("web1"))
    assert (code, again["web1"]["state"], again["web1"]["host_id"]) == (0, "succeeded", host_ids["web1"])
    assert "current" in again["web1"]["message"] or "nothing to do" in again["web1"]["message"]
    assert (world.hosts["web1"].root / "var/log/mobility/install.log").read_text() == log_before


def test_push_to_a_debian_11_host(world: World) -> None:
    code, results = world.push("--accept-new-host-keys", *world.hosts_args("deb11"))
    deb11 = results["deb11"]
    assert (code, deb11["state"], deb11["os_tag"]) == (0, "succeeded", "DEBIAN11"), results
    assert daemon_active(world, "deb11")
    wait_for(
        "heartbeats from the Debian 11 daemon",
        lambda: any(m["host_id"] == deb11["host_id"] and m["state"] == "online" for m in world.machines()),
        timeout=60,
    )
    # The daemon runs on the C library of its bundle; the system's own (2.31) is never loaded into it.
    host = world.hosts["deb11"]
    pid = world.lab.exec_in(host, ["systemctl", "show", "--property=MainPID", "--value", "mobility.service"])
    maps = world.lab.exec_in(host, ["cat", f"/proc/{pid.stdout.strip()}/maps"]).stdout
    libcs = {line.split()[-1] for line in maps.splitlines() if "/libc.so" in line or "/libc-2." in line}
    assert libcs == {"/usr/local/mobility/versions/0.1.0/mobility/_internal/libc.so.6"}, maps[-2000:]
    assert world.lab.exec_in(host, ["cat", "/etc/debian_version"]).stdout.startswith("11.")


def test_push_with_a_password_from_a_file(world: World, tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("correct horse battery staple\n")
    os.chmod(password, 0o600)
    code, results = world.push("--accept-new-host-keys", "--password-file", str(password), *world.hosts_args("web3"))
    assert (code, results["web3"]["state"]) == (0, "succeeded"), results
    assert daemon_active(world, "web3")
    assert "correct horse" not in server_log(world.data).read_text() + json.dumps(results)


def test_each_failure_has_its_id(world: World) -> None:
    refused = f"{world.hosts['web2'].address}:2222"  # a real host, a port with nothing listening
    code, results = world.push(
        "--accept-new-host-keys",
        *world.hosts_args("nosftp", "full", "fedora", "broken"),
        "--host",
        refused,
        "--host",
        "nosuch.invalid",
    )
    assert code == 1
    ids = {n: (r["state"], r["error"]["code"]) for n, r in results.items()}
    assert ids == {
        "nosftp": ("failed", "PUSH-NO-SFTP"),
        "full": ("failed", "PUSH-LOW-DISK-SPACE"),
        "fedora": ("failed", "OS-UNSUPPORTED"),
        "broken": ("failed", "PUSH-INSTALL-FAILED"),
        refused: ("failed", "PUSH-CONNECT-REFUSED"),
        "nosuch.invalid:22": ("failed", "PUSH-NAME-UNRESOLVED"),
    }
    assert "Fedora" in results["fedora"]["error"]["message"]
    assert "MiB free for /" in results["full"]["error"]["message"]
    broken = results["broken"]
    assert "INSTALL-DIR-NOT-OURS" in broken["error"]["message"] and broken["log_tail"]
    assert any("install failed" in line for line in broken["log_tail"])
    # Every failure is a job with its ID and remediation; nothing was left behind on the hosts.
    jobs = world.jobs()
    for r in results.values():
        job = jobs[r["job_id"]]
        assert (job["kind"], job["state"], job["error_id"]) == ("push", "failed", r["error"]["code"])
        assert job["remediation"]
    for name in ("nosftp", "full", "fedora", "broken"):
        assert leftovers(world.hosts[name]) == []
    assert not (world.hosts["full"].root / "usr/local/mobility").exists()


def test_wrong_user_wrong_key_and_host_keys(world: World, tmp_path: Path) -> None:
    code, results = world.push("--user", "operator", *world.hosts_args("web1"))
    assert (code, results["web1"]["error"]["code"]) == (1, "PUSH-NOT-ROOT")

    stranger = tmp_path / "stranger"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(stranger))
    code, results = world.push(*world.hosts_args("web2"), key=stranger)
    assert (code, results["web2"]["error"]["code"]) == (1, "PUSH-AUTH-FAILED")

    # A host whose key was never recorded is refused without --accept-new-host-keys.
    fresh = World(world.lab, tmp_path / "other-data", world.server, world.address, world.hosts)
    shutil.copytree(world.data, fresh.data)
    (fresh.data / "known_hosts").unlink()
    code, results = fresh.push(*fresh.hosts_args("web2"))
    assert (code, results["web2"]["error"]["code"]) == (1, "PUSH-HOST-KEY-UNKNOWN")
    assert world.hosts["web2"].host_key_public.split()[0] in results["web2"]["error"]["message"]

    # The recorded key of web1 is replaced by web2's: web1 now looks like an impostor, even with TOFU allowed.
    known = fresh.data / "known_hosts"
    known.write_text(f"{world.hosts['web1'].address} {world.hosts['web2'].host_key_public}\n")
    code, results = fresh.push("--accept-new-host-keys", *fresh.hosts_args("web1"))
    assert (code, results["web1"]["error"]["code"]) == (1, "PUSH-HOST-KEY-MISMATCH")
    assert known.read_text() == f"{world.hosts['web1'].address} {world.hosts['web2'].host_key_public}\n"


def test_a_push_killed_while_installing_converges_on_the_next(world: World) -> None:
    argv = [sys.executable, "-m", "server", "push", "--data", str(world.data), "--server", world.address]
    argv += ["--key", str(world.lab.key), "--accept-new-host-keys", *world.hosts_args("web4")]
    proc = subprocess.Popen(world.lab.in_hub(argv), stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends at the latest when the push does
            if "installing and registering" in line:
                break
        else:
            raise AssertionError("the push ended before it installed")
    finally:
        proc.kill()  # SIGKILL, by PID (`ip netns exec` execs the push)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL

    def pushed_again() -> dict[str, Any] | None:
        _, results = world.push(*world.hosts_args("web4"))
        busy = results["web4"]["state"] == "failed" and "INSTALL-BUSY" in results["web4"]["error"]["message"]
        return None if busy else results["web4"]  # the killed push's install may still hold the lock

    result = wait_for("a push that is not turned away by the killed one's install", pushed_again, timeout=120)
    assert result["state"] == "succeeded", result
    assert daemon_active(world, "web4")
    web4 = [m for m in world.machines() if m["hostname"] == "web4"]
    assert [m["host_id"] for m in web4] == [result["host_id"]]  # registered once, whichever push did it


def test_push_through_a_balancer_to_two_instances_on_postgresql(world: World, dist: Path, tmp_path: Path) -> None:
    """docs/deployment.md's layout in the lab's hub: PostgreSQL, two `serve` instances sharing one data directory, a
    TCP round-robin balancer in front (TLS passed through). A push names the balancer as the server: the host's
    bootstrap enrols, reports its job and heartbeats through it; with one instance killed (-9) it goes on."""
    lab = world.lab
    cluster = new_cluster(listen=lab.hub_address, netns=lab.hub)  # reachable from the hub, where the servers run
    procs: list[subprocess.Popen[str]] = []
    try:
        data = tmp_path / "data"

        def in_hub(*argv: str) -> subprocess.CompletedProcess[str]:
            r = subprocess.run(
                lab.in_hub([sys.executable, "-m", "server", *argv, "--data", str(data)]),
                capture_output=True,
                text=True,
                cwd=REPO,
                timeout=300,
                check=False,
            )
            assert r.returncode == 0, r.stderr
            return r

        in_hub("init", "--name", lab.hub_address, "--database", cluster.new_database())
        for bundle in dist.glob("*_DEBIAN12-64_*.tar.gz"):
            in_hub("repo", "add", str(bundle))
        instances = []
        for _ in range(2):
            proc, address, _ = start_local_server(
                data, "--heartbeat-interval", "2", host=lab.hub_address, wrap=lab.in_hub([])
            )
            procs.append(proc)
            instances.append(address)
        proxy = subprocess.Popen(
            lab.in_hub([sys.executable, "-m", "tests.integration.tcpproxy", f"{lab.hub_address}:0", *instances]),
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proxy)
        line = proxy.stdout.readline() if proxy.stdout else ""
        balancer = f"{lab.hub_address}:{line.strip().rsplit(':', 1)[1]}"
        fleet = World(lab, data, procs[0], balancer, world.hosts)

        code, results = fleet.push("--accept-new-host-keys", *fleet.hosts_args("lb1"))
        assert code == 0, results
        assert results["lb1"]["state"] in ("succeeded", "succeeded with warnings"), results
        host_id = results["lb1"]["host_id"]
        jobs = json.loads(in_hub("jobs", "--json").stdout)
        assert [(j["kind"], j["host_id"]) for j in jobs if j["job_id"] == results["lb1"]["job_id"]] == [
            ("push", host_id)
        ]

        def last_seen() -> float:
            rows = json.loads(in_hub("machines", "--json").stdout)
            return max((r["last_seen"] or 0.0 for r in rows if r["host_id"] == host_id), default=0.0)

        wait_for("the pushed host's heartbeats through the balancer", last_seen, timeout=60)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=10)
        killed = time.time()
        wait_for("heartbeats through the surviving instance", lambda: last_seen() > killed + 2, timeout=60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        cluster.remove()
