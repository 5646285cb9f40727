"""The source machine's safety under replication, for real (loop-device disks, a real server, real `mobility run`
daemons, FIFREEZE): a daemon killed inside a point's freeze leaves no filesystem frozen once the unit has run its
ExecStopPost or started the daemon again; a clean stop during a point is quick and needs no resync; a replication
thread or the tracer that fails is shown and started again; a disk's stream is closed only by its own thread; a
machine whose protection ends shows no disk any more."""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.replication_lab import Disk, Lab, Machine, Server, sh, wait_for
from tests import faults
from tests.conftest import REPO, require_root
from tests.integration import records
from tests.integration.test_replication import (
    assert_identical_replica,
    database,
    failover_and_check,
    protect,
    start_writer,
)

pytestmark = pytest.mark.integration

MIB = 1 << 20
UNIT = REPO / "systemd" / "mobility.service"
MOBILITY = "/usr/local/mobility/current/mobility/mobility"  # where the unit runs the agent


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    require_root()
    with Lab(tmp_path / "lab") as lab:
        yield lab


def unit_setting(name: str) -> str:
    """A setting of systemd/mobility.service, as systemd reads it (the last assignment wins)."""
    found = [line.split("=", 1)[1] for line in UNIT.read_text().splitlines() if line.startswith(f"{name}=")]
    assert found, f"mobility.service has no {name}="
    return found[-1]


def unit_command(name: str, machine: Machine) -> list[str]:
    """The unit's ExecStopPost (or another Exec line) for a machine of the lab: the installed launcher is this
    checkout's agent, and the machine's root is given as --root."""
    argv = shlex.split(unit_setting(name))
    assert argv[0] == MOBILITY, argv
    return [sys.executable, "-m", "agent", *argv[1:], "--root", str(machine.root)]


class Probe:
    """A write and fsync on a filesystem in a process of its own: it blocks while the filesystem is frozen."""

    def __init__(self, where: Path) -> None:
        target = where / f"probe-{time.monotonic_ns()}"
        self.proc = subprocess.Popen(["sh", "-c", f"echo written > {target} && sync {target}"])

    def blocked(self, seconds: float = 0.5) -> bool:
        try:
            self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return True
        assert self.proc.returncode == 0
        return False

    def wait(self, timeout: float) -> None:
        assert self.proc.wait(timeout=timeout) == 0


