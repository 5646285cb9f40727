"""Self-update with real frozen bundles of several versions, built by packaging/build (the version is set at build
time; the broken ones come from a test-only entry point, tests/integration/broken_agent.py), served by a real
server, on sandbox machines whose daemons run (tests/integration/fleet.py): waves, automatic rollback of broken
versions and the halt that follows, kill -9 at each step of an upgrade, the server down during a health window,
the bootstrapper's part at boot, and a SysV machine (a chroot driven by its init script). The systemd machine is
in test_template_boot.py.

No false rollbacks: a good version is kept through a clock step (a preloaded shim: the machine's wall clock only), a
stalled process server (SIGSTOP) and a repository that answers 503 to the first tries; a crash-looping version
whose watcher is killed in its health window is still rolled back, with its own words in the job; a failed move
under a pin is pinned back; a version that cannot read the machine's state is refused before anything switches."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.host.paths import Paths
from agent.update.watcher import SERVER_BACK, SERVER_GONE
from scripts.polling import wait_for
from tests import faults
from tests.conftest import REPO, require_root
from tests.integration.fleet import Cgroup, Lab, Machine, bundle_of, repacked, stepped_clock, unpack_bundle
from tests.integration.serverproc import debian_root, server_cli, start_server

pytestmark = pytest.mark.integration

# Short intervals, through the product's own settings (mobility.conf) and the server's --heartbeat-interval.
CONF = {"health_seconds": 1, "update_window_seconds": 20, "update_settle_seconds": 3}
TERMINAL = ("committed", "rolled-back", "failed")


@pytest.fixture
def lab(tmp_path: Path, releases: dict[str, Path]) -> Iterator[Lab]:
    lab = Lab(tmp_path, releases, CONF)
    try:
        yield lab
    finally:
        lab.close()


def on(m: Machine, version: str) -> bool:
    """The machine runs ``version``, and its last upgrade (if any) ended and was reported."""
    record = m.record()
    return m.running() == version and (not record or (record["phase"] in TERMINAL and record["reported"]))


def until_state(lab: Lab, state: str, timeout: float = 120) -> dict[str, Any]:
    return dict(wait_for(f"the rollout {state}", lambda: (r := lab.rollout())["state"] == state and r, timeout))


def test_a_fleet_upgrades_in_waves_and_broken_versions_roll_back_in_the_first_wave(lab: Lab) -> None:
    machines = lab.add(3)
    for m in machines:
        m.start()
    wait_for("3 daemons heartbeating", lambda: all(m.status().get("heartbeats_sent", 0) >= 2 for m in machines), 60)

    # 0.1.0 -> 0.1.1, one machine per wave.
    lab.publish("0.1.1")
    started = lab.cli("update", "--to", "0.1.1", "--all", "--wave", "1")
    assert (started["waves"], started["current_wave"]) == (3, 1)
    assert [m["state"] for m in started["machines"]] == ["offered", "waiting", "waiting"]
    rollout = until_state(lab, "completed")
    members = sorted(rollout["machines"], key=lambda m: m["wave"])
    assert [(m["state"], m["agent_version"], m["job_state"]) for m in members] == [
        ("succeeded", "0.1.1", "succeeded")
    ] * 3
    jobs = lab.jobs()
    for before, after in itertools.pairwise(members):
        # A wave is offered only once the one before it ended its jobs (and showed the new version).
        assert jobs[after["job_id"]]["created_at"] >= jobs[before["job_id"]]["updated_at"]
    for m in machines:
        assert on(m, "0.1.1") and m.current() == "0.1.1"
        assert m.versions() == {"0.1.0", "0.1.1"}  # the running version and the way back, nothing more
        assert not (m.root / "var/lib/mobility/upgrade.from").exists()
    by_host = {m.host_id(): m for m in machines}
    first = by_host[members[0]["host_id"]]

    # A version that crashes at start, then one that reports CRITICAL: each is rolled back on the first wave's
    # machine, the rollout halts, and the later waves are never offered.
    for version, error in (("0.1.2", "UPDATE-CRASHED"), ("0.1.3", "UPDATE-CRITICAL")):
        lab.publish(version)
        t0 = time.monotonic()
        lab.cli("update", "--to", version, "--all", "--wave", "1", "--max-failures", "1")
        rollout = until_state(lab, "halted", timeout=90)
        took = time.monotonic() - t0
        failed, *rest = sorted(rollout["machines"], key=lambda m: m["wave"])
        assert failed["host_id"] == first.host_id()  # the same order of waves
        assert (failed["state"], failed["error_id"]) == ("failed", error), failed
        assert error in rollout["reason"] and first.host_id() in rollout["reason"]
        assert [m["state"] for m in rest] == ["waiting", "waiting"]
        wait_for(f"{first.name} back on 0.1.1", lambda: on(first, "0.1.1"), 30)
        assert first.current() == "0.1.1" and version not in first.versions()
        assert first.record()["outcome"]["error_id"] == error
        for m in (x for x in machines if x is not first):
            assert on(m, "0.1.1") and version not in m.versions()
            assert m.state("target.json")["version"] == "0.1.1"  # never told the new version
        server_view = {x["host_id"]: x for x in lab.server.machines()}
        assert server_view[first.host_id()]["pinned"] == "0.1.1"  # until an operator acts
        assert f"rolling back {version}: {error}" in first.log()
        print(f"{version} ({error}): halted {took:.1f} s after the rollout started")
        # The operator looks, then lets the machine follow rollouts again.
        lab.cli("unpin", first.host_id())


def test_kill_9_at_each_step_of_an_upgrade_converges(lab: Lab, tmp_path: Path) -> None:
    """Each machine's first upgrade watcher is killed at one step (the fault plan, inherited by the watchers its
    daemon starts, fires once per machine); one machine loses power at the switch. Every one of them ends on the
    new version, its job succeeded, and nothing is left half done."""
    steps = ["fetching", "downloaded", "switching", "linked", "restarting", "watching", "reporting"]
    machines = lab.add(len(steps) + 1)
    plans: dict[str, Path] = {}
    for m, step in zip(machines, [*steps, "linked"], strict=True):
        once = tmp_path / f"once-{m.name}"
        once.mkdir()
        plans[m.name] = once
        # The daemon from this checkout, so that the watchers it starts are this checkout's Python too (the fault
        # injector runs in a Python the suite starts; the frozen programs have none). The new version is frozen.
        m.env = faults.environment(kill_at={"update.step": {"step": step}}, once=str(once))
        m.start([sys.executable, "-m", "agent"])
    power_cut = machines[-1]
    wait_for("the daemons heartbeating", lambda: all(m.status().get("heartbeats_sent", 0) >= 1 for m in machines), 60)
    lab.publish("0.1.1")
    lab.cli("update", "--to", "0.1.1", "--all", "--wave", "100%", "--max-failures", str(len(machines)))

    wait_for("the watcher of the last machine killed", (plans[power_cut.name] / "killed-update.step").exists, 60)
    power_cut.power_cut()
    assert power_cut.current() == "0.1.1" and power_cut.record()["phase"] == "switching"
    power_cut.start()  # the boot: the launcher `current` names, the new version

    def converged() -> bool:
        return all(on(m, "0.1.1") and m.record().get("phase") == "committed" for m in machines)

    try:
        wait_for("every machine on 0.1.1", converged, 150, every=1.0)
    finally:
        for m in machines:
            print(m.name, m.record().get("phase"), m.running(), m.current(), (m.record().get("outcome") or {}))
    for m in machines:
        assert (plans[m.name] / "killed-update.step").exists(), f"{m.name}: its fault never fired"
        assert m.current() == "0.1.1" and m.versions() == {"0.1.0", "0.1.1"}
        assert not (m.root / "var/lib/mobility/upgrade.from").exists()
        assert m.record()["resumes"] >= 1, m.name  # a second watcher took the upgrade over
        assert not list((m.root / "usr/local/mobility/versions").glob(".*partial"))
    rollout = until_state(lab, "completed", timeout=30)
    assert {m["job_state"] for m in rollout["machines"]} == {"succeeded"}


def test_the_server_down_during_the_health_window_causes_no_rollback(tmp_path: Path, releases: dict[str, Path]) -> None:
    lab = Lab(tmp_path, releases, {**CONF, "update_window_seconds": 8})  # a short window: three pass while it is down
    try:
        (m,) = lab.add(1)
        m.start()
        wait_for("heartbeats", lambda: m.status().get("heartbeats_sent", 0) >= 2, 60)
        lab.publish("0.1.1")
        port = lab.server.port
        lab.cli("update", "--to", "0.1.1", "--all")
        # The bundle is in place and the switch is next: the server goes down before the new version's first
        # heartbeat, and stays down for three health windows.
        wait_for(
            "the switch",
            lambda: m.record().get("phase") in ("switching", "restarting", "watching"),
            60,
            every=0.02,
            most=0.02,
        )
        lab.server.stop(signal.SIGKILL)
        down_at = time.time()
        # The watcher's probe finds the server gone (it logs it), then three health windows pass: watching all along.
        wait_for("the watcher to find the server gone", lambda: SERVER_GONE in m.log(), 30)
        gone = time.monotonic()
        while time.monotonic() - gone < 3 * 8:
            assert m.record()["phase"] == "watching", m.record()
            time.sleep(0.5)
        assert m.current() == "0.1.1" and m.running() == "0.1.1"
        assert "rolling back" not in m.log()
        lab.server = start_server(lab.server.data, heartbeat_interval=1.0, port=port)
        wait_for("the upgrade kept", lambda: on(m, "0.1.1") and m.record()["phase"] == "committed", 60)
        assert "rolling back" not in m.log() and SERVER_BACK in m.log()
        job = lab.jobs()[m.record()["job_id"]]
        assert job["state"] == "succeeded" and job["updated_at"] > down_at + 25
        until_state(lab, "completed", timeout=30)
    finally:
        lab.close()


def test_at_boot_the_bootstrapper_places_the_target_version_and_the_watcher_switches(lab: Lab) -> None:
    """The daemon had learnt its target (0.1.1, under the server's job) but the machine went down before it
    upgraded. At boot the bootstrapper, which sees target.json without the network, fetches 0.1.1 through TUF and
    places it beside 0.1.0 (under --root it starts nothing); the daemon that starts then hands the switch to the
    watcher, through the same health gate."""
    (m,) = lab.add(1)
    lab.publish("0.1.1")
    (pinned,) = lab.cli("pin", m.host_id(), "--to", "0.1.1", "--reason", "canary")
    job_id = next(j for j in lab.server.jobs() if j["kind"] == "upgrade")["job_id"]
    target = {"version": "0.1.1", "job_id": job_id, "pinned": True, "received": time.time()}
    (m.root / "var/lib/mobility/target.json").write_text(json.dumps(target))
    env = {**os.environ, "MOBILITY_BOOTSTRAP_CACHE": str(lab.tmp / "bootstrap-cache")}
    boot = [str(lab.releases["0.1.0"] / "mobility-bootstrap"), "--root", str(m.root), "--json"]
    r = subprocess.run(boot, capture_output=True, text=True, timeout=180, check=False, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "upgrading", r.stdout
    assert m.versions() == {"0.1.0", "0.1.1"} and m.current() == "0.1.0"
    assert m.record()["phase"] == "switching"
    m.start()
    wait_for("the upgrade kept", lambda: on(m, "0.1.1") and m.record()["phase"] == "committed", 90)
    assert lab.jobs()[job_id]["state"] == "succeeded"
    r = subprocess.run(boot, capture_output=True, text=True, timeout=60, check=False, env=env)
    assert json.loads(r.stdout)["state"] == "current", r.stdout  # the next boot has nothing to do
    assert pinned["pinned"] == "0.1.1"


# A SysV machine: a chroot of a real Debian userland with Ubuntu 14.04's release files (a SysV tag), the agent driven
# by its init script inside the chroot.


@contextlib.contextmanager
def sysv_machine(tmp_path: Path, base: Path) -> Iterator[Path]:
    root = tmp_path / "sysv"
    subprocess.run(["cp", "-a", str(base), str(root)], check=True)
    ubuntu = REPO / "tests/resources/distros/ubuntu14/etc"
    for name in ("os-release", "lsb-release", "debian_version"):
        target = root / "etc" / name
        if target.is_symlink() or target.exists():
            target.unlink()
        shutil.copy2(ubuntu / name, target)
    (root / "usr/lib/os-release").unlink(missing_ok=True)
    (root / "proc").mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root / "proc")], check=False)


def in_chroot(cgroup: Cgroup, root: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chroot", str(root), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        preexec_fn=cgroup.enter,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )


def test_a_sysv_machine_upgrades_and_rolls_back_through_its_init_script(
    tmp_path: Path, releases: dict[str, Path]
) -> None:
    require_root()
    lab = Lab(tmp_path, releases, CONF)
    cgroup = Cgroup("sysv")
    try:
        lab.publish("0.1.0", "UBUNTU-14.04")
        with sysv_machine(tmp_path, debian_root("debian12-minbase")) as root:
            unpack_bundle(bundle_of(releases, "0.1.0", "UBUNTU-14.04"), root / "opt/bundle")
            etc = root / "etc/mobility"
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "mobility.conf").write_text(json.dumps(CONF))
            (etc / "passphrase").write_text(lab.server.passphrase() + "\n")
            (etc / "passphrase").chmod(0o600)
            # Installed and registered as an image builder would, from outside (under --root the init-system check
            # looks at what the root has installed; inside, PID 1 would be this host's); then run from inside.
            bundle = root / "opt/bundle"
            r = subprocess.run(
                [str(bundle / "install"), "-r", "MS", "-v", "VmWare", "-q", "--root", str(root)],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            assert (root / "etc/init.d/mobility").is_file() and (root / "etc/rc2.d/S90mobility").is_symlink()
            r = subprocess.run(
                [str(bundle / "configure"), "-i", lab.server.address, "-P", str(etc / "passphrase"),
                 "--cs-fingerprint", lab.server.fingerprint, "--root", str(root)],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            assert in_chroot(cgroup, root, "/etc/init.d/mobility", "start").returncode == 0
            m = Machine("sysv", root, cgroup)

            def runs(version: str) -> Callable[[], bool]:
                return lambda: m.running() == version

            wait_for("the daemon", lambda: m.status().get("heartbeats_sent", 0) >= 2, 60)
            for version, expected, ends in (("0.1.1", "0.1.1", "completed"), ("0.1.2", "0.1.1", "halted")):
                lab.publish(version, "UBUNTU-14.04")
                lab.cli("update", "--to", version, "--all")
                until_state(lab, ends)
                wait_for(f"{expected} running", runs(expected), 30)
                assert m.current() == expected
                pid = int(Paths(root).resolve("/var/run/mobility.pid").read_text())  # /var/run -> /run in the root
                assert pid in cgroup.pids()  # the init script's own PID file names the daemon that runs
            assert m.record()["outcome"]["error_id"] == "UPDATE-CRASHED"
            assert "restarted the daemon into 0.1.2 (sysv)" in m.log()
            assert in_chroot(cgroup, root, "/etc/init.d/mobility", "stop").returncode == 0
    finally:
        cgroup.kill()
        lab.close()


def test_a_full_disk_before_the_switch_leaves_the_running_version_and_no_partial_copy(lab: Lab, tmp_path: Path) -> None:
    """The install directory on a filesystem with room for one version only: the new version cannot be placed, the
    job ends failed (with the system's reason), the running version was never touched, and nothing half-copied
    stays to take the space."""
    (m,) = lab.add(1)
    install_dir = m.install_dir
    saved = tmp_path / "saved-install"
    shutil.copytree(install_dir, saved, symlinks=True)
    used = sum(p.stat().st_size for p in saved.rglob("*") if p.is_file() and not p.is_symlink())
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={used + (8 << 20)}", "tmpfs", str(install_dir)], check=True)
    try:
        subprocess.run(["cp", "-a", f"{saved}/.", str(install_dir)], check=True)
        m.start()
        wait_for("heartbeats", lambda: m.status().get("heartbeats_sent", 0) >= 2, 60)
        lab.publish("0.1.1")
        lab.cli("update", "--to", "0.1.1", "--all")
        rollout = until_state(lab, "halted", timeout=90)
        (member,) = rollout["machines"]
        assert member["error_id"] == "IO-FAILED", member
        assert "No space left on device" in lab.jobs()[member["job_id"]]["detail"]
        assert m.record()["phase"] == "failed" and m.current() == "0.1.0"
        assert m.versions() == {"0.1.0"}  # no partial copy of 0.1.1 left behind
        assert m.running() == "0.1.0" and m.status()["pid"] == m.daemon.pid  # never restarted  # type: ignore[union-attr]
        assert not (m.root / "var/lib/mobility/upgrade.from").exists()
    finally:
        m.stop()
        subprocess.run(["umount", str(install_dir)], check=False)


# No false rollbacks: the environment is not the agent ---------------------------------------------------------------


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def switching(m: Machine, to: str) -> bool:
    """The machine's upgrade to ``to`` is past its baseline: switching, restarting or watching."""
    record = m.record()
    return record.get("to_version") == to and record.get("phase") in ("switching", "restarting", "watching")


def test_a_clock_step_in_the_health_window_rolls_nothing_back(tmp_path: Path, releases: dict[str, Path]) -> None:
    """The machine's clock steps five minutes ahead right after the switch (an NTP correction, a resumed VM):
    HLT-CLOCK-SKEW fails in the new version's reports, which is the environment's, and the upgrade is kept. The
    gate's durations do not jump with the clock either. Then NTP steps the clock back, and the wave verifies."""
    lab = Lab(tmp_path, releases, {**CONF, "update_window_seconds": 30, "update_settle_seconds": 10})
    try:
        (m,) = lab.add(1)
        clock = tmp_path / "clock"
        m.env = stepped_clock(clock)
        m.start()
        wait_for("heartbeats", lambda: m.status().get("heartbeats_sent", 0) >= 2, 60)
        lab.publish("0.1.1")
        lab.cli("update", "--to", "0.1.1", "--all")
        wait_for("the switch", lambda: switching(m, "0.1.1"), 60, every=0.02, most=0.02)
        clock.write_text("300\n")
        wait_for(
            "0.1.1 reporting the clock five minutes off",
            lambda: m.running() == "0.1.1" and m.health_of("HLT-CLOCK-SKEW") == "FAIL",
            60,
        )
        wait_for("the end of the upgrade", lambda: m.record().get("phase") in TERMINAL, 90)
        assert m.record()["phase"] == "committed", m.record()
        assert "rolling back" not in m.log() and m.running() == "0.1.1"
        clock.write_text("0\n")  # NTP steps it back: the machine is no longer critical, the wave verifies
        rollout = until_state(lab, "completed", timeout=90)
        assert [x["job_state"] for x in rollout["machines"]] == ["succeeded"]
    finally:
        lab.close()


def test_a_stalled_process_server_in_the_health_window_rolls_nothing_back(
    tmp_path: Path, releases: dict[str, Path]
) -> None:
    """A protected disk in CONTINUOUS under 0.1.0; the process server stalls (SIGSTOP, the API still answers) as
    0.1.1 takes over, for longer than the health window: 0.1.1's disk is STALLED, HLT-REPLICATION fails, and nothing
    is rolled back. Once the process server goes on, 0.1.1's disk is back in CONTINUOUS and the upgrade is kept."""
    lab = Lab(tmp_path, releases, CONF, process_apart=True)
    assert lab.process is not None
    try:
        (m,) = lab.add(1)
        lab.protect(m)
        m.start()
        wait_for(
            "the disk in CONTINUOUS under 0.1.0",
            lambda: [d.get("state") for d in m.state("replication/status.json").get("disks", [])] == ["CONTINUOUS"],
            120,
        )
        lab.publish("0.1.1")
        lab.cli("update", "--to", "0.1.1", "--all")
        wait_for("the switch", lambda: switching(m, "0.1.1"), 60, every=0.02, most=0.02)
        lab.process.proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(
                "0.1.1 reporting its disk stalled",  # 30 s without progress (agent/replication/sync.py)
                lambda: m.running() == "0.1.1" and m.health_of("HLT-REPLICATION") == "FAIL",
                120,
            )
            stalled = time.monotonic()
            while time.monotonic() - stalled < CONF["update_window_seconds"] + 10:  # failing for a whole window
                assert m.record()["phase"] == "watching", m.record()
                assert m.health_of("HLT-REPLICATION") == "FAIL"
                time.sleep(1)
        finally:
            lab.process.proc.send_signal(signal.SIGCONT)
        wait_for("the end of the upgrade", lambda: m.record().get("phase") in TERMINAL, 150)
        assert m.record()["phase"] == "committed", m.record()
        assert "rolling back" not in m.log() and m.running() == "0.1.1"
        assert m.state("replication/status.json")["disks"][0]["state"] == "CONTINUOUS"
        until_state(lab, "completed", timeout=60)
    finally:
        lab.close()


def test_a_repository_that_refuses_the_first_tries_postpones_and_rolls_nothing_back(
    tmp_path: Path, releases: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The repository answers 503 to the first six downloads: each watcher is postponed (TUF-FETCH-FAILED) and the
    daemon starts another later; the seventh gets the bundle, switches, and the new version is watched and kept.
    The takeovers of a download are not interruptions of a health gate (six of those would roll it back)."""
    refuse = tmp_path / "refuse"
    refuse.mkdir()
    monkeypatch.setenv(faults.PLAN, json.dumps({"refuse": {"repo.serve": str(refuse)}}))  # the server's, below
    lab = Lab(tmp_path, releases, CONF)
    try:
        (m,) = lab.add(1)
        m.start()
        wait_for("heartbeats", lambda: m.status().get("heartbeats_sent", 0) >= 2, 60)
        (refuse / "refuse").write_text("6")
        lab.publish("0.1.1")
        lab.cli("update", "--to", "0.1.1", "--all")
        wait_for("six refusals", lambda: (refuse / "refuse").read_text() == "0", 150, every=1.0)
        wait_for("the upgrade kept", lambda: on(m, "0.1.1") and m.record()["phase"] == "committed", 90)
        record = m.record()
        assert record["resumes"] >= 6 and record["interrupted"] == 0, record
        assert m.log().count("postponed: TUF-FETCH-FAILED") >= 6
        assert "rolling back" not in m.log()
        until_state(lab, "completed", timeout=60)
    finally:
        lab.close()


def test_a_crash_looping_version_whose_watcher_is_killed_is_rolled_back_with_its_own_words(lab: Lab) -> None:
    """0.1.2 crashes at start, before any heartbeat: nothing of it will ever start a watcher. Its watcher is
    killed (kill -9) in the health window, where no init system restarts it: the watcher's keeper starts it
    again, the gate goes on, 0.1.2 is rolled back, and the job says what 0.1.2 printed as it crashed."""
    (m,) = lab.add(1)
    m.start()
    wait_for("heartbeats", lambda: m.status().get("heartbeats_sent", 0) >= 2, 60)
    lab.publish("0.1.2")
    lab.cli("update", "--to", "0.1.2", "--all")
    wait_for("the health window", lambda: m.record().get("phase") == "watching", 60, every=0.02, most=0.02)
    found = m.watchers()  # the watcher, and its keeper: a fork of it (the same command line), its child
    (watcher,) = [pid for pid in found if parent_of(pid) not in found]
    os.kill(watcher, signal.SIGKILL)
    rollout = until_state(lab, "halted", timeout=120)
    (member,) = rollout["machines"]
    assert member["error_id"] == "UPDATE-CRASHED", member
    wait_for("0.1.0 back", lambda: on(m, "0.1.0"), 60)
    assert m.record()["interrupted"] >= 1
    detail = lab.jobs()[member["job_id"]]["detail"]
    assert "a deliberately broken test build crashes at start" in detail, detail
    assert "daemon.out" in detail


# Moves the operator asked for, and the way back ----------------------------------------------------------------


def test_a_failed_pin_is_pinned_back_and_a_version_that_cannot_read_the_state_is_refused(
    lab: Lab, tmp_path: Path
) -> None:
    """`pin --to 0.1.2` (a canary that crashes) is rolled back, and the server pins the machine to the version it
    runs, not the failed one. Then the machine runs a 0.1.1 that declares agent state format 2: a rollout back to
    0.1.0 is refused without --allow-downgrade, and with it (or with `pin --to 0.1.0`) the machine refuses 0.1.0,
    which reads format 1 only, before anything is removed or switched, and is pinned to 0.1.1."""
    (m,) = lab.add(1)
    m.start()
    wait_for("heartbeats", lambda: m.status().get("heartbeats_sent", 0) >= 2, 60)
    host = m.host_id()

    def machine() -> dict[str, Any]:
        return next(x for x in lab.server.machines() if x["host_id"] == host)

    lab.publish("0.1.2")
    lab.cli("pin", host, "--to", "0.1.2", "--reason", "canary")
    wait_for("the canary rolled back", lambda: on(m, "0.1.0") and m.record().get("phase") == "rolled-back", 90)
    wait_for("pinned back", lambda: machine()["pinned"] == "0.1.0", 30)
    assert "UPDATE-CRASHED" in str(machine()["pin_reason"]) and "0.1.2" in str(machine()["pin_reason"])
    assert machine()["target_version"] == "0.1.0"
    lab.cli("unpin", host)

    lab.publish_file(repacked(bundle_of(lab.releases, "0.1.1"), tmp_path / "format2", state_format=2))
    lab.cli("update", "--to", "0.1.1", "--all")
    until_state(lab, "completed", timeout=90)
    assert m.current() == "0.1.1" and m.versions() == {"0.1.0", "0.1.1"}

    r = server_cli(lab.server.data, "update", "--to", "0.1.0", "--all")
    assert r.returncode == 2 and r.stderr.startswith("error ROLLOUT-DOWNGRADE:"), r.stderr
    assert host in r.stderr and "--allow-downgrade" in r.stderr
    lab.cli("update", "--to", "0.1.0", "--all", "--allow-downgrade")
    rollout = until_state(lab, "halted", timeout=90)
    (member,) = rollout["machines"]
    assert member["error_id"] == "UPDATE-STATE-FORMAT", member
    assert "format 1" in lab.jobs()[member["job_id"]]["detail"]
    assert m.record()["phase"] == "failed" and m.current() == "0.1.1" and m.running() == "0.1.1"
    assert m.versions() == {"0.1.0", "0.1.1"}  # nothing removed, nothing placed
    assert machine()["pinned"] == "0.1.1"
    lab.cli("unpin", host)

    lab.cli("pin", host, "--to", "0.1.0")  # the explicit way back: refused by the machine all the same
    wait_for("the pin refused", lambda: m.record().get("phase") == "failed" and m.record()["to_version"] == "0.1.0"
             and m.record()["job_id"] != member["job_id"], 90)  # fmt: skip
    wait_for("pinned back", lambda: machine()["pinned"] == "0.1.1", 30)
    assert "UPDATE-STATE-FORMAT" in str(machine()["pin_reason"])
    assert m.current() == "0.1.1" and m.running() == "0.1.1"
