"""Block devices on the source machine: resolving a protected disk's name, its size and partitions, the
filesystems mounted from it, reading it past every cache (O_DIRECT), and freezing its filesystems.

A disk's name comes from the server (input): it is resolved inside the agent's root (``Paths.resolve``) and must
be a block device node there. What the kernel knows about the device (sysfs, mountinfo) is the running kernel's."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from agent.errors import DiskNotFound, DiskUnsupported
from agent.paths import Paths

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
SYS = Path("/sys")
_SKIP = ("loop", "ram", "zram", "sr", "fd", "dm-", "md", "nbd", "nullb")  # not whole disks of the machine


@dataclass(frozen=True)
class BlockDevice:
    name: str  # as protected, e.g. /dev/sdb
    path: Path  # the device node (inside --root)
    major: int
    minor: int
    kernel_name: str  # sdb

    @property
    def sysfs(self) -> Path:
        return SYS / "block" / self.kernel_name


@dataclass(frozen=True)
class Partition:
    major: int
    minor: int
    start_sector: int


def resolve_disk(paths: Paths, name: str) -> BlockDevice:
    """The whole disk behind ``name`` (DiskNotFound, or DiskUnsupported for what cannot be tracked)."""
    node = paths.resolve(name)
    try:
        st = os.stat(node)
    except OSError as e:
        raise DiskNotFound(f"{name}: {e.strerror}") from e
    if not stat.S_ISBLK(st.st_mode):
        raise DiskNotFound(f"{name} is not a block device")
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    sysdir = SYS / "dev" / "block" / f"{major}:{minor}"
    if not sysdir.exists():
        raise DiskNotFound(f"{name} ({major}:{minor}) is not known to the kernel")
    if (sysdir / "partition").exists():
        raise DiskUnsupported(f"{name} is a partition; protect its disk")
    kernel_name = sysdir.resolve().name
    if not (SYS / "block" / kernel_name / "mq").is_dir():
        raise DiskUnsupported(f"{name} ({kernel_name}) is not a request-based (blk-mq) device")
    return BlockDevice(name, node, major, minor, kernel_name)


def partitions(disk: BlockDevice) -> list[Partition]:
    found = []
    for entry in sorted(disk.sysfs.glob(f"{disk.kernel_name}*")):
        try:
            major, minor = (int(x) for x in (entry / "dev").read_text().split(":"))
            found.append(Partition(major, minor, int((entry / "start").read_text())))
        except (OSError, ValueError):
            continue
    return found


def all_disks() -> list[str]:
    """The machine's whole disks, for --all-disks: every blk-mq disk in /sys/block that is not virtual."""
    names = []
    for entry in sorted((SYS / "block").iterdir()):
        if entry.name.startswith(_SKIP) or not (entry / "mq").is_dir():
            continue
        try:
            if int((entry / "size").read_text()) > 0:
                names.append(f"/dev/{entry.name}")
        except (OSError, ValueError):
            continue
    return names


def device_size(fd: int) -> int:
    buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    return int(struct.unpack("<Q", buf)[0])


def sector_size(fd: int) -> int:
    buf = fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4)
    return int(struct.unpack("<i", buf)[0])


def mounts_of(disk: BlockDevice, mountinfo: str) -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount from the disk or one of its partitions (pure but for a
    stat of each mount's source, for filesystems such as btrfs whose mountinfo shows an anonymous device)."""
    devs = {(disk.major, disk.minor)} | {(p.major, p.minor) for p in partitions(disk)}
    found: list[tuple[str, str]] = []
    seen: set[str] = set()
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 2:
            continue
        major, _, minor = fields[2].partition(":")
        ours = major.isdigit() and minor.isdigit() and (int(major), int(minor)) in devs
        if not ours and rfields[1].startswith("/"):
            try:
                st = os.stat(rfields[1])
                ours = stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) in devs
            except OSError:
                ours = False
        point = fields[4].replace("\\040", " ")
        if ours and fields[3] == "/" and point not in seen:  # a bind mount of a subtree freezes the same fs
            seen.add(point)
            found.append((point, rfields[0]))
    return found


class DirectReader:
    """Reads a disk with O_DIRECT into a page-aligned buffer: what is on the device, not a stale page cache of
    the block device (a filesystem's data writes bypass that cache)."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        self.size = device_size(self.fd)
        self.align = max(sector_size(self.fd), 512)
        self.buf = mmap.mmap(-1, max(max_bytes, mmap.PAGESIZE))

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (both chunk-aligned; the disk's tail is read to its end)."""
        want = -(-length // self.align) * self.align
        view = memoryview(self.buf)[:want]
        try:
            got = os.preadv(self.fd, [view], offset)
        finally:
            view.release()
        if got < length:
            raise OSError(5, f"short read at {offset}: {got} of {length} bytes")
        return self.buf[:length]

    def close(self) -> None:
        os.close(self.fd)
        self.buf.close()


def freeze(mount_point: str) -> int:
    """FIFREEZE the filesystem at ``mount_point``; returns the open descriptor that thaws it."""
    fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
    except OSError:
        os.close(fd)
        raise
    return fd


def thaw(fd: int) -> None:
    """FITHAW through the descriptor ``freeze`` returned (EINVAL: already thawed), then close it."""
    try:
        fcntl.ioctl(fd, FITHAW, 0)
    except OSError as e:
        if e.errno != 22:
            raise
    finally:
        os.close(fd)


# Priorities: replication yields to the machine's own work ---------------------------------------------------------

_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS_BE = 2
_SYS_IOPRIO_SET = 251  # x86_64


def lower_priority(nice: int = 10, io_level: int = 7) -> None:
    """This thread at a lower CPU priority (nice) and the lowest best-effort I/O priority (ionice -c2 -n7)."""
    tid = _native_thread_id()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall(_SYS_IOPRIO_SET, _IOPRIO_WHO_PROCESS, tid, (_IOPRIO_CLASS_BE << 13) | io_level)


def _native_thread_id() -> int:
    import threading

    return threading.get_native_id()


class BusyMeter:
    """How much of the machine's CPU the rest of the machine uses (everything but this process), over the last
    interval, from /proc/stat and /proc/self/stat. Replication backs off when that is high: its own use never
    counts as "busy" (pressure stall figures would count its own threads waiting for each other)."""

    def __init__(self) -> None:
        self._last: tuple[int, int, int] | None = None
        self.others = 0.0

    @staticmethod
    def _sample() -> tuple[int, int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        total = sum(fields[:8])
        idle = fields[3] + fields[4]
        with open("/proc/self/stat") as f:
            ours = f.read().rsplit(")", 1)[1].split()
        mine = int(ours[11]) + int(ours[12])  # utime + stime, every thread of this process
        return total, total - idle, mine

    def update(self) -> float:
        """The share (0-1) of all CPU time the others used since the last call."""
        try:
            now = self._sample()
        except (OSError, ValueError, IndexError):
            return self.others
        if self._last is not None:
            total = now[0] - self._last[0]
            if total > 0:
                self.others = max(0.0, (now[1] - self._last[1]) - (now[2] - self._last[2])) / total
        self._last = now
        return self.others
