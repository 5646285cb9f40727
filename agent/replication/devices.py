"""Block devices on the source machine: resolving a protected disk's name, its size and partitions, the
filesystems whose writes reach it (mounted from the disk, a partition, or a device stacked on them: LVM, md),
reading it past every cache (O_DIRECT), and freezing its filesystems.

A disk's name comes from the server (input): it is resolved inside the agent's root (``Paths.resolve``) and must
be a block device node there. What the kernel knows about the device (sysfs, mountinfo) is the running kernel's."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import re
import stat
import struct
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.errors import DiskNotFound, DiskUnsupported
from agent.host.paths import Paths

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
SYS = Path("/sys")
_OCTAL = re.compile(r"\\([0-7]{3})")  # mountinfo escapes space, tab, newline and backslash in paths
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


# Filesystems on a disk, directly or through stacked devices ---------------------------------------------------------


@dataclass(frozen=True)
class BlockNode:
    """One block device as sysfs shows it: its number, the devices it is built on (``slaves``: device-mapper, md)
    and, for a partition, the disk it belongs to."""

    name: str  # kernel name: sda, sda2, dm-0, md127, md127p1
    dev: tuple[int, int]
    slaves: tuple[str, ...] = ()
    disk: str | None = None  # the whole disk of a partition


def read_block_tree(sys: Path = SYS) -> dict[str, BlockNode]:
    """Every block device of ``sys``/block with its partitions (the thin I/O shell of ``devices_above``)."""
    tree: dict[str, BlockNode] = {}
    try:
        entries = sorted((sys / "block").iterdir())
    except OSError:
        return tree
    for entry in entries:
        dev = _dev_of(entry)
        if dev is None:
            continue
        try:
            slaves = tuple(sorted(p.name for p in (entry / "slaves").iterdir()))
        except OSError:
            slaves = ()
        tree[entry.name] = BlockNode(entry.name, dev, slaves)
        try:
            subdirs = sorted(p for p in entry.iterdir() if (p / "partition").is_file())
        except OSError:
            subdirs = []
        for part in subdirs:
            pdev = _dev_of(part)
            if pdev is not None:
                tree[part.name] = BlockNode(part.name, pdev, disk=entry.name)
    return tree


def _dev_of(entry: Path) -> tuple[int, int] | None:
    try:
        major, minor = (int(x) for x in (entry / "dev").read_text().split(":"))
    except (OSError, ValueError):
        return None
    return major, minor


def devices_above(tree: dict[str, BlockNode], disk: str) -> set[tuple[int, int]]:
    """The numbers of ``disk``, its partitions and every device stacked on any of them, however deep (LVM over
    partitions of two disks, md over partitions, LVM over md, partitions of an md array): what a filesystem whose
    writes reach ``disk`` can be mounted from (pure)."""
    ours = {disk} if disk in tree else set()
    while True:
        grown = set(ours)
        for node in tree.values():
            if node.name in grown:
                continue
            if (node.disk is not None and node.disk in grown) or any(s in grown for s in node.slaves):
                grown.add(node.name)
        if grown == ours:
            return {tree[name].dev for name in ours}
        ours = grown


def mounts_on(
    devs: set[tuple[int, int]],
    mountinfo: str,
    source_dev: Callable[[str], tuple[int, int] | None] = lambda _: None,
) -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount of ``mountinfo`` from one of ``devs``, each filesystem once
    (pure: ``source_dev`` tells the device behind a mount's source for filesystems such as btrfs whose mountinfo
    shows an anonymous device)."""
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
            ours = source_dev(rfields[1]) in devs
        point = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
        if ours and fields[3] == "/" and point not in seen:  # a bind mount of a subtree freezes the same fs
            seen.add(point)
            found.append((point, rfields[0]))
    return found


def _source_dev(source: str) -> tuple[int, int] | None:
    try:
        st = os.stat(source)
    except OSError:
        return None
    return (os.major(st.st_rdev), os.minor(st.st_rdev)) if stat.S_ISBLK(st.st_mode) else None


def mounts_of(disk: BlockDevice, mountinfo: str, tree: dict[str, BlockNode] | None = None) -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every filesystem whose writes reach the disk: mounted from it, one of its
    partitions, or a device stacked on them (``/sys/block/*/slaves``)."""
    devs = devices_above(read_block_tree() if tree is None else tree, disk.kernel_name)
    devs |= {(disk.major, disk.minor)} | {(p.major, p.minor) for p in partitions(disk)}
    return mounts_on(devs, mountinfo, _source_dev)


class DirectReader:
    """Reads a disk with O_DIRECT into a page-aligned buffer: what is on the device, not a stale page cache of
    the block device (a filesystem's data writes bypass that cache). The buffer holds ``max_bytes`` (rounded up to
    the device's sector size): the largest read the caller makes, one whole chunk at least."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        try:
            self.size = device_size(self.fd)
            self.align = max(sector_size(self.fd), 512)
        except OSError:
            os.close(self.fd)
            raise
        self.capacity = -(-max(max_bytes, 1) // self.align) * self.align
        self.buf = mmap.mmap(-1, max(self.capacity, mmap.PAGESIZE))
        # Another thread may close it (a disk no longer replicated): never while a read is under way, and a closed
        # descriptor's number, which the kernel hands out again, is never read from.
        self._lock = threading.Lock()
        # A reader forgotten without close() (its thread ended) still lets go of the device.
        self._finalizer = weakref.finalize(self, os.close, self.fd)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def read(self, offset: int, length: int) -> memoryview:
        """``length`` bytes at ``offset`` (both chunk-aligned; the disk's tail is read to its end), as a view of
        the buffer that the next read overwrites."""
        want = -(-length // self.align) * self.align
        if want > self.capacity:
            # Never a silently shorter read into a buffer too small: that is a wrong size, not a short disk.
            raise ValueError(f"a read of {length} bytes into a buffer of {self.capacity}")
        with self._lock:
            if self.closed:
                raise OSError(errno.EBADF, "the disk's reader was closed")
            view = memoryview(self.buf)[:want]
            try:
                got = os.preadv(self.fd, [view], offset)
            finally:
                view.release()
        if got < length:
            raise OSError(5, f"short read at {offset}: {got} of {length} bytes")
        return memoryview(self.buf)[:length]

    def close(self) -> None:
        with self._lock:
            self._finalizer()  # closes the descriptor, once (a second call does nothing)
        with contextlib.suppress(BufferError):  # a view still held: the buffer goes with its last view
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


def full_priority() -> None:
    """This thread at the normal CPU and I/O priority (nice 0, ionice -c2 -n4), for a point's freeze: the applications
    of the frozen filesystems wait for what runs then, and a capture at nice 10 on a busy machine waits behind the
    rest of it (root may raise a priority; elsewhere it stays as it is)."""
    lower_priority(0, 4)


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
