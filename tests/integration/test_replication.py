"""Replication end to end, for real: loop-device disks with ext4 and XFS, a real server (API + process server),
real `mobility run` daemons tracking writes through the kernel's block tracepoints, points cut with FIFREEZE,
failover images checked by fsck, read-only mounts and the records a writer process left. Fault tests: kill -9 of
the agent and of the process server, a cut link (a veth in a network namespace), a full process-server disk, a
flipped bit in the chunk store, and trace events lost to a tiny buffer."""

from __future__ import annotations

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

import pytest

from scripts.replication_lab import Disk, Lab, Machine, Server, read_disk, sh, umount, wait_for
from tests.conftest import REPO, require_root
from tests.integration import records

pytestmark = pytest.mark.integration

MIB = 1 << 20
CYCLES = int(os.environ.get("MOBILITY_RECORD_CYCLES", "30"))


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    require_root()
    with Lab(tmp_path / "lab") as lab:
        yield lab


def protect(server: Server, machine: Machine, *disks: Disk, policy: str = "manual") -> None:
    server.cli("policy", "set", policy, "--interval", "7d")
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


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def fsck(image: Path, fstype: str) -> subprocess.CompletedProcess[str]:
    cmd = ["e2fsck", "-f", "-n", str(image)] if fstype.startswith("ext") else ["xfs_repair", "-n", "-f", str(image)]
    return sh(cmd, check=False, timeout=300)


class Mounted:
    """A failed-over image, mounted read-only for reading records."""

    def __init__(self, image: Path, where: Path, fstype: str) -> None:
        self.where = where
        where.mkdir(parents=True, exist_ok=True)
        self.loop = sh(["losetup", "--find", "--show", "--read-only", str(image)]).stdout.strip()
        options = "ro,nouuid" if fstype == "xfs" else "ro"  # the source XFS is mounted with the same UUID
        r = sh(["mount", "-t", fstype, "-o", options, self.loop, str(where)], check=False)
        if r.returncode:
            sh(["losetup", "--detach", self.loop], check=False)
            raise AssertionError(f"read-only mount of {image} failed: {r.stderr}")

    def close(self) -> None:
        umount(self.where)
        sh(["losetup", "--detach", self.loop], check=False)


def boot(image: Path, where: Path, fstype: str) -> None:
    """What the failed-over machine does first: mount read-write once, replaying the journal (a frozen XFS
    leaves its log to replay; a frozen ext4 is clean already), and unmount."""
    where.mkdir(parents=True, exist_ok=True)
    options = "rw,nouuid" if fstype == "xfs" else "rw"
    sh(["mount", "-t", fstype, "-o", f"loop,{options}", str(image), str(where)])
    umount(where)


def failover_and_check(
    server: Server,
    machine: Machine,
    point: dict[str, object],
    disks: list[Disk],
    writes: list[records.Write],
    out: Path,
) -> list[str]:
    server.cli("failover", "--machine", machine.host_id, "--point", str(point["point_id"]), "--out", str(out))
    problems: list[str] = []
    mounted: list[Mounted] = []
    dirs: dict[int, Path] = {}
    try:
        index = 0
        for disk in disks:
            image = out / (disk.loop.removeprefix("/dev/") + ".img")
            for fstype in disk.fstypes:
                if fstype == "xfs":  # ext4 is checked as the point left it: a frozen ext4 needs no replay
                    boot(image, out / f"boot{index}", fstype)
                r = fsck(image, fstype)
                if r.returncode != 0:
                    problems.append(f"{disk.loop} ({fstype}): fsck: {r.stdout[-600:]} {r.stderr[-300:]}")
                m = Mounted(image, out / f"mnt{index}", fstype)
                mounted.append(m)
                dirs[index] = m.where
                index += 1
        problems += records.check(dirs, writes, float(point["frozen_at"]), float(point["thawed_at"]))  # type: ignore[arg-type]
    finally:
        for m in mounted:
            m.close()
        shutil.rmtree(out, ignore_errors=True)
    return problems


def test_failed_over_points_hold_exactly_the_records_written_before_them(lab: Lab) -> None:
    """A writer keeps writing records to ext4 and XFS on two protected disks; at random moments a point is cut;
    every point fails over to images that fsck finds clean, with every record acknowledged before the freeze, none
    started after the thaw, and every record intact. CYCLES times (MOBILITY_RECORD_CYCLES, 30 by default)."""
    server = lab.server()
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
    for cycle in range(CYCLES):
        time.sleep(rng.uniform(0.1, 1.2))
        point = machine.point()
        assert point["consistency"] == "crash-consistent", point
        freezes.append(point["freeze_ms"])
        assert writer.poll() is None, "the writer died"
        problems = failover_and_check(server, machine, point, [ext4, xfs], records.read_log(log), lab.workdir / "fo")
        assert not problems, f"cycle {cycle}: {problems[:10]}"
        if cycle % 10 == 9:
            r = server.cli(
                "test-failover", "--machine", machine.host_id, "--point", str(point["point_id"]), "--json", check=False
            )
            report = json.loads(r.stdout)
            assert r.returncode == 0 and report["ok"], report
    _stop(writer)
    assert len(records.read_log(log)) > 100 * CYCLES
    points = server.json("points", "--machine", machine.host_id)
    assert len(points) == CYCLES
    print(f"freeze windows (ms): median {sorted(freezes)[len(freezes) // 2]}, max {max(freezes)}")
