"""The real test: a Debian template with the bootstrapper baked in, booted with systemd-nspawn against a real
configuration server on loopback. The container shares the host's network namespace, so 127.0.0.1 is the server.

Debian 12 (bookworm) and Debian 11 (bullseye, glibc 2.31: older than the build host's 2.36 that the frozen programs
carry). A probe in front of systemctl records what the agent's child processes see: the host's own environment and
the host's own libc, never the frozen programs' loader variables or C library."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.host.libc import find_libc, glibc_version_of
from agent.host.paths import Paths
from scripts.testlab import in_cgroups, make_cgroups, remove_cgroup, sshd_base_root
from tests import faults
from tests.conftest import REPO, require_root
from tests.integration.fleet import bundle_of, clock_shim
from tests.integration.serverproc import ServerProcess, secret_file, server_cli, start_server
from tests.integration.serverproc import wait_for as poll

pytestmark = pytest.mark.integration


def wait_for(what: str, condition: Callable[[], Any], timeout: float = 120.0) -> Any:
    """A booting container is slow: minutes, not seconds."""
    return poll(what, condition, timeout, every=0.5)


SUITES = {"bookworm": "DEBIAN12", "bullseye": "DEBIAN11"}
PROBE_DIR = "/var/lib/mobility-test-probe"
# Stands in front of the real systemctl (/usr/local/sbin comes first in systemd's PATH): records the environment the
# agent gave it and the libraries this (host) shell loaded, then runs the real systemctl.
PROBE = f"""#!/bin/sh
{{ env; echo "--- maps"; cat /proc/$$/maps; }} > {PROBE_DIR}/systemctl.$$ 2>&1
exec /bin/systemctl "$@"
"""
OUR_VARIABLES = ("LD_LIBRARY_PATH", "LD_LIBRARY_PATH_ORIG", "LD_PRELOAD", "_PYI_")


@pytest.fixture(scope="session")
def systemd_root() -> Path:
    """A minimal Debian 12 with systemd as init (the SSH lab's base: one debootstrap for both)."""
    require_root()
    return sshd_base_root()


def systemd_roots(suite: str) -> Path:
    require_root()
    return sshd_base_root(suite)


def bake(base: Path, where: Path, dist: Path, server: ServerProcess, machine_id: str) -> Path:
    """A template: the bootstrapper, bootstrap.conf, the passphrase file and the enabled unit, baked in."""
    subprocess.run(["cp", "-a", str(base), str(where)], check=True)
    (where / PROBE_DIR.lstrip("/")).mkdir(parents=True, exist_ok=True)
    (where / "usr/local/sbin/systemctl").write_text(PROBE)
    (where / "usr/local/sbin/systemctl").chmod(0o755)
    (where / "etc/machine-id").write_text(machine_id + "\n")
    (where / "etc/hostname").write_text(f"tmpl-{machine_id[:6]}\n")
    shutil.copy2(dist / "mobility-bootstrap", where / "usr/local/sbin/mobility-bootstrap")
    conf = where / "etc/mobility"
    conf.mkdir(parents=True, exist_ok=True)
    secret_file(conf / "passphrase", server.passphrase())
    (conf / "bootstrap.conf").write_text(
        f"server = {server.address}\nfingerprint = {server.fingerprint}\n"
        "passphrase_file = /etc/mobility/passphrase\nretry_for = 5\n"
    )
    units = where / "etc/systemd/system"
    # The container shares the host's network namespace: its sshd must not take the host's port 22.
    (units / "ssh.service").symlink_to("/dev/null")
    for unit in ("mobility-bootstrap.service", "mobility-bootstrap.timer"):
        shutil.copy2(REPO / "systemd" / unit, units / unit)
    (units / "multi-user.target.wants").mkdir(exist_ok=True)
    (units / "timers.target.wants").mkdir(exist_ok=True)
    (units / "multi-user.target.wants/mobility-bootstrap.service").symlink_to(
        "/etc/systemd/system/mobility-bootstrap.service"
    )
    (units / "timers.target.wants/mobility-bootstrap.timer").symlink_to("/etc/systemd/system/mobility-bootstrap.timer")
    # The test cannot wait the timer's 15 minutes: a drop-in retries after 5 s.
    dropin = units / "mobility-bootstrap.timer.d"
    dropin.mkdir(exist_ok=True)
    (dropin / "test.conf").write_text("[Timer]\nOnBootSec=5s\nOnUnitInactiveSec=5s\nRandomizedDelaySec=0\n")
    (where / "var/log/journal").mkdir(parents=True, exist_ok=True)  # a persistent journal the host can read
    return where


def _cgroup_of(pid: int) -> str:
    """The cgroup v2 path of ``pid`` (its ``0::`` line; empty when it has none)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:].rstrip("/")
    return ""


class Container:
    """A template booted with systemd-nspawn, in a cgroup of its own (scripts/testlab.make_cgroups)."""

    _instances = itertools.count()

    def __init__(self, root: Path) -> None:
        self.root = root
        name = f"mbt{os.getpid()}-{next(Container._instances)}"
        self.cgroups = make_cgroups(name)
        self.cgroup = f"{_cgroup_of(os.getpid())}/{name}"  # as /proc/PID/cgroup names it
        try:
            self.proc = subprocess.Popen(
                in_cgroups(
                    self.cgroups, "systemd-nspawn", "--boot", "--register=no", "--keep-unit", "--quiet", "-D", str(root)
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            self._remove_cgroups()
            raise

    def _remove_cgroups(self) -> None:
        for cgroup in self.cgroups:
            remove_cgroup(cgroup)

    def journal(self, *units: str) -> str:
        """The messages of ``units``, interleaved in the order they were logged."""
        journal = str(self.root / "var/log/journal")
        r = subprocess.run(
            ["journalctl", "-D", journal, *(f"-u{u}" for u in units), "--no-pager", "-o", "cat"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return r.stdout

    def unit_pids(self, unit: str) -> list[int]:
        """The processes in the cgroup of ``unit`` of this container's systemd (below the container's own cgroup:
        other containers, of other tests, have units of the same names)."""
        found = []
        for entry in Path("/proc").glob("[0-9]*/cgroup"):
            try:
                path = _cgroup_of(int(entry.parent.name))
            except (OSError, ValueError):
                continue
            if path.startswith(self.cgroup + "/") and f"/{unit}" in path:
                found.append(int(entry.parent.name))
        return found

    def daemon_pids(self) -> list[int]:
        """The daemon started by the container's systemd: the processes of its mobility.service."""
        return self.unit_pids("mobility.service")

    def daemon(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.root / "var/lib/mobility/daemon.json").read_text()))
        except (OSError, ValueError):
            return {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for cgroup in self.cgroups:  # whatever of the container outlived nspawn (a kill -9 of it)
            if (cgroup / "cgroup.kill").exists():
                (cgroup / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + 10
        while any((c / "cgroup.procs").read_text().strip() for c in self.cgroups) and time.monotonic() < deadline:
            time.sleep(0.1)
        self._remove_cgroups()
        self.cgroups = ()


def mapped_libcs(maps: str) -> set[str]:
    return {line.split()[-1] for line in maps.splitlines() if "/libc.so" in line or "/libc-2." in line}


def assert_children_saw_the_host(root: Path) -> None:
    """Every systemctl the agent ran got the environment the agent was started with and loaded the host's libc."""
    probes = sorted((root / PROBE_DIR.lstrip("/")).iterdir())
    assert len(probes) >= 2, probes  # daemon-reload and restart mobility.service
    for probe in probes:
        env, maps = probe.read_text().split("--- maps\n", 1)
        leaked = [line for line in env.splitlines() if line.startswith(OUR_VARIABLES)]
        assert leaked == [], (probe.name, leaked)
        libcs = mapped_libcs(maps)
        assert libcs and all(p.startswith(("/lib/", "/usr/lib/")) for p in libcs), (probe.name, libcs)


@pytest.fixture
def server(tmp_path: Path, dist: Path) -> Iterator[ServerProcess]:
    s = start_server(tmp_path / "data", heartbeat_interval=2.0)
    try:
        for tag in SUITES.values():
            (bundle,) = dist.glob(f"*_{tag}-64_*.tar.gz")
            server_cli(s.data, "repo", "add", str(bundle), check=True)
        yield s
    finally:
        s.stop()


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_template_boots_registers_and_runs_the_daemon(
    suite: str, dist: Path, server: ServerProcess, tmp_path: Path
) -> None:
    base = systemd_roots(suite)
    if suite == "bullseye":
        libc = find_libc(Paths(base))  # 2.31: older than the glibc the frozen programs were built with
        assert libc and glibc_version_of(Paths(base).resolve(libc).read_bytes()) == "2.31"
    root = bake(base, tmp_path / "vm1", dist, server, "e1" * 16)
    vm = Container(root)
    try:
        (job,) = wait_for("the install job", server.jobs, timeout=120)
        assert job["state"] == "succeeded", job
        (machine,) = wait_for(
            "the machine online", lambda: [m for m in server.machines() if m["state"] == "online"], timeout=120
        )
        assert (machine["hostname"], machine["os_tag"]) == ("tmpl-e1e1e1", SUITES[suite])
        wait_for("heartbeats from the daemon", lambda: vm.daemon().get("heartbeats_sent", 0) >= 2)
        (pid,) = vm.daemon_pids()
        # The daemon runs on the C library of its bundle, never the system's.
        libcs = mapped_libcs(Path(f"/proc/{pid}/maps").read_text())
        assert libcs and all("/usr/local/mobility/versions/0.1.0/mobility/_internal/" in p for p in libcs), libcs
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "mobility"
    finally:
        vm.stop()
    assert vm.proc.returncode == 0
    assert_children_saw_the_host(root)
    # Every unit, as installed in the booted root, passes systemd's own verification.
    units = [
        f"/etc/systemd/system/{u}"
        for u in ("mobility.service", "mobility-bootstrap.service", "mobility-bootstrap.timer")
    ] + ["mobility-upgrade@0.1.0.service"]  # the upgrade watcher's template, as the instance the agent starts
    r = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", *units], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, r.stderr

    # Boot again: nothing is reinstalled, nothing re-registered.
    log_before = (root / "var/log/mobility/install.log").read_text()
    vm = Container(root)
    try:
        wait_for("the daemon again", lambda: vm.daemon().get("heartbeats_sent", 0) >= 1 and vm.daemon_pids())
        wait_for("the bootstrap unit to finish", lambda: "current:" in vm.journal("mobility-bootstrap.service"))
    finally:
        vm.stop()
    assert (root / "var/log/mobility/install.log").read_text() == log_before
    assert len(server.jobs()) == 1 and len(server.machines()) == 1

    # A copy with a new machine-id: a second machine, marked as a clone.
    clone = tmp_path / "vm2"
    subprocess.run(["cp", "-a", str(root), str(clone)], check=True)
    (clone / "etc/machine-id").write_text("e2" * 16 + "\n")
    vm = Container(clone)
    try:
        machines = wait_for("the clone", lambda: [m for m in server.machines() if m["cloned_from"]])
        assert machines[0]["cloned_from"] == machine["host_id"]
    finally:
        vm.stop()


def test_boot_with_the_server_down_then_the_timer_converges(
    systemd_root: Path, dist: Path, server: ServerProcess, tmp_path: Path
) -> None:
    root = bake(systemd_root, tmp_path / "vm", dist, server, "e3" * 16)
    port = server.port
    server.stop()
    vm = Container(root)
    try:
        wait_for(
            "the bootstrap to give up with 75",
            lambda: "error SERVER-UNREACHABLE" in vm.journal("mobility-bootstrap.service"),
            timeout=90,
        )
        assert vm.proc.poll() is None  # boot completed and goes on
        # ... and never waited for the bootstrapper: multi-user.target was reached while it still tried the server.
        boot = vm.journal("multi-user.target", "mobility-bootstrap.service")
        assert boot.index("Reached target multi-user.target") < boot.index("error SERVER-UNREACHABLE"), boot
        up = start_server(server.data, heartbeat_interval=2.0, port=port)
        try:
            (job,) = wait_for("the timer's retry to succeed", up.jobs, timeout=120)
            assert job["state"] == "succeeded"
            wait_for("the daemon", lambda: vm.daemon().get("heartbeats_sent", 0) >= 1)
        finally:
            up.stop()
    finally:
        vm.stop()


# The machine's wall clock for the agent's units (mobility.service and its upgrade watcher), stepped by the test
# through a file (tests/integration/clockstep.c, copied into the template; the host's and the container's systemd
# keep their own).
CLOCK = "/var/lib/mobility-test-clock"
CLOCK_DROPIN = f"""[Service]
Environment=LD_PRELOAD=/usr/local/lib/mobility-test-clockstep.so MOBILITY_TEST_CLOCK={CLOCK}
"""
# While this file exists, `systemctl show` takes 40 s (a PID 1 too busy to answer): the watcher asks with 30 s.
SLOW_SHOW = "/var/lib/mobility-test-slow-show"
SLOW_PROBE = PROBE.replace(
    "exec /bin/systemctl",
    f'case "$1" in show) [ -e {SLOW_SHOW} ] && sleep 40;; esac\nexec /bin/systemctl',
)


def test_a_booted_template_upgrades_under_systemd_and_a_crashing_version_rolls_back(
    systemd_root: Path, releases: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real systemd: the daemon hands the upgrade to its own unit, mobility-upgrade@<version>.service, which
    restarts mobility.service into the new version and watches it.

    A good version is kept although the repository answers 503 to its first downloads (each watcher ends with
    75, which the unit does not restart: the daemon starts one again later) and the machine's clock steps five
    minutes ahead in its health window. A version that crashes at start is rolled back although systemd does not
    answer `systemctl show` for minutes and its watcher is killed (kill -9) in the health window: systemd starts the
    watcher again, which takes the upgrade over; while it runs, the watcher is wanted at boot; the job says what the
    crashing version printed (its journal). The next boot has nothing to do."""
    refuse = tmp_path / "refuse"
    refuse.mkdir()
    monkeypatch.setenv(faults.PLAN, json.dumps({"refuse": {"repo.serve": str(refuse)}}))  # the server's
    server = start_server(tmp_path / "data", heartbeat_interval=1.0)
    vm: Container | None = None
    try:

        def publish(version: str) -> None:
            server_cli(server.data, "repo", "add", str(bundle_of(releases, version)), check=True)

        def rollout(*args: str) -> dict[str, Any]:
            r = server_cli(server.data, *args, "--json")
            assert r.returncode == 0, r.stderr
            return dict(json.loads(r.stdout)[0] if args[0] == "updates" else json.loads(r.stdout))

        def daemon_runs(version: str) -> bool:
            pids = vm.unit_pids("mobility.service")
            if len(pids) != 1:
                return False
            maps = mapped_libcs(Path(f"/proc/{pids[0]}/maps").read_text())
            return bool(maps) and all(f"/usr/local/mobility/versions/{version}/" in p for p in maps)

        publish("0.1.0")
        root = bake(systemd_root, tmp_path / "vm", releases["0.1.0"], server, "e5" * 16)
        (root / "etc/mobility/mobility.conf").write_text(
            json.dumps({"health_seconds": 1, "update_window_seconds": 30, "update_settle_seconds": 10})
        )
        # The bootstrapper's timer at its product interval again (bake's drop-in retries every 5 s): here it would
        # start a dead watcher again within seconds, hiding whether the watcher's unit does.
        (root / "etc/systemd/system/mobility-bootstrap.timer.d/zz-product.conf").write_text(
            "[Timer]\nOnUnitInactiveSec=\nOnUnitInactiveSec=15min\n"
        )
        (root / "usr/local/sbin/systemctl").write_text(SLOW_PROBE)
        shutil.copy2(clock_shim(), root / "usr/local/lib/mobility-test-clockstep.so")
        clock = root / CLOCK.lstrip("/")
        clock.write_text("0\n")
        for unit in ("mobility.service", "mobility-upgrade@.service"):
            (root / f"etc/systemd/system/{unit}.d").mkdir(parents=True)
            (root / f"etc/systemd/system/{unit}.d/clock.conf").write_text(CLOCK_DROPIN)
        vm = Container(root)
        wait_for("the install", lambda: [j for j in server.jobs() if j["state"] == "succeeded"])
        wait_for("the daemon", lambda: vm is not None and vm.daemon().get("heartbeats_sent", 0) >= 2)

        def record() -> dict[str, Any]:
            try:
                return dict(json.loads((root / "var/lib/mobility/update.json").read_text()))
            except (OSError, ValueError):
                return {}

        (refuse / "refuse").write_text("3")
        publish("0.1.1")
        rollout("update", "--to", "0.1.1", "--all")
        wait_for("three refusals", lambda: (refuse / "refuse").read_text() == "0", timeout=120)
        wait_for(
            "the switch",
            lambda: (
                record().get("to_version") == "0.1.1" and record()["phase"] in ("switching", "restarting", "watching")
            ),
            timeout=120,
        )
        clock.write_text("300\n")  # five minutes ahead
        wait_for("the clock's step seen", lambda: (vm.daemon().get("skew_seconds") or 0) >= 300, timeout=60)
        wait_for(
            "the upgrade kept", lambda: record().get("phase") in ("committed", "rolled-back", "failed"), timeout=90
        )
        assert record()["phase"] == "committed" and record()["interrupted"] == 0, record()
        clock.write_text("0\n")  # NTP steps it back: the machine is no longer critical, the wave verifies
        wait_for("the rollout", lambda: rollout("updates")["state"] == "completed")
        wait_for("0.1.1 in mobility.service", lambda: daemon_runs("0.1.1"), timeout=30)
        log = (root / "var/log/mobility/install.log").read_text()
        assert "restarted the daemon into 0.1.1 (systemd)" in log and "rolling back" not in log
        assert log.count("postponed: TUF-FETCH-FAILED") == 3
        assert "Started" in vm.journal("mobility-upgrade@0.1.0.service")

        publish("0.1.2")
        rollout("update", "--to", "0.1.2", "--all")
        wants = root / "etc/systemd/system/multi-user.target.wants/mobility-upgrade@0.1.1.service"
        wait_for("the health window", lambda: record().get("to_version") == "0.1.2" and record()["phase"] == "watching")
        assert wants.is_symlink()  # a power cut now would start the watcher at boot
        slow = root / SLOW_SHOW.lstrip("/")
        slow.touch()  # systemd stops answering the watcher's looks
        # The watcher is the unit's process whose parent is not in the unit (a `systemctl show` it waits for is there
        # too, as its child).
        (watcher,) = wait_for("the watcher", lambda: unit_roots(vm.unit_pids("mobility-upgrade@0.1.1.service")))
        os.kill(watcher, signal.SIGKILL)
        wait_for("the watcher started again", lambda: set(vm.unit_pids("mobility-upgrade@0.1.1.service")) - {watcher})
        wait_for(
            "two looks of the new watcher timed out",
            lambda: (
                vm.journal("mobility-upgrade@0.1.1.service").count("systemd did not say how mobility.service is") >= 2
            ),
            timeout=150,
        )
        assert vm.unit_pids("mobility-upgrade@0.1.1.service") and record()["phase"] == "watching", record()
        slow.unlink()
        halted = wait_for("the rollback", lambda: (r := rollout("updates"))["state"] == "halted" and r, timeout=150)
        (member,) = halted["machines"]
        assert (member["state"], member["error_id"]) == ("failed", "UPDATE-CRASHED")
        assert record()["interrupted"] >= 1 and record()["outcome"]["error_id"] == "UPDATE-CRASHED"
        detail = next(j for j in server.jobs() if j["job_id"] == member["job_id"])["detail"]
        assert "the journal of mobility.service" in detail, detail
        assert "a deliberately broken test build crashes at start" in detail, detail
        wait_for("0.1.1 again in mobility.service", lambda: daemon_runs("0.1.1"), timeout=30)
        assert not wants.exists()
        assert (root / "usr/local/mobility/current").readlink() == Path("versions/0.1.1")
        vm.stop()
        vm = None

        # The next boot: the bootstrapper finds the version the server names (0.1.1, pinned after the rollback)
        # installed, and does nothing; the daemon runs 0.1.1.
        log_before = (root / "var/log/mobility/install.log").read_text()
        vm = Container(root)
        booted = vm
        wait_for("the bootstrap unit to finish", lambda: "current:" in booted.journal("mobility-bootstrap.service"))
        wait_for("0.1.1 after the boot", lambda: daemon_runs("0.1.1"), timeout=60)
        assert "bootstrap [" not in (root / "var/log/mobility/install.log").read_text()[len(log_before) :]
    finally:
        if vm is not None:
            vm.stop()
        server.stop()


def unit_roots(pids: list[int]) -> list[int]:
    """Of a unit's processes, those whose parent is not one of them (its main process; [] if any has gone)."""
    roots = []
    for pid in pids:
        try:
            ppid = psutil.Process(pid).ppid()
        except psutil.Error:
            return []
        if ppid not in pids:
            roots.append(pid)
    return roots
