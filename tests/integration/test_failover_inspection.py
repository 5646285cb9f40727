"""A point's filesystems are read in a throwaway VM, never in the server's kernel: a real server, points made of
image files through the agent's stream client, `test-failover` and `failover` as an operator runs them. A crafted
superblock fails its test failover with TEST-FAILOVER-FAILED while strace sees no mount and no loop device in the
whole process tree (the appliance's QEMU included), and the server serves on; the test reads files through the same
VM the product uses; a point with no machine in it does not boot (FAILOVER-NOT-BOOTABLE); `failover` writes raw,
qcow2, VMDK and fixed VHD images equal to the point and marks the machine's root (read back with debugfs, which
reads an image without mounting it)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.host.paths import Paths
from agent.shared.failover_mark import MARK_FILE, FailoverMark
from server.process.inspection import Reader
from server.process.store import ChunkStore
from server.process.testfailover import run_test_failover
from tests import faults
from tests.conftest import REPO, require_root
from tests.integration.points import point_of_images, register
from tests.integration.serverproc import ServerProcess, start_server

pytestmark = pytest.mark.integration

MIB = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    require_root()
    s = start_server(tmp_path_factory.mktemp("inspection") / "data", heartbeat_interval=2.0)
    yield s
    s.stop()


def cli(server: ServerProcess, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", *args, "--data", str(server.data)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=1200,
        check=False,
        env=env,
    )


def ext4(path: Path, size: int, files: dict[str, str], *options: str) -> Path:
    content = path.with_suffix(".content")
    for name, text in files.items():
        (content / name).parent.mkdir(parents=True, exist_ok=True)
        (content / name).write_text(text)
    content.mkdir(exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", *options, "-d", str(content), str(path)], check=True, timeout=60)
    return path


def crafted(path: Path) -> Path:
    """An ext4 whose superblock says its blocks are 2^110 bytes: still ext4 to blkid, refused by the kernel that
    would mount it (no metadata checksum to give it away)."""
    ext4(path, 16 * MIB, {"secret": "x"}, "-O", "^metadata_csum")
    with path.open("r+b") as f:
        f.seek(1024 + 0x18)  # s_log_block_size
        f.write(struct.pack("<I", 100))
    return path


def traced(server: ServerProcess, log: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The command under strace: every mount-family call and every open in its whole tree (children, the
    appliance's QEMU included), filtered in the kernel (seccomp-bpf) so that the VM runs at speed."""
    calls = "mount,umount2,fsopen,fsmount,move_mount,open_tree,fsconfig,mount_setattr,open,openat,openat2,ioctl"
    argv = ["strace", "-f", "--seccomp-bpf", "-qq", "-o", str(log), "-e", f"trace={calls}"]
    return subprocess.run(
        [*argv, sys.executable, "-m", "server", *args, "--data", str(server.data)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=1200,
        check=False,
    )


def loops_and_mounts(where: Path) -> list[str]:
    found = [
        line
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if str(where) in line or "/process/scratch" in line
    ]
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            name = backing.read_text()
        except OSError:
            continue
        if str(where) in name:
            found.append(f"{backing.parent.parent.name}: {name.strip()}")
    return found


@pytest.fixture(scope="module")
def crafted_point(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> tuple[Paths, str, str, Path]:
    work = tmp_path_factory.mktemp("crafted")
    paths, host_id = register(server, work, "m1", ["/dev/sdb", "/dev/sdc"])
    good = ext4(work / "good.img", 24 * MIB, {"records/hello.txt": "written before the point\n"})
    bad = crafted(work / "bad.img")
    point_id = point_of_images(server, paths, {"/dev/sdb": good, "/dev/sdc": bad})
    return paths, host_id, point_id, work


def test_a_crafted_filesystem_fails_its_test_failover_and_never_reaches_the_servers_kernel(
    server: ServerProcess, crafted_point: tuple[Paths, str, str, Path]
) -> None:
    paths, host_id, point_id, work = crafted_point
    log = work / "strace.log"
    r = traced(server, log, "test-failover", "--machine", host_id, "--point", point_id, "--json")
    assert r.returncode == 1 and "error TEST-FAILOVER-FAILED:" in r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    report, _ = json.JSONDecoder().raw_decode(r.stdout)
    by_disk = {d["disk"]: d["filesystems"] for d in report["disks"]}
    (good,) = by_disk["/dev/sdb"]
    (bad,) = by_disk["/dev/sdc"]
    assert (good["fstype"], good["replay"], good["fsck"], good["mount"]) == ("ext4", "ok", "clean", "ok"), good
    assert good["entries"] == 2  # lost+found and records
    assert (bad["fstype"], bad["replay"], bad["mount"]) == ("ext4", "failed", "failed"), bad
    assert "journal replay mount" in bad["detail"]
    assert [s["step"] for s in report["steps"]] == ["materialise", "inspect"]
    assert report["left_behind"] == [] and report["mode"] == "inspect"

    # Nothing of the point ever reached the server's kernel: no mount call, no loop device opened, by any process
    # of the command (strace followed every one of them, the appliance's QEMU too).
    trace = log.read_text()
    assert "guestfish" in trace or "qemu" in trace, "strace did not follow the command's children"
    lines = trace.splitlines()
    mounts = [ln for ln in lines if any(f" {c}(" in ln for c in ("mount", "fsmount", "move_mount"))]
    # A loop device is attached through /dev/loop-control and LOOP_SET_FD or LOOP_CONFIGURE on an open loop device
    # (mke2fs, building the appliance, only looks whether a device's backing file is its target: read-only).
    loops = [ln for ln in lines if '"/dev/loop-control"' in ln or "LOOP_SET_FD" in ln or "LOOP_CONFIGURE" in ln]
    loops += [ln for ln in lines if '"/dev/loop' in ln and ("O_RDWR" in ln or "O_WRONLY" in ln)]
    assert not mounts and not loops, (mounts + loops)[:10]
    assert loops_and_mounts(server.data) == []

    # The server serves on, its store untouched: the point verifies, and the machine cuts another.
    r = cli(server, "verify", "--point", point_id)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr
    assert server.proc.poll() is None
    small = work / "small.img"
    small.write_bytes(os.urandom(MIB))
    assert point_of_images(server, paths, {"/dev/sdb": small})


def test_files_are_read_through_the_appliance_and_a_point_with_no_machine_does_not_boot(
    server: ServerProcess, crafted_point: tuple[Paths, str, str, Path]
) -> None:
    _, host_id, point_id, work = crafted_point
    read: dict[str, bytes] = {}

    def inspect(disk: str, device: str, reader: Reader) -> None:
        if reader.exists("/records/hello.txt"):
            read[disk] = reader.read("/records/hello.txt")

    store = ChunkStore(server.data / "process")
    try:
        report = run_test_failover(
            store, store.resolve_point(host_id, point_id), work / "scratch", inspect=inspect, wait=600
        )
    finally:
        store.close()
    assert read == {"/dev/sdb": b"written before the point\n"}, report
    assert not report["ok"] and report["left_behind"] == []
    assert sorted(p.name for p in (work / "scratch").iterdir()) == [".lock"]  # its area removed

    r = cli(server, "test-failover", "--machine", host_id, "--point", point_id, "--boot", "--json")
    assert r.returncode == 1 and "error FAILOVER-NOT-BOOTABLE:" in r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    report, _ = json.JSONDecoder().raw_decode(r.stdout)
    assert report["error"] == "FAILOVER-NOT-BOOTABLE" and "os-release" in report["message"]
    assert [(s["step"], s["ok"]) for s in report["steps"]] == [("materialise", True), ("prepare", False)]
    jobs = [j for j in server.jobs() if j["kind"] == "test-failover" and j["error_id"] == "FAILOVER-NOT-BOOTABLE"]
    assert len(jobs) == 1 and "prepare FAILED" in str(jobs[0]["detail"]), jobs


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True, timeout=300)


def as_raw(image: Path, fmt: str, dest: Path) -> bytes:
    qemu_img("convert", "-f", fmt, "-O", "raw", str(image), str(dest))
    return dest.read_bytes()


def test_failover_writes_images_a_hypervisor_boots_and_marks_the_machines_root(
    server: ServerProcess, tmp_path: Path
) -> None:
    paths, host_id = register(server, tmp_path, "m2", ["/dev/sda", "/dev/sdb"])
    root = ext4(
        tmp_path / "root.img",
        32 * MIB,
        {"etc/os-release": 'ID=debian\nVERSION_ID="12"\n', "etc/fstab": "/dev/sda / ext4 defaults 0 1\n"},
    )
    data = tmp_path / "data.img"
    data.write_bytes(os.urandom(3 * MIB) + bytes(MIB) + os.urandom(MIB))
    point_id = point_of_images(server, paths, {"/dev/sda": root, "/dev/sdb": data})
    argv = ("failover", "--machine", host_id, "--point", point_id)

    # qcow2, marked: the data disk is the point's, byte for byte; the root holds the mark.
    out = tmp_path / "qcow2"
    r = cli(server, *argv, "--out", str(out), "--format", "qcow2", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert sorted(p.name for p in out.iterdir()) == ["point.json", "sda.qcow2", "sdb.qcow2"]
    assert doc["mark"]["marked"] and doc["mark"]["filesystem"] == "/dev/sda" and doc["mark"]["file"] == MARK_FILE
    assert doc["mark"]["smbios"] == f"mobility-failover:v1:failover:{host_id}:{point_id}"
    assert json.loads(qemu_img("info", "--output=json", str(out / "sdb.qcow2")).stdout)["format"] == "qcow2"
    assert as_raw(out / "sdb.qcow2", "qcow2", tmp_path / "sdb.raw") == data.read_bytes()
    marked_root = tmp_path / "sda.raw"
    as_raw(out / "sda.qcow2", "qcow2", marked_root)
    shown = subprocess.run(
        ["debugfs", "-R", f"cat {MARK_FILE}", str(marked_root)], capture_output=True, check=True, timeout=60
    )
    mark = FailoverMark.from_file_text(shown.stdout)
    assert (mark.kind, mark.host_id, mark.point_id) == ("failover", host_id, point_id)
    fsck = subprocess.run(["e2fsck", "-f", "-n", str(marked_root)], capture_output=True, check=False, timeout=60)
    assert fsck.returncode == 0, fsck.stdout

    # VHD (fixed: the disk's bytes, then a 512-byte footer) and VMDK, unmarked: the point exactly.
    for fmt, info_format, ext in (("vhd", "vpc", "vhd"), ("vmdk", "vmdk", "vmdk")):
        out = tmp_path / fmt
        r = cli(server, *argv, "--out", str(out), "--format", fmt, "--no-mark")
        assert r.returncode == 0 and "not marked (--no-mark)" in r.stdout, r.stderr
        # A fixed VHD's footer is at its end only: qemu-img reads it as one when told (probing finds raw).
        info = json.loads(qemu_img("info", "-f", info_format, "--output=json", str(out / f"sdb.{ext}")).stdout)
        assert (info["format"], info["virtual-size"]) == (info_format, data.stat().st_size), info
        assert as_raw(out / f"sdb.{ext}", info_format, tmp_path / f"{fmt}.raw") == data.read_bytes()
        assert as_raw(out / f"sda.{ext}", info_format, tmp_path / f"{fmt}-a.raw") == root.read_bytes()
    assert (tmp_path / "vhd" / "sdb.vhd").stat().st_size == data.stat().st_size + 512

    # A conversion that fails (its disk full: room for the raw images, not for a converted one beside them):
    # IO-FAILED naming qemu-img, and no image is left, a raw one included.
    raw = tmp_path / "raw"
    r = cli(server, *argv, "--out", str(raw), "--no-mark")
    assert r.returncode == 0 and (raw / "sdb.img").read_bytes() == data.read_bytes(), r.stderr
    small = tmp_path / "small"
    small.mkdir()
    room = sum(p.stat().st_blocks * 512 for p in raw.glob("*.img")) + MIB // 2
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room}", "tmpfs", str(small)], check=True, timeout=30)
    try:
        r = cli(server, *argv, "--out", str(small / "out"), "--format", "qcow2", "--no-mark")
        assert (r.returncode, r.stderr.split(":")[0]) == (1, "error IO-FAILED"), r.stderr
        assert "qemu-img could not write" in r.stderr, r.stderr
        assert sorted(p.name for p in (small / "out").iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True, timeout=30)

    # Stopped while converting: no image is left, a converted one included.
    out = tmp_path / "stopped"
    env = faults.environment(signal_at={"failover.step": {"step": "converted", "disk": "sda.qcow2"}}, signum=15)
    r = cli(server, *argv, "--out", str(out), "--format", "qcow2", "--no-mark", env=env)
    assert (r.returncode, r.stderr.split(":")[0]) == (75, "error FAILOVER-INTERRUPTED"), r.stderr
    assert sorted(p.name for p in out.iterdir()) == []
