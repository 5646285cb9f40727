"""Replication end to end, for real: loop-device disks with ext4 and XFS, a real server (API + process server),
real `mobility run` daemons tracking writes through the kernel's block tracepoints, points cut with FIFREEZE,
failover images checked by fsck, read-only mounts and the records a writer process left. Fault tests: kill -9 of
the agent and of the process server, a cut link (a veth in a network namespace), a full process-server disk, a
flipped bit in the chunk store, and trace events lost to a tiny buffer."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.replication_lab import Disk, Lab, Machine, Server, read_disk, sh, umount, wait_for
from tests import faults
from tests.conftest import REPO, require_root
from tests.integration import records
from tests.postgres import on_postgresql, shared_cluster
from tests.server.process.stores import locate

pytestmark = pytest.mark.integration

MIB = 1 << 20
CYCLES = int(os.environ.get("MOBILITY_RECORD_CYCLES", "30"))


def database(*, local: bool = False) -> str | None:
    """The server's database: its own SQLite file, or with MOBILITY_TEST_DATABASE=postgresql a new database of the
    shared PostgreSQL cluster (``local``: through its Unix socket, for a server inside a network namespace)."""
    if not on_postgresql():
        return None
    cluster = shared_cluster()
    url = cluster.new_database()
    return cluster.local_url(url) if local else url


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    require_root()
    with Lab(tmp_path / "lab") as lab:
        yield lab


def protect(server: Server, machine: Machine, *disks: Disk, policy: str = "manual") -> None:
    server.cli("policy", "set", policy, "--interval", "7d", "--retention", "1000")
    server.cli(
        "protect", "--machine", machine.host_id, *[a for d in disks for a in ("--disk", d.loop)], "--policy", policy
    )


def start_writer(lab: Lab, dirs: list[Path], seed: int) -> tuple[subprocess.Popen[bytes], Path]:
    log = lab.workdir / f"writer-{seed}.log"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests/integration/records.py"), str(log), *map(str, dirs)],
        env={**os.environ, "RECORD_SEED": str(seed)},
    )
    lab.defer(f"writer {proc.pid}", lambda: _stop(proc))
    return proc, log


def writes_beyond(log: Path, count: int, more: int = 20) -> None:
    """Wait until the writer logged ``more`` writes past ``count`` (it writes a record every few milliseconds)."""
    wait_for(f"{more} more writes", lambda: log.exists() and len(records.read_log(log)) >= count + more, timeout=60)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def fsck(device: str, fstype: str) -> subprocess.CompletedProcess[str]:
    cmd = ["e2fsck", "-f", "-n", device] if fstype.startswith("ext") else ["xfs_repair", "-n", device]
    return sh(cmd, check=False, timeout=300)


def attach(image: Path, offset: int, size: int, *, read_only: bool = True) -> str:
    """A loop device over the part of a failed-over image that holds one filesystem (a partition, or all)."""
    flags = ["--read-only"] if read_only else []
    where = ["--offset", str(offset), "--sizelimit", str(size)]
    return str(sh(["losetup", "--find", "--show", *flags, *where, str(image)]).stdout.strip())


class Mounted:
    """A failed-over filesystem, mounted read-only for reading records."""

    def __init__(self, device: str, where: Path, fstype: str) -> None:
        self.where = where
        where.mkdir(parents=True, exist_ok=True)
        options = "ro,nouuid" if fstype == "xfs" else "ro"  # the source XFS is mounted with the same UUID
        r = sh(["mount", "-t", fstype, "-o", options, device, str(where)], check=False)
        if r.returncode:
            raise AssertionError(f"read-only mount of {device} failed: {r.stderr}")

    def close(self) -> None:
        umount(self.where)


def boot(device: str, where: Path, fstype: str) -> None:
    """What the failed-over machine does first: mount read-write once, replaying the journal (a frozen XFS
    leaves its log to replay; a frozen ext4 is clean already), and unmount."""
    where.mkdir(parents=True, exist_ok=True)
    options = "rw,nouuid" if fstype == "xfs" else "rw"
    sh(["mount", "-t", fstype, "-o", options, device, str(where)])
    umount(where)


def failover_and_check(
    server: Server,
    machine: Machine,
    point: dict[str, object],
    disks: list[Disk],
    writes: list[records.Write],
    out: Path,
    *,
    command: bool = True,
) -> list[str]:
    """Fail the point over into ``out`` (with `mobility-server failover`, or without ``command`` by the same code in
    this process, beside the running server: cheaper for many cycles) and check every filesystem and record."""
    if command:
        server.cli(
            "failover", "--machine", machine.host_id, "--point", str(point["point_id"]), "--out", str(out), "--no-mark"
        )
    else:
        from server.process.failover import materialise
        from server.process.store import ChunkStore

        store = ChunkStore(server.data / "process")
        try:
            materialise(store, store.resolve_point(machine.host_id, str(point["point_id"])), out)
        finally:
            store.close()
    problems: list[str] = []
    mounted: list[Mounted] = []
    loops: list[str] = []
    dirs: dict[int, Path] = {}
    try:
        index = 0
        for disk in disks:
            image = out / (disk.loop.removeprefix("/dev/") + ".img")
            for fstype, (offset, size) in zip(disk.fstypes, disk.ranges, strict=True):
                device = attach(image, offset, size, read_only=False)
                loops.append(device)
                if fstype == "xfs":  # ext4 is checked as the point left it: a frozen ext4 needs no replay
                    boot(device, out / f"boot{index}", fstype)
                r = fsck(device, fstype)
                if r.returncode != 0:
                    problems.append(f"{disk.loop} ({fstype}): fsck: {r.stdout[-600:]} {r.stderr[-300:]}")
                m = Mounted(device, out / f"mnt{index}", fstype)
                mounted.append(m)
                dirs[index] = m.where
                index += 1
        problems += records.check(dirs, writes, float(point["frozen_at"]), float(point["thawed_at"]))  # type: ignore[arg-type]
    finally:
        for m in mounted:
            m.close()
        for device in loops:
            sh(["losetup", "--detach", device], check=False)
        shutil.rmtree(out, ignore_errors=True)
    return problems


def test_failed_over_points_hold_exactly_the_records_written_before_them(lab: Lab) -> None:
    """A writer keeps writing records to ext4 and XFS on two protected disks; at random moments a point is cut;
    every point fails over to images that fsck finds clean, with every record acknowledged before the freeze, none
    started after the thaw, and every record intact. CYCLES times (MOBILITY_RECORD_CYCLES, 30 by default)."""
    server = lab.server(database=database())
    ext4 = lab.disk("ext4", 128 * MIB, ("ext4",))
    xfs = lab.disk("xfs", 320 * MIB, ("xfs",))
    machine = lab.machine(server, "m1")
    for d in (ext4, xfs):
        lab.expose(machine, d)
    protect(server, machine, ext4, xfs)
    lab.start_agent(machine)
    lab.wait_state(machine, ext4, "CONTINUOUS")
    lab.wait_state(machine, xfs, "CONTINUOUS")
    writer, log = start_writer(lab, [ext4.mounts[0], xfs.mounts[0]], seed=15)
    rng = random.Random(15)  # noqa: S311 - test timing
    freezes = []
    from agent.host.paths import Paths
    from agent.replication.local_commands import request_point

    paths = Paths(machine.root.resolve())
    for cycle in range(CYCLES):
        time.sleep(rng.uniform(0.05, 0.6))
        # The commands run once in ten cycles; the other cycles ask and fail over in this process (same code).
        point = machine.point() if cycle % 10 == 9 else request_point(paths, timeout=120)
        assert point["consistency"] == "crash-consistent", point
        freezes.append(point["freeze_ms"])
        assert writer.poll() is None, "the writer died"
        problems = failover_and_check(
            server,
            machine,
            point,
            [ext4, xfs],
            records.read_log(log),
            lab.workdir / "fo",
            command=cycle % 10 == 9,
        )
        assert not problems, f"cycle {cycle}: {problems[:10]}"
        if cycle == CYCLES - 1:  # the command once: it boots libguestfs's appliance to look inside the point
            r = server.cli(
                "test-failover", "--machine", machine.host_id, "--point", str(point["point_id"]), "--json", check=False
            )
            report = json.loads(r.stdout)
            assert r.returncode == 0 and report["ok"], report
    _stop(writer)
    assert len(records.read_log(log)) > 100 * CYCLES
    points = server.json("points", "--machine", machine.host_id)
    assert len(points) == CYCLES
    assert machine.agent is not None
    started = time.monotonic()
    machine.agent.terminate()  # a clean stop is quick; it keeps its tracing on for the next start
    assert machine.agent.wait(timeout=30) == 0 and time.monotonic() - started < 15
    from agent.replication.tracing import TRACEFS, instance_name

    assert (TRACEFS / "instances" / instance_name(Paths(machine.root.resolve()).state_dir) / "trace_pipe").exists()
    print(f"freeze windows (ms): median {sorted(freezes)[len(freezes) // 2]}, max {max(freezes)}")


def test_a_freeze_does_not_wait_for_a_slow_process_server(lab: Lab) -> None:
    """The residual is read and hashed while frozen and sent after the thaw: a process server that takes 2 s to
    verify each batch (a fault plan's delay) makes the points slower, never their freezes longer; and each point is
    still exactly the frozen state (the records check). Before, the capture waited inside the freeze for the server
    to verify the residual's batches."""
    slow = lab.workdir / "slow"
    server = lab.server(env=faults.environment(delay_while={"process.verify": str(slow)}, delay=2.0))
    ext4 = lab.disk("ext4", 128 * MIB, ("ext4",))
    machine = lab.machine(server, "m1")
    lab.expose(machine, ext4)
    protect(server, machine, ext4)
    lab.start_agent(machine)
    lab.wait_state(machine, ext4, "CONTINUOUS")
    writer, log = start_writer(lab, [ext4.mounts[0]], seed=23)
    from agent.errors import PointFailed
    from agent.host.paths import Paths
    from agent.replication.local_commands import request_point

    paths = Paths(machine.root.resolve())
    took = []
    refused: list[str] = []
    for cycle in range(3):
        writes_beyond(log, len(records.read_log(log)) if log.exists() else 0)  # a residual of the point's own
        slow.touch()  # from now on each batch takes the server 2 s to verify
        point = None
        for _ in range(4):
            started = time.monotonic()
            try:
                point = request_point(paths, timeout=120)
                break
            except PointFailed as e:
                # A delta whose chunk a write changed between the dirty map's take and the read (its completion not
                # traced yet) is refused by the server, which rebuilds another hash. While verification lags behind,
                # that verdict can come after the freeze: the point fails, never makes a wrong one, and the next has
                # the chunk whole (docs/replication.md). Asked again, as an operator would.
                if "sent before the point's root was taken" not in str(e):
                    raise
                refused.append(str(e))
        assert point is not None, refused
        took.append(time.monotonic() - started)
        slow.unlink()
        assert point["consistency"] == "crash-consistent", point
        assert point["freeze_ms"] < 2000, point
        problems = failover_and_check(
            server, machine, point, [ext4], records.read_log(log), lab.workdir / "fo", command=False
        )
        assert not problems, f"cycle {cycle}: {problems[:10]}"
    assert max(took) >= 2.0, took  # the slow verification was on the points' way (after their thaw)
    _stop(writer)


def fill_raw(disk: Disk, nbytes: int, seed: int) -> None:
    """Random data straight onto the disk (no filesystem), from its start."""
    rng = random.Random(seed)  # noqa: S311 - test data
    fd = os.open(disk.loop, os.O_WRONLY)
    try:
        for offset in range(0, nbytes, MIB):
            os.pwrite(fd, rng.randbytes(MIB), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def assert_identical_replica(lab: Lab, server: Server, machine: Machine, disk: Disk) -> dict[str, object]:
    """With the disk idle (nothing mounted from it), a point fails over to an image equal to the disk, byte for
    byte, and verifies."""
    lab.wait_state(machine, disk, "CONTINUOUS")

    def idle_point() -> dict[str, object] | None:
        # Idle once no write reached the disk in the second before the freeze: the umount's own writes may still land.
        # A disk can also leave CONTINUOUS after the state was read (lost trace events noticed late start a resync):
        # the point is refused then, and asked again, as an operator would.
        try:
            p = machine.point()
        except RuntimeError as e:
            if "not every protected disk is in CONTINUOUS" in str(e):
                return None
            raise
        return p if p["consistency"] == "raw-idle" else None

    point = wait_for("an idle point", idle_point, timeout=120)
    server.cli("verify", "--point", str(point["point_id"]))
    out = lab.workdir / "identical"
    server.cli(
        "failover", "--machine", machine.host_id, "--point", str(point["point_id"]), "--out", str(out), "--no-mark"
    )
    size = os.path.getsize(disk.image)
    image = (out / (disk.loop.removeprefix("/dev/") + ".img")).read_bytes()
    source = read_disk(disk.loop, size)
    assert len(image) == len(source) == size
    if image != source:
        bad = next(i for i in range(0, size, 65536) if image[i : i + 65536] != source[i : i + 65536])
        raise AssertionError(f"the replica differs from the disk from chunk {bad // 65536}")
    shutil.rmtree(out)
    return point


def test_kill_9_of_agent_and_process_server_then_resync_converges_to_an_identical_replica(lab: Lab) -> None:
    server = lab.server(database=database())
    # Partitioned: writes to the partition are traced on the disk, and the replica is compared with the whole disk.
    disk = lab.disk("d", 96 * MIB, ("ext4",), partitioned=True)
    (disk.mounts[0] / "data").write_bytes(random.Random(1).randbytes(48 * MIB))  # noqa: S311
    sh(["sync"])
    machine = lab.machine(server, "m1")
    lab.expose(machine, disk)
    server.cli("policy", "set", "slow", "--interval", "7d", "--bandwidth", "16M")
    server.cli("protect", "--machine", machine.host_id, "--disk", disk.loop, "--policy", "slow")
    agent = lab.start_agent(machine)
    wait_for("the initial sync under way", lambda: 0 < machine.disk_state(disk).get("bytes_left", 0) < 90 * MIB)
    agent.kill()  # kill -9 mid-stream, during the initial sync (some of the disk sent, not all)
    agent.wait(timeout=10)
    server.cli("policy", "set", "slow", "--bandwidth", "0")
    lab.start_agent(machine)
    lab.wait_state(machine, disk, "CONTINUOUS", timeout=180)
    writer, log = start_writer(lab, [disk.mounts[0]], seed=2)
    writes_beyond(log, 0)
    assert machine.agent is not None
    machine.agent.kill()  # kill -9 during continuous replication, with writes going on
    machine.agent.wait(timeout=10)
    writes_beyond(log, len(records.read_log(log)))  # and writes while it is down
    lab.start_agent(machine)
    wait_for("the resync after the kill", lambda: "did not stop cleanly" in machine.log(), timeout=60)
    lab.wait_state(machine, disk, "CONTINUOUS", timeout=180)
    os.kill(server.proc.pid, signal.SIGKILL)  # and the process server, while the writer keeps writing
    server.proc.wait(timeout=10)
    writes_beyond(log, len(records.read_log(log)))  # writes the process server has not seen
    lab.restart(server)
    restarted = time.time()
    # The status the agent wrote before the kill said CONTINUOUS too, with no error and a small lag (it is written
    # every 2 s, and a quick restart comes within that): wait for one written since, with the new server's
    # acknowledgements (the stream's error is cleared only by a stream that opened).
    wait_for(
        "the agent streaming to the restarted process server",
        lambda: (
            machine.status().get("updated", 0) > restarted
            and (d := machine.disk_state(disk)).get("error") is None
            and (d.get("lag_seconds") or 0.0) < 2.0
        ),
        timeout=180,
    )
    lab.wait_state(machine, disk, "CONTINUOUS", timeout=180)
    point = machine.point()
    problems = failover_and_check(server, machine, point, [disk], records.read_log(log), lab.workdir / "fo")
    assert not problems, problems[:10]
    _stop(writer)
    umount(disk.mounts[0], ended=True)  # idle for good: no namespace keeps the filesystem writing after the point
    assert_identical_replica(lab, server, machine, disk)


def _namespace_holder(lab: Lab, propagation: str, where: Path) -> subprocess.Popen[bytes]:
    """A process in a mount namespace made while ``where`` is mounted, as another test's `ip netns exec` or
    systemd-nspawn makes one (``slave``) or `unshare --mount` does (``private``): it holds a copy of the mount."""
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", propagation, "sleep", "120"])
    lab.defer(f"holder {proc.pid}", lambda: (proc.kill(), proc.wait(timeout=10)))
    wait_for("the copied mount", lambda: f" {where} " in Path(f"/proc/{proc.pid}/mountinfo").read_text(), timeout=10)
    return proc


def test_an_unmounted_lab_filesystem_ends_though_a_slave_mount_namespace_copied_it(lab: Lab) -> None:
    """The identical-replica checks unmount the disk and take it for idle. A mount namespace another test made while
    it was mounted (this machine's mounts are private) kept the filesystem alive: it wrote its journal and superblock
    after the idle point, and the replica 'differed' from the disk (the product had replicated those late writes
    correctly). Under the lab's shared directory the unmount reaches such a namespace, and the filesystem ends."""
    disk = lab.disk("d", 32 * MIB, ("ext4",))
    (disk.mounts[0] / "f").write_bytes(random.Random(5).randbytes(MIB))  # noqa: S311 - dirty, written back at the end
    holder = _namespace_holder(lab, "slave", disk.mounts[0])
    umount(disk.mounts[0], ended=True, timeout=5)
    before = read_disk(disk.loop, 32 * MIB)
    # The moment a filesystem that lived on in the namespace would write its journal and superblock is when the
    # namespace lets go of it, and it claims the disk until it has: end the holder, then wait for the disk to be free.
    holder.kill()
    holder.wait(timeout=10)
    wait_for("the disk claimed by nobody", lambda: _unclaimed(disk.loop), timeout=10)
    assert read_disk(disk.loop, 32 * MIB) == before


def _unclaimed(device: str) -> bool:
    """Whether no filesystem (nor anyone else) holds ``device``: an exclusive open fails with EBUSY while one does."""
    try:
        os.close(os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        return False
    return True


def test_an_unmounted_filesystem_that_lives_on_elsewhere_is_never_taken_for_idle(lab: Lab) -> None:
    """A private copy (`unshare --mount`) is out of the lab's reach: waiting for the filesystem to end says so and
    names the holder, instead of a comparison with a disk that is still being written."""
    disk = lab.disk("d", 32 * MIB, ("ext4",))
    holder = _namespace_holder(lab, "private", disk.mounts[0])
    with pytest.raises(RuntimeError, match=f"another mount namespace \\(processes \\[{holder.pid}\\]\\)"):
        umount(disk.mounts[0], ended=True, timeout=2)
    holder.kill()
    holder.wait(timeout=10)

    def ended() -> bool:
        try:
            os.close(os.open(disk.loop, os.O_RDONLY | os.O_EXCL))
        except OSError:  # EBUSY while a filesystem holds it
            return False
        return True

    wait_for("the filesystem's end with its last namespace", ended, timeout=10)


def _point_or_none(machine: Machine) -> dict[str, Any] | None:
    """A point, or None when the agent said it could not cut one (REPL-POINT-FAILED: a passing reason)."""
    try:
        return machine.point()
    except RuntimeError as e:
        if "REPL-POINT-FAILED" not in str(e):
            raise
        return None


def test_a_cut_link_builds_a_backlog_and_catches_up(lab: Lab) -> None:
    ns, veth = f"mrepl{os.getpid()}", f"mrv{os.getpid()}"
    net = f"10.231.{os.getpid() % 200 + 20}"
    sh(["ip", "netns", "add", ns])
    lab.defer(f"netns {ns}", lambda: sh(["ip", "netns", "del", ns], check=False))
    sh(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
    lab.defer(f"link {veth}", lambda: sh(["ip", "link", "del", veth], check=False))
    sh(["ip", "addr", "add", f"{net}.1/30", "dev", veth])
    sh(["ip", "link", "set", veth, "up"])
    sh(["ip", "-n", ns, "addr", "add", f"{net}.2/30", "dev", "eth0"])
    sh(["ip", "-n", ns, "link", "set", "eth0", "up"])
    sh(["ip", "-n", ns, "link", "set", "lo", "up"])
    server = lab.server(host=f"{net}.2", wrap=["ip", "netns", "exec", ns], database=database(local=True))
    disk = lab.disk("d", 64 * MIB, ("ext4",))
    machine = lab.machine(server, "m1")
    lab.expose(machine, disk)
    protect(server, machine, disk)
    lab.start_agent(machine)
    lab.wait_state(machine, disk, "CONTINUOUS")
    writer, log = start_writer(lab, [disk.mounts[0]], seed=3)
    writes_beyond(log, 0)
    sh(["ip", "link", "set", veth, "down"])
    try:
        backlog = wait_for(
            "a backlog while the link is down",
            lambda: (d := machine.disk_state(disk)).get("bytes_left", 0) > 0 and (d.get("lag_seconds") or 0) > 3 and d,
            timeout=60,
        )
        wait_for(
            "the lag growing while the link is down",
            lambda: machine.disk_state(disk).get("lag_seconds", 0) > backlog["lag_seconds"] + 1,
            timeout=30,
        )
    finally:
        sh(["ip", "link", "set", veth, "up"])
    lab.wait_state(machine, disk, "CONTINUOUS", timeout=180)
    wait_for("lag back under 5 s", lambda: (machine.disk_state(disk).get("lag_seconds") or 99) < 5, timeout=120)
    # A point right after the outage may fail (once in CI: "did not acknowledge point", cause not found yet) and say
    # so; the next one is asked for, as the schedule would. Whatever point comes holds exactly the frozen records.
    point = wait_for("a point after the outage", lambda: _point_or_none(machine), timeout=600)
    problems = failover_and_check(server, machine, point, [disk], records.read_log(log), lab.workdir / "fo")
    assert not problems, problems[:10]
    _stop(writer)


def test_a_full_process_server_disk_refuses_clearly_and_recovers_when_space_is_freed(lab: Lab) -> None:
    from scripts.localserver import init_local_server

    data = lab.workdir / "server"
    init_local_server(data, database=database())
    store_fs = lab.workdir / "store.img"
    with store_fs.open("wb") as f:
        f.truncate(256 * MIB)
    sh(["mkfs.ext4", "-q", str(store_fs)])
    (data / "process").mkdir(mode=0o700)
    sh(["mount", "-o", "loop", str(store_fs), str(data / "process")])
    lab.defer("store mount", lambda: umount(data / "process"))
    filler = data / "process" / "filler"
    filler.write_bytes(bytes(120 * MIB))
    server = lab.server(data=data)
    disk = lab.disk("raw", 160 * MIB, ())
    fill_raw(disk, 120 * MIB, seed=4)
    machine = lab.machine(server, "m1")
    lab.expose(machine, disk)
    protect(server, machine, disk)
    lab.start_agent(machine)
    stalled = lab.wait_state(machine, disk, "STALLED", timeout=120)
    assert stalled["error"] == "PS-STORE-FULL", stalled
    st = os.statvfs(data / "process")
    assert st.f_bavail * st.f_frsize > 16 * MIB, "the store filled its disk instead of refusing before"
    shown = wait_for(
        "the server's view of the stall",
        lambda: [
            d
            for m in server.json("protection")["machines"]
            for d in (m["replication"] or {}).get("disks", [])
            if d.get("error") == "PS-STORE-FULL"
        ],
        timeout=30,
    )
    assert shown
    filler.unlink()
    lab.wait_state(machine, disk, "CONTINUOUS", timeout=180)
    assert_identical_replica(lab, server, machine, disk)


def test_a_flipped_bit_in_the_store_is_found_by_verify_and_test_failover(lab: Lab) -> None:
    from agent.replication.chunks import HASH_SIZE, zero_hash
    from server.process.store import ChunkStore

    server = lab.server(database=database())
    disk = lab.disk("d", 64 * MIB, ("ext4",))
    (disk.mounts[0] / "data").write_bytes(random.Random(5).randbytes(16 * MIB))  # noqa: S311
    machine = lab.machine(server, "m1")
    lab.expose(machine, disk)
    protect(server, machine, disk)
    lab.start_agent(machine)
    lab.wait_state(machine, disk, "CONTINUOUS")
    point = machine.point()
    assert server.cli("verify", "--point", str(point["point_id"])).returncode == 0
    store = ChunkStore(server.data / "process")
    try:
        found = store.resolve_point(machine.host_id, str(point["point_id"]))
        manifest = store.manifest(found.disks[0])
        hashes = [manifest[i : i + HASH_SIZE] for i in range(0, len(manifest), HASH_SIZE)]
        victim = next(h for h in reversed(hashes) if h != zero_hash(65536))
        where = locate(store, victim)
    finally:
        store.close()
    assert where is not None
    pack, offset, length = where
    with pack.open("r+b") as f:
        f.seek(offset + length // 2)
        byte = f.read(1)[0]
        f.seek(offset + length // 2)
        f.write(bytes([byte ^ 0x04]))
    r = server.cli("verify", "--point", str(point["point_id"]), check=False)
    assert r.returncode == 1 and "error POINT-CORRUPT" in r.stderr, r.stderr
    assert f"chunk {hashes.index(victim)}" in r.stderr
    r = server.cli("test-failover", "--machine", machine.host_id, "--point", str(point["point_id"]), check=False)
    assert r.returncode == 1 and "POINT-CORRUPT" in r.stdout + r.stderr, r.stdout + r.stderr


def test_lost_trace_events_mean_a_resync_never_a_wrong_replica(lab: Lab) -> None:
    server = lab.server(database=database())
    disk = lab.disk("raw", 128 * MIB, ())
    fill_raw(disk, 16 * MIB, seed=6)
    machine = lab.machine(server, "m1", config={"replication_trace_buffer_kb": 4})
    lab.expose(machine, disk)
    protect(server, machine, disk)
    lab.start_agent(machine)
    lab.wait_state(machine, disk, "CONTINUOUS")
    sh(
        [
            "fio",
            "--name=burst",
            f"--filename={disk.loop}",
            "--rw=randwrite",
            "--bs=4k",
            "--direct=1",
            "--ioengine=psync",
            "--size=128M",
            "--number_ios=25000",
            "--randrepeat=0",
            "--output=/dev/null",
        ],
        timeout=300,
    )
    wait_for(
        "the lost events noticed", lambda: "REPL-EVENTS-LOST" in machine.log() or "dropped" in machine.log(), timeout=60
    )
    assert "checksum resync (the kernel dropped" in machine.log()
    # The kernel's notices of dropped events keep coming while the trace pipe's backlog drains, each one a resync
    # again: the point waits until they stopped (it was cut in a moment of CONTINUOUS between two, and refused).
    seen = [-1, time.monotonic()]

    def quiet() -> bool:
        resyncs = machine.log().count("checksum resync")
        if resyncs != seen[0]:
            seen[:] = [resyncs, time.monotonic()]
        return time.monotonic() - seen[1] > 3.0

    wait_for("the dropped events' notices to stop", quiet, timeout=120)
    assert_identical_replica(lab, server, machine, disk)


def test_no_point_while_an_upgrade_switches_and_no_switch_while_a_point_is_cut(lab: Lab) -> None:
    """Issue 16: an upgrade never runs during a recovery point. The watcher's switch and restart take
    switch.lock exclusively: a point asked for meanwhile fails at once (REPL-POINT-FAILED) without freezing.
    A point holds it shared for its whole job: here its freeze hook (run with the lock held, before the freeze)
    keeps it going while the switch is tried, which waits and gives up (UPDATE-BUSY) until the point is cut."""
    from agent.errors import UpdateBusy
    from agent.host.paths import Paths
    from agent.update.state import version_switch

    server = lab.server(database=database())
    disk = lab.disk("d", 32 * MIB, ("ext4",))
    machine = lab.machine(server, "m1")
    lab.expose(machine, disk)
    protect(server, machine, disk)
    lab.start_agent(machine)
    lab.wait_state(machine, disk, "CONTINUOUS")
    paths = Paths(machine.root.resolve())

    with version_switch(paths, 5.0):
        r = machine.agent_cli("point", "--timeout", "60", timeout=90)
    assert r.returncode == 75 and "error REPL-POINT-FAILED:" in r.stderr and "switching versions" in r.stderr, r

    started, release = lab.workdir / "hook-started", lab.workdir / "hook-release"
    hook = paths.freeze_dir / "10-hold"
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = pre ] || exit 0\ntouch {started}\n'
        f"for _ in $(seq 300); do [ -e {release} ] && exit 0; sleep 0.1; done\nexit 1\n"
    )
    hook.chmod(0o755)
    point = subprocess.Popen(
        [sys.executable, "-m", "agent", "point", "--json", "--root", str(machine.root)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    lab.defer("point", lambda: point.kill() if point.poll() is None else None)
    wait_for("the point's freeze hook", started.exists, timeout=60)
    with pytest.raises(UpdateBusy), version_switch(paths, 1.0):
        pass
    release.touch()
    out, _ = point.communicate(timeout=120)
    assert point.returncode == 0 and json.loads(out)["consistency"] == "app-consistent", out
    with version_switch(paths, 5.0):  # the point is done: the switch goes ahead
        pass


def test_a_clean_stop_needs_no_resync_unless_the_tracing_it_kept_was_interrupted(lab: Lab) -> None:
    """A clean stop keeps the kernel tracing the disks: writes while the agent is down are found in its buffer and
    sent, with no checksum resync; if that tracing is gone when the agent starts again (removed here, as a reboot
    or another tool would), the disk is resynchronised. Either way the replica equals the disk."""
    from agent.host.paths import Paths
    from agent.replication.tracing import TRACEFS, instance_name, remove_instance

    server = lab.server(database=database())
    disk = lab.disk("raw", 64 * MIB, ())
    fill_raw(disk, 8 * MIB, seed=8)
    machine = lab.machine(server, "m1")
    lab.expose(machine, disk)
    protect(server, machine, disk)
    agent = lab.start_agent(machine)
    lab.wait_state(machine, disk, "CONTINUOUS")
    rng = random.Random(8)  # noqa: S311 - test data

    def write_while_down() -> None:
        fd = os.open(disk.loop, os.O_WRONLY)
        try:
            for _ in range(20):
                os.pwrite(fd, rng.randbytes(4096), rng.randrange(64 * MIB // 4096) * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)

    agent.terminate()
    assert agent.wait(timeout=30) == 0
    write_while_down()
    restarted = len(machine.log())
    lab.start_agent(machine)
    lab.wait_state(machine, disk, "CONTINUOUS")
    log = machine.log()[restarted:]
    assert "saw every write: no resync" in log and "checksum resync" not in log, log[-2000:]
    assert_identical_replica(lab, server, machine, disk)

    assert machine.agent is not None
    machine.agent.terminate()
    assert machine.agent.wait(timeout=30) == 0
    remove_instance(TRACEFS / "instances" / instance_name(Paths(machine.root.resolve()).state_dir))
    write_while_down()
    restarted = len(machine.log())
    lab.start_agent(machine)
    lab.wait_state(machine, disk, "CONTINUOUS")
    assert "checksum resync (the agent restarted and no tracing went on" in machine.log()[restarted:]
    assert_identical_replica(lab, server, machine, disk)


def test_sub_block_deltas_keep_a_raw_disk_identical_through_straddling_writes_partial_blocks_and_discards(
    lab: Lab,
) -> None:
    """Writes tracked at 4 KiB travel as deltas of their chunks: random rounds of 4 KiB writes across chunk edges
    (half in one chunk, half in the next), single sectors (part of a sub-block), whole sub-blocks and discards
    (BLKDISCARD: the loop device punches a hole, which reads as zeros), with the process server killed once in the
    middle of them. Each idle point fails over to an image equal to the disk byte for byte."""
    import fcntl
    import struct

    server = lab.server(database=database())
    size = 64 * MIB
    disk = lab.disk("raw", size, ())
    fill_raw(disk, 16 * MIB, seed=21)
    machine = lab.machine(server, "m1")
    lab.expose(machine, disk)
    protect(server, machine, disk)
    lab.start_agent(machine)
    lab.wait_state(machine, disk, "CONTINUOUS")
    rng = random.Random(21)  # noqa: S311 - test data
    chunk = 65536
    fd = os.open(disk.loop, os.O_RDWR)
    try:
        for round_ in range(4):
            for _ in range(300):
                kind = rng.random()
                if kind < 0.4:  # 4 KiB straddling a chunk edge
                    edge = rng.randrange(1, size // chunk) * chunk
                    os.pwrite(fd, rng.randbytes(4096), edge - 2048)
                elif kind < 0.7:  # one sector, inside a sub-block
                    os.pwrite(fd, rng.randbytes(512), rng.randrange(size // 512) * 512)
                elif kind < 0.9:  # a whole sub-block
                    os.pwrite(fd, rng.randbytes(4096), rng.randrange(size // 4096) * 4096)
                else:  # a discard of a few sub-blocks
                    start = rng.randrange(size // 4096 - 8) * 4096
                    fcntl.ioctl(fd, 0x1277, struct.pack("QQ", start, rng.randrange(1, 8) * 4096))  # BLKDISCARD
            os.fsync(fd)
            if round_ == 1:
                port = server.process_port  # the same again: the default (9444) may be another server's here
                os.kill(server.proc.pid, signal.SIGKILL)  # mid-stream: deltas in flight are sent again
                server.proc.wait(timeout=10)
                lab.restart(server, "--process-listen", f"127.0.0.1:{port}")
            assert_identical_replica(lab, server, machine, disk)
    finally:
        os.close(fd)
    log = machine.log()
    assert "checksum resync" not in log.split("in sync; continuous replication", 1)[1], log[-3000:]