def killed_inside_a_freeze(lab: Lab, machine: Machine, disk: Disk) -> tuple[float, Probe]:
    """Start the agent with the suite's kill inside the freeze, ask for a point, and wait for the kill: returns its
    time and a probe blocked by the frozen filesystem (proof that the kill left it frozen)."""
    agent = lab.start_agent(machine, env=faults.environment(kill={"replication.frozen": 1}))
    lab.wait_state(machine, disk, "CONTINUOUS")
    point = subprocess.Popen(
        [sys.executable, "-m", "agent", "point", "--timeout", "60", "--root", str(machine.root)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    lab.defer("point request", lambda: point.kill() if point.poll() is None else None)
    assert agent.wait(timeout=120) == -9, "the agent was not killed inside the freeze"
    killed = time.monotonic()
    point.kill()
    point.wait(timeout=10)
    from agent.host.paths import Paths
    from agent.replication.state import forget_request, pending_requests

    paths = Paths(machine.root.resolve())
    for request in pending_requests(paths):  # the killed `mobility point`'s, for the next daemon not to take up
        forget_request(paths, request)
    probe = Probe(disk.mounts[0])
    assert probe.blocked(), "the filesystem was not frozen when the agent was killed"
    return killed, probe


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_a_daemon_killed_inside_a_freeze_leaves_nothing_frozen(lab: Lab, fstype: str) -> None:
    """kill -9 inside a point's freeze: the filesystem stays frozen (FIFREEZE outlives its process). The unit's
    ExecStopPost (its command line from systemd/mobility.service) thaws it within seconds; without CAP_SYS_ADMIN the
    thaw fails with REPL-THAW-FAILED and the record stays; the next start of the daemon thaws it before anything
    else, and the machine goes on replicating with points."""
    server = lab.server(database=database())
    disk = lab.disk(fstype, (320 if fstype == "xfs" else 64) * MIB, (fstype,))
    where = disk.mounts[0]
    # Whatever happens below, the lab's filesystem is thawed before it is unmounted (a frozen one cannot be).
    lab.defer(f"thaw {where}", lambda: sh(["fsfreeze", "--unfreeze", str(where)], check=False))
    machine = lab.machine(server, "m1")
    lab.expose(machine, disk)
    protect(server, machine, disk)
    record = machine.root / "run/mobility/frozen.json"

    killed, probe = killed_inside_a_freeze(lab, machine, disk)
    assert [m["path"] for m in json.loads(record.read_text())["mounts"]] == [str(where)]
    r = subprocess.run(
        unit_command("ExecStopPost", machine), cwd=REPO, capture_output=True, text=True, timeout=30, check=False
    )
    probe.wait(timeout=10)
    by_stop_post = time.monotonic() - killed
    assert r.returncode == 0 and r.stdout.strip() == f"thawed {where}", (r.stdout, r.stderr)
    assert not record.exists()
    r = subprocess.run(
        unit_command("ExecStopPost", machine), cwd=REPO, capture_output=True, text=True, timeout=30, check=False
    )
    assert r.returncode == 0 and r.stdout.strip() == "nothing frozen by the agent", r.stdout

    killed, probe = killed_inside_a_freeze(lab, machine, disk)
    without_admin = subprocess.run(
        ["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin", *unit_command("ExecStopPost", machine)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert without_admin.returncode == 1 and "error REPL-THAW-FAILED:" in without_admin.stderr, without_admin
    assert probe.blocked() and record.exists()
    restarted = len(machine.log())
    started = time.monotonic()
    lab.start_agent(machine)
    probe.wait(timeout=30)
    by_start = time.monotonic() - started
    assert f"thawed {where}: an agent that ended inside a point's freeze left them frozen" in machine.log()[restarted:]
    lab.wait_state(machine, disk, "CONTINUOUS")
    assert machine.point()["consistency"] == "crash-consistent"
    print(
        f"{fstype}: kill -9 inside the freeze -> writable: {by_stop_post:.2f} s by ExecStopPost; "
        f"{by_start:.2f} s from the next start (load {os.getloadavg()[0]:.1f})"
    )


def test_a_clean_stop_during_a_point_on_a_busy_disk_is_quick_and_needs_no_resync(lab: Lab) -> None:
    """SIGTERM (what `systemctl stop` and `systemctl restart` send) while a point is being cut and a writer keeps the
    disk busy: the point is cancelled (its pre hook killed, the post hook run), the daemon exits 0 well within the
    unit's TimeoutStopSec and keeps the tracing; the next start goes on in CONTINUOUS without a resync, and a point
    then holds every record written before it, across the restart."""
    server = lab.server(database=database())
    disk = lab.disk("d", 64 * MIB, ("ext4",))
    machine = lab.machine(server, "m1")
    lab.expose(machine, disk)
    protect(server, machine, disk)
    from agent.host.paths import Paths

    hooks = Paths(machine.root.resolve()).freeze_dir
    hooks.mkdir(parents=True, exist_ok=True)
    started, posted = lab.workdir / "pre-started", lab.workdir / "post-ran"
    hook = hooks / "10-slow"
    hook.write_text(f'#!/bin/sh\n[ "$1" = post ] && {{ touch {posted}; exit 0; }}\ntouch {started}\nsleep 120\n')
    hook.chmod(0o755)
    agent = lab.start_agent(machine)
    lab.wait_state(machine, disk, "CONTINUOUS")
    writer, log = start_writer(lab, [disk.mounts[0]], seed=21)
    time.sleep(1.0)
    point = subprocess.Popen(
        [sys.executable, "-m", "agent", "point", "--json", "--timeout", "120", "--root", str(machine.root)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lab.defer("point request", lambda: point.kill() if point.poll() is None else None)
    wait_for("the point's pre hook", started.exists, timeout=60)
    stopping = time.monotonic()
    agent.terminate()
    assert agent.wait(timeout=120) == 0
    took = time.monotonic() - stopping
    assert took < float(unit_setting("TimeoutStopSec").removesuffix("s")), f"the stop took {took:.1f} s"
    assert posted.exists(), "the post hook did not run"
    _, err = point.communicate(timeout=60)
    assert "error REPL-POINT-FAILED:" in err and "the agent is stopping" in err, err
    hook.unlink()
    restarted = len(machine.log())
    lab.start_agent(machine)
    lab.wait_state(machine, disk, "CONTINUOUS", settled=False)  # the writer goes on: something is always left
    after = machine.log()[restarted:]
    assert "saw every write: no resync" in after and "checksum resync" not in after, after[-3000:]
    cut = machine.point()
    assert cut["consistency"] == "crash-consistent", cut
    problems = failover_and_check(server, machine, cut, [disk], records.read_log(log), lab.workdir / "fo")
    assert not problems, problems[:10]
    writer.terminate()
    print(f"a clean stop during a point on a busy disk took {took:.2f} s (load {os.getloadavg()[0]:.1f})")


def test_failing_replication_threads_are_shown_and_started_again(lab: Lab) -> None:
    """A disk's thread that dies at its start, one that meets an unexpected exception while it replicates, and a
    tracer that dies: each time the disk shows REPL-INTERNAL (never a dead thread and a disk that looks fine), the
    thread starts again, and once the fault is gone the disk is back in CONTINUOUS with a replica equal to the
    disk, writes made meanwhile included."""
    server = lab.server(database=database())
    disk = lab.disk("raw", 64 * MIB, ())
    machine = lab.machine(server, "m1")
    lab.expose(machine, disk)
    protect(server, machine, disk)
    dies, fails, tracer_dies = (lab.workdir / name for name in ("thread-dies", "step-fails", "tracer-dies"))
    plan = {"replication.thread": str(dies), "replication.step": str(fails), "replication.trace": str(tracer_dies)}
    rng = random.Random(31)  # noqa: S311 - test data

    def write_some() -> None:
        fd = os.open(disk.loop, os.O_WRONLY)
        try:
            for _ in range(30):
                os.pwrite(fd, rng.randbytes(4096), rng.randrange(64 * MIB // 4096) * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)

    def shown_failing() -> dict[str, object] | None:
        d = machine.disk_state(disk)
        return d if d.get("error") == "REPL-INTERNAL" and d.get("state") != "CONTINUOUS" else None

    dies.touch()
    lab.start_agent(machine, env=faults.environment(fail_while=plan))
    shown = wait_for("the dead thread shown", shown_failing, timeout=60)
    assert "ended unexpectedly" in str(shown["detail"]), shown
    dies.unlink()
    lab.wait_state(machine, disk, "CONTINUOUS")
    assert "its replication thread ended unexpectedly" in machine.log()

    fails.touch()
    write_some()
    shown = wait_for("the failing thread shown", shown_failing, timeout=60)
    assert "RuntimeError: a failure injected at replication.step" in str(shown["detail"]), shown
    fails.unlink()
    lab.wait_state(machine, disk, "CONTINUOUS")

    tracer_dies.touch()
    shown = wait_for("the dead tracer shown", shown_failing, timeout=60)
    assert "tracer stopped unexpectedly" in str(shown["detail"]), shown
    write_some()  # while no tracer runs: found by the resync
    tracer_dies.unlink()
    lab.wait_state(machine, disk, "CONTINUOUS")
    write_some()  # tracked by the tracer started again
    time.sleep(1.0)
    assert_identical_replica(lab, server, machine, disk)


def test_a_new_process_server_address_is_taken_by_each_disks_own_thread(lab: Lab, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The heartbeat names another process server address: the daemon's thread asks each disk's thread to move,
    and only that thread closes its stream (one thread owns a stream). In this process, with the daemon's own
    replication engine: a port where nothing listens makes the disk unreachable; the right one brings it back."""
    import threading

    from agent.host.paths import Paths
    from agent.lifecycle.registration import authenticated_client
    from agent.replication.engine import Replication
    from agent.replication.stream import Stream
    from agent.shared.replication_wire import Policy, ProcessAddress, Protection

    server = lab.server(database=database())
    disk = lab.disk("raw", 32 * MIB, ())
    machine = lab.machine(server, "m1")
    lab.expose(machine, disk)
    protect(server, machine, disk)
    paths = Paths(machine.root.resolve())
    closed_by: list[str] = []
    close = Stream.close

    def spied(self: Stream) -> None:
        if self.sock is not None:
            closed_by.append(threading.current_thread().name)
        close(self)

    monkeypatch.setattr(Stream, "close", spied)
    replication = Replication(paths, lambda: authenticated_client(paths)[1].context, "127.0.0.1")
    lab.defer("replication", replication.stop)

    def protection(port: int) -> Protection:
        return Protection((disk.loop,), False, Policy(interval_seconds=86400), ProcessAddress("127.0.0.1", port))

    def state() -> tuple[str, str | None]:
        r = replication.replicators[disk.loop]
        return r.state, r.error

    replication.apply(protection(server.process_port))
    wait_for("CONTINUOUS", lambda: state()[0] == "CONTINUOUS", timeout=120)
    with socket_nobody_listens_on() as port:
        replication.apply(protection(port))
        wait_for("the stream moved", lambda: state()[1] == "REPL-UNREACHABLE", timeout=60)
        assert replication.replicators[disk.loop].stream.address.port == port
    replication.apply(protection(server.process_port))
    wait_for("back in CONTINUOUS", lambda: state() == ("CONTINUOUS", None), timeout=120)
    assert closed_by and set(closed_by) == {f"replication {disk.loop}"}, closed_by


class socket_nobody_listens_on:
    """A TCP port bound but never listened on: connections to it are refused."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_a_machine_no_longer_protected_shows_no_disk(lab: Lab) -> None:
    """`mobility-server unprotect`: `mobility status` and the status file stop showing the disk (it showed
    CONTINUOUS for ever), at once while the daemon runs, and at its next start when it was down meanwhile."""
    server = lab.server(database=database())
    disk = lab.disk("d", 32 * MIB, ("ext4",))
    machine = lab.machine(server, "m1")
    lab.expose(machine, disk)

    def shown() -> tuple[list[object], str]:
        r = machine.agent_cli("status", "--json")
        assert r.returncode == 0, r.stderr
        replication = json.loads(r.stdout)["replication"] or {}
        text = machine.agent_cli("status").stdout
        return list(replication.get("disks") or []), text

    protect(server, machine, disk)
    agent = lab.start_agent(machine)
    lab.wait_state(machine, disk, "CONTINUOUS")
    assert f"{disk.loop}: CONTINUOUS" in shown()[1]
    server.cli("unprotect", "--machine", machine.host_id)
    wait_for("no disk shown", lambda: shown()[0] == [], timeout=30)
    assert "replication:    no disk protected" in shown()[1] and not machine.status().get("disks")

    protect(server, machine, disk)
    lab.wait_state(machine, disk, "CONTINUOUS")
    assert machine.agent is not None
    machine.agent.terminate()
    assert machine.agent.wait(timeout=60) == 0
    assert shown()[0] != []
    server.cli("unprotect", "--machine", machine.host_id)
    lab.start_agent(machine)
    wait_for("no disk shown after the start", lambda: shown()[0] == [], timeout=30)
    assert agent.poll() is not None


def test_a_freeze_whose_owner_still_runs_is_left_to_it(lab: Lab) -> None:
    """`mobility thaw` (or a second daemon started by hand) while the process that froze still runs thaws nothing:
    that process's own thaw and watchdog come within seconds, and a thaw from outside would let writes into its
    point. Once it is dead (kill -9), the same command thaws."""
    disk = lab.disk("d", 32 * MIB, ("ext4",))
    where = disk.mounts[0]
    lab.defer(f"thaw {where}", lambda: sh(["fsfreeze", "--unfreeze", str(where)], check=False))
    root = lab.workdir / "root"
    root.mkdir()
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from agent.host.paths import Paths\n"
        "from agent.replication.devices import freeze\n"
        "from agent.replication.frozen import record_frozen\n"
        f"record_frozen(Paths(Path(sys.argv[1])), [{str(where)!r}])\n"
        f"freeze({str(where)!r})\n"
        "print('frozen', flush=True)\n"
        "time.sleep(300)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script, str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    lab.defer("owner", lambda: owner.kill() if owner.poll() is None else None)
    assert owner.stdout is not None and owner.stdout.readline() == "frozen\n"
    thaw = [sys.executable, "-m", "agent", "thaw", "--root", str(root)]
    r = subprocess.run(thaw, cwd=REPO, capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0 and "a recovery point is freezing now" in r.stdout, (r.stdout, r.stderr)
    probe = Probe(where)
    assert probe.blocked()
    owner.kill()
    owner.wait(timeout=10)
    r = subprocess.run(thaw, cwd=REPO, capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0 and r.stdout.strip() == f"thawed {where}", (r.stdout, r.stderr)
    probe.wait(timeout=10)


class SystemdMachine:
    """A Debian 12 booted with systemd-nspawn (in a cgroup of its own), whose mobility.service is the unit of
    systemd/mobility.service running this checkout's agent; a drop-in adds only the suite's PYTHONPATH and, if given,
    a fault plan. Registered with ``server`` and protecting ``disk``, whose filesystem is bound at /data (the
    container shares the host's network: the server is on 127.0.0.1)."""

    def __init__(self, lab: Lab, server: Server, disk: Disk, interval: str, plan: dict[str, object] | None) -> None:
        from scripts.localserver import configure_agent
        from scripts.testlab import in_cgroups, make_cgroups, remove_cgroup, sshd_base_root

        self.root = root = lab.workdir / "vm"
        sh(["cp", "-a", str(sshd_base_root()), str(root)], timeout=300)
        lab.defer("container root", lambda: sh(["rm", "-rf", "--one-file-system", str(root)], check=False, timeout=300))
        (root / "etc/machine-id").write_text(os.urandom(16).hex() + "\n")
        (root / "etc/hostname").write_text("vm-safety\n")
        secret = lab.workdir / "vm.pass"
        secret.write_text(server.cli("passphrase", "show").stdout.strip() + "\n")
        secret.chmod(0o600)
        r = configure_agent(root, server.address, secret, server.fingerprint)
        assert r.returncode == 0, r.stderr
        self.machine = Machine(root, json.loads(r.stdout)["host_id"])
        (root / "etc/mobility").mkdir(parents=True, exist_ok=True)
        (root / "etc/mobility/mobility.conf").write_text(json.dumps({"health_seconds": 5}))
        launcher = root / MOBILITY.lstrip("/")  # this checkout's agent, where the unit runs it
        launcher.parent.mkdir(parents=True)
        launcher.write_text(f'#!/bin/sh\nexec {sys.executable} -m agent "$@"\n')
        launcher.chmod(0o755)
        units = root / "etc/systemd/system"
        (units / "ssh.service").symlink_to("/dev/null")  # the container shares the host's network: not its port 22
        (units / "mobility.service").write_text(UNIT.read_text())
        (units / "multi-user.target.wants").mkdir(exist_ok=True)
        (units / "multi-user.target.wants/mobility.service").symlink_to("/etc/systemd/system/mobility.service")
        (units / "mobility.service.d").mkdir()
        self.environment = [f"PYTHONPATH={REPO}:{faults.SITE}", "PYTHONDONTWRITEBYTECODE=1"]
        if plan:
            self.environment.append(f"{faults.PLAN}={json.dumps(plan)}")
        (units / "mobility.service.d/test.conf").write_text(
            "[Service]\n" + "".join(f"Environment='{e}'\n" for e in self.environment)
        )
        (root / "var/log/journal").mkdir(parents=True, exist_ok=True)
        (root / "var/log/mobility").mkdir(parents=True, exist_ok=True)  # as install makes it (ReadWritePaths needs it)
        (root / "data").mkdir()
        server.cli("policy", "set", "vm", "--interval", interval, "--retention", "100")
        server.cli("protect", "--machine", self.machine.host_id, "--disk", disk.loop, "--policy", "vm")
        self.cgroups = make_cgroups(f"mvm{os.getpid()}")
        self.nspawn = subprocess.Popen(
            in_cgroups(
                self.cgroups,
                "systemd-nspawn",
                "--boot",
                "--register=no",
                "--keep-unit",
                "--quiet",
                "-D",
                str(root),
                f"--bind={disk.mounts[0]}:/data",
                f"--bind={disk.loop}",
                f"--bind-ro={REPO}",
                f"--bind-ro={Path(sys.executable).resolve().parents[1]}",
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        self._remove_cgroup = remove_cgroup
        lab.defer("container", self.poweroff)

    def poweroff(self) -> None:
        if self.nspawn.poll() is None:
            self.nspawn.terminate()  # the container's systemd powers off
            try:
                self.nspawn.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(timeout=10)
        for cgroup in self.cgroups:
            if (cgroup / "cgroup.kill").exists():
                (cgroup / "cgroup.kill").write_text("1")
        time.sleep(0.5)
        for cgroup in self.cgroups:
            self._remove_cgroup(cgroup)

    def journal(self) -> str:
        return sh(
            ["journalctl", "-D", str(self.root / "var/log/journal"), "-u", "mobility.service", "-o", "short-precise"],
            check=False,
        ).stdout

    def wait_journal(self, what: str, condition: Callable[[str], bool], timeout: float = 240) -> str:
        try:
            return str(wait_for(what, lambda: condition(j := self.journal()) and j, timeout=timeout))
        except AssertionError as e:
            raise AssertionError(
                f"{e}\njournal: {self.journal()[-4000:]}\nagent.log: {self.machine.log()[-3000:]}"
            ) from None

    def leader(self) -> int:
        """The container's PID 1 (systemd), as this machine sees it."""
        children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children").read_text().split()
        return int(children[0])

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside the container (its namespaces, its root), with the suite's PYTHONPATH."""
        return ["nsenter", "-t", str(self.leader()), "-a", "env", *self.environment, *argv]

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*argv), capture_output=True, text=True, timeout=timeout, check=False)


def test_under_systemd_the_unit_thaws_what_a_killed_daemon_left_frozen(lab: Lab) -> None:
    """The kill inside a freeze, under real systemd (SystemdMachine): the daemon is killed inside its first point's
    freeze; systemd runs ExecStopPost, which thaws it (the journal says so, within a second), and restarts the
    daemon, which replicates again."""
    server = lab.server(database=database())
    disk = lab.disk("d", 64 * MIB, ("ext4",))
    where = disk.mounts[0]
    lab.defer(f"thaw {where}", lambda: sh(["fsfreeze", "--unfreeze", str(where)], check=False))
    (where / "data").write_bytes(random.Random(41).randbytes(4 * MIB))  # noqa: S311 - test data
    vm = SystemdMachine(lab, server, disk, "10s", {"kill": {"replication.frozen": 1}})
    thawed = vm.wait_journal(
        "ExecStopPost's thaw and the restart", lambda j: ": thawed /data\n" in j and "Scheduled restart job" in j
    )
    lines = thawed.splitlines()
    killed = next(i for i, line in enumerate(lines) if "Main process exited, code=killed, status=9/KILL" in line)
    thaw = next(i for i, line in enumerate(lines) if line.endswith(": thawed /data"))  # `mobility thaw`'s output
    restart = next(i for i, line in enumerate(lines) if "Scheduled restart job" in line)
    assert killed < thaw < restart, "\n".join(lines[killed:])
    killed_line, thaw_line = lines[killed], lines[thaw]
    seconds = (stamp(thaw_line) - stamp(killed_line)).total_seconds()
    assert 0 <= seconds < 5, (killed_line, thaw_line)
    Probe(where).wait(timeout=10)
    vm.wait_journal("the daemon started again by systemd", lambda j: j.count("mobility 0.1.0 daemon started") >= 2)
    print(f"under systemd: kill -9 inside the freeze -> thawed by ExecStopPost in {seconds:.2f} s:")
    print(f"{killed_line}\n{thaw_line}")


def test_under_systemd_a_restart_during_a_point_on_a_busy_disk_needs_no_resync(lab: Lab) -> None:
    """`systemctl restart mobility` while a writer keeps the protected disk busy and a point is being cut (its pre
    hook still running, deaf to the SIGTERM systemd sends every process of the unit): the stop is clean and quick (no
    kill at TimeoutStopSec), the daemon started again goes on in CONTINUOUS with the tracing it kept, without a
    resync, and its next point holds every record written before it."""
    server = lab.server(database=database())
    disk = lab.disk("d", 64 * MIB, ("ext4",))
    where = disk.mounts[0]
    lab.defer(f"thaw {where}", lambda: sh(["fsfreeze", "--unfreeze", str(where)], check=False))
    vm = SystemdMachine(lab, server, disk, "7d", None)
    state = vm.root / "var/lib/mobility"
    hook = vm.root / "etc/mobility/freeze.d/10-slow"
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text(
        '#!/bin/sh\n[ "$1" = post ] && { touch /var/lib/mobility/post-ran; exit 0; }\n'
        "touch /var/lib/mobility/pre-started\ntrap '' TERM\nsleep 120\n"  # deaf to systemd's SIGTERM, as a slow flush
    )
    hook.chmod(0o755)
    wait_for("CONTINUOUS", lambda: vm.machine.disk_state(disk).get("state") == "CONTINUOUS", timeout=240)
    writer, log = start_writer(lab, [where], seed=51)
    time.sleep(1.0)
    point = subprocess.Popen(vm.command(MOBILITY, "point", "--timeout", "120"), stdout=subprocess.PIPE, text=True)
    lab.defer("point request", lambda: point.kill() if point.poll() is None else None)
    wait_for("the point's pre hook", (state / "pre-started").exists, timeout=60)
    before = len(vm.journal().splitlines())
    started = time.monotonic()
    r = vm.run("systemctl", "restart", "mobility.service")
    took = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    assert (state / "post-ran").exists(), "the post hook did not run"
    point.wait(timeout=60)
    hook.unlink()
    journal = "\n".join(vm.journal().splitlines()[before:])
    assert "Killing" not in journal and "status=9/KILL" not in journal and "timed out" not in journal, journal
    stopping = next(line for line in journal.splitlines() if "Stopping mobility.service" in line)
    stopped = next(line for line in journal.splitlines() if "Stopped mobility.service" in line)
    stop_seconds = (stamp(stopped) - stamp(stopping)).total_seconds()
    assert stop_seconds < float(unit_setting("TimeoutStopSec").removesuffix("s")), journal
    vm.wait_journal("the restarted daemon in CONTINUOUS", lambda j: "saw every write: no resync" in j, timeout=120)
    after = "\n".join(vm.journal().splitlines()[before:])
    assert "checksum resync" not in after, after
    r = vm.run(MOBILITY, "point", "--json", "--timeout", "120", timeout=200)
    assert r.returncode == 0, (r.stdout, r.stderr)
    cut = json.loads(r.stdout)
    assert cut["consistency"] == "crash-consistent", cut
    problems = failover_and_check(server, vm.machine, cut, [disk], records.read_log(log), lab.workdir / "fo")
    assert not problems, problems[:10]
    writer.terminate()
    print(
        f"under systemd: `systemctl restart` during a point on a busy disk: stopped in {stop_seconds:.2f} s, "
        f"restarted in {took:.2f} s, no resync (load {os.getloadavg()[0]:.1f})"
    )


def stamp(line: str) -> Any:
    """The time of a journal line in ``short-precise`` form ("Dec 05 12:34:56.789012 host unit[pid]: ...")."""
    import datetime as dt

    return dt.datetime.strptime(" ".join(line.split()[:3]), "%b %d %H:%M:%S.%f")
