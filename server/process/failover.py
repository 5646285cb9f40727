"""Failover from a recovery point: materialise its disk images from the chunk store (every chunk's hash checked,
the root hash recomputed), verify a point without writing anything, and test a failover in a scratch area: attach
each image, let every filesystem replay its journal as a booting machine would, fsck it (``-n``: nothing is
repaired), mount it read-only, and report."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.faults import fault_point
from agent.replication.chunks import RootHasher, zero_hash
from agent.shared.replication_wire import HASH_SIZE
from server.errors import FailoverOutExists, FailoverToolMissing, PointCorrupt
from server.process.cleanup import release, remove_area
from server.process.commands import run_tool
from server.process.interrupts import signals_held
from server.process.store import ChunkStore, Point, PointDisk
from server.progress import Progress, Quiet

_WINDOW = 64  # chunks read ahead by the pool


_PARTIAL = re.compile(r"\..+\.img\.partial")  # an image being written: hidden, and never taken for a disk image


def image_names(disks: Sequence[str]) -> dict[str, str]:
    """The file each disk's image gets: /dev/sdb -> sdb.img, /dev/disk/by-id/x -> disk_by-id_x.img. Disks whose names
    would give one file (/dev/a_b and /dev/a/b) each get a hash of their own name in it too, so that every disk of a
    point has its image (pure)."""
    plain = {d: d.removeprefix("/dev/").replace("/", "_") for d in disks}
    shared = {name for name in plain.values() if list(plain.values()).count(name) > 1}
    names = {d: (f"{n}-{hashlib.sha256(d.encode()).hexdigest()[:12]}" if n in shared else n) for d, n in plain.items()}
    if len(set(names.values())) < len(names):  # a name chosen to meet another's hash: number them all
        names = {d: f"{i:02d}-{n}" for i, (d, n) in enumerate(names.items())}
    return {d: n + ".img" for d, n in names.items()}


def _chunks(store: ChunkStore, disk: PointDisk, manifest: bytes) -> Iterator[tuple[int, bytes | None]]:
    """(index, data) of every chunk in order, None for zero chunks; read and verified two at a time."""
    g = disk.geometry

    def load(i: int) -> bytes | None:
        digest = manifest[i * HASH_SIZE : (i + 1) * HASH_SIZE]
        if digest == zero_hash(g.length(i)):
            return None
        try:
            return store.read(digest, g.length(i))
        except PointCorrupt as e:
            raise PointCorrupt(f"{disk.disk}, chunk {i} (offset {g.offset(i)}): {e.message}") from e

    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = []
        for i in range(g.count):
            pending.append((i, pool.submit(load, i)))
            if len(pending) >= _WINDOW:
                j, fut = pending.pop(0)
                yield j, fut.result()
        for j, fut in pending:
            yield j, fut.result()


def _check_root(disk: PointDisk, manifest: bytes) -> None:
    root = RootHasher(disk.geometry)
    root.update(manifest)
    if root.hexdigest() != disk.root:
        raise PointCorrupt(f"{disk.disk}: the manifest's root hash is not the point's")


def verify_point(store: ChunkStore, point: Point, progress: Progress | None = None) -> dict[str, Any]:
    """Recompute each disk's root hash from the store: every chunk read and hashed (PointCorrupt on the first
    that does not match, naming the disk and chunk)."""
    progress = progress or Quiet()
    disks = []
    for disk in point.disks:
        manifest = store.manifest(disk)
        _check_root(disk, manifest)
        progress.task(f"verifying {disk.disk}", disk.size)
        stored = 0
        for i, data in _chunks(store, disk, manifest):
            stored += data is not None
            progress.advance(disk.geometry.length(i))
        disks.append({"disk": disk.disk, "root": disk.root, "chunks": disk.geometry.count, "stored_chunks": stored})
    return {"point_id": point.point_id, "ok": True, "disks": disks}


def materialise(store: ChunkStore, point: Point, out: Path, progress: Progress | None = None) -> list[Path]:
    """Write the point's disk images into ``out`` (new or empty): sparse where the disk was zero. Each is written
    under a hidden temporary name and fsynced; only when every one is whole and verified do they get their names, so
    an image that looks usable is one. On any error (a corrupt chunk, a full disk, a signal) nothing is left.
    ``progress`` hears each disk and the bytes of it written (a terminal's bar: server/progress.py)."""
    progress = progress or Quiet()
    out.mkdir(parents=True, exist_ok=True)
    with _writing_into(out):
        names = image_names([d.disk for d in point.disks])
        written: list[tuple[Path, Path]] = []
        try:
            for disk in point.disks:
                manifest = store.manifest(disk)
                _check_root(disk, manifest)
                final = out / names[disk.disk]
                partial = out / f".{final.name}.partial"
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                written.append((partial, final))
                try:
                    os.ftruncate(fd, disk.size)
                    progress.task(f"{disk.disk} -> {final.name}", disk.size)
                    for i, data in _chunks(store, disk, manifest):
                        if data is not None:
                            os.pwrite(fd, data, disk.geometry.offset(i))
                        progress.advance(disk.geometry.length(i))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                fault_point("failover.step", step="written", disk=disk.disk)
            for partial, final in written:
                os.rename(partial, final)
            _fsync_dir(out)
        except BaseException:
            with signals_held():
                for partial, final in written:
                    partial.unlink(missing_ok=True)
                    final.unlink(missing_ok=True)
            raise
    return [final for _, final in written]


@contextlib.contextmanager
def _writing_into(out: Path) -> Iterator[None]:
    """``out`` to ourselves (a lock on it: two failovers never write into one directory), empty but for the hidden
    partial images a failover killed outright left (removed here)."""
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise FailoverOutExists(f"another failover is writing into {out}") from e
        for entry in os.scandir(out):
            if _PARTIAL.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
        if any(out.iterdir()):
            raise FailoverOutExists(f"{out} is not empty")
        yield
    finally:
        os.close(fd)  # the lock goes with it


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Test failover -----------------------------------------------------------------------------------------------------


@dataclass
class FsResult:
    device: str
    fstype: str
    fsck: str  # clean, errors, skipped
    mount: str  # ok, failed, skipped
    detail: str = ""
    entries: int = 0  # names in the filesystem's root directory, read through the read-only mount


@dataclass
class DiskResult:
    disk: str
    image: str
    root_hash: str = "ok"
    filesystems: list[FsResult] = field(default_factory=list)


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise FailoverToolMissing(f"test-failover needs {', '.join(missing)}")


def run_test_failover(
    store: ChunkStore,
    point: Point,
    scratch: Path,
    *,
    keep: bool = False,
    inspect: Callable[[str, Path], None] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Materialise the point in ``scratch``, then check each filesystem: fsck -n, read-only mount. ``inspect`` is
    called with (disk, mount point) while each filesystem is mounted. However it ends (an error, a signal raised as
    FailoverInterrupted), every loop device and mount it made is released, and the area removed unless ``keep``."""
    _need("losetup", "blkid", "mount", "umount")
    area = scratch / f"{point.point_id}-{uuid.uuid4().hex[:8]}"
    results: list[DiskResult] = []
    left: list[str] = []
    try:
        try:
            images = materialise(store, point, area / "images", progress)
        except PointCorrupt as e:
            return {"point_id": point.point_id, "ok": False, "error": e.id, "message": e.message, "disks": []}
        for disk, image in zip(point.disks, images, strict=True):
            result = DiskResult(disk.disk, str(image))
            results.append(result)
            try:
                with _attached(image, area) as devices:
                    fault_point("failover.step", step="attached", disk=disk.disk)
                    for device in devices:
                        result.filesystems.append(_check_fs(device, area, disk.disk, inspect))
            except _AttachFailed as e:
                result.filesystems.append(FsResult(str(image), "-", "skipped", "failed", str(e)))
    finally:
        left = release(area)
        if not keep:
            remove_area(area)
    ok = (
        not left
        and bool(results)
        and all(
            fs.fsck in ("clean", "skipped") and fs.mount in ("ok", "skipped") for r in results for fs in r.filesystems
        )
    )
    return {
        "point_id": point.point_id,
        "ok": ok,
        "consistency": point.consistency,
        "left_behind": left,
        "scratch": str(area) if keep else None,
        "disks": [
            {
                "disk": r.disk,
                "image": r.image,
                "root_hash": r.root_hash,
                "filesystems": [fs.__dict__ for fs in r.filesystems],
            }
            for r in results
        ],
    }


class _AttachFailed(Exception):
    pass


@contextlib.contextmanager
def _attached(image: Path, area: Path) -> Iterator[list[str]]:
    """A loop device for ``image`` (a scratch copy: a journal may be replayed into it) and device nodes (in
    ``area``) for it and its partitions."""
    r = run_tool(["losetup", "--find", "--show", str(image)], timeout=30)
    loop = r.stdout.strip()
    if r.returncode != 0 or not loop.startswith("/dev/loop"):
        raise _AttachFailed("losetup: " + _tail(r.stderr or r.stdout))
    nodes: list[Path] = []
    try:
        name = Path(loop).name
        run_tool(["partx", "--add", loop], timeout=30)
        devices = [loop]
        sysfs = Path("/sys/block") / name
        for part in sorted(sysfs.glob(f"{name}p*")):
            dev = Path(f"/dev/{part.name}")
            if not dev.exists():  # no udev here: make the node ourselves, in the scratch area
                major, minor = (int(x) for x in (part / "dev").read_text().split(":"))
                dev = area / part.name
                os.mknod(dev, 0o600 | stat.S_IFBLK, os.makedev(major, minor))
                nodes.append(dev)
            devices.append(str(dev))
        yield devices
    finally:
        run_tool(["partx", "--delete", loop], timeout=30)
        run_tool(["losetup", "--detach", loop], timeout=30)
        for node in nodes:
            node.unlink(missing_ok=True)


def _fstype(device: str) -> str:
    r = run_tool(["blkid", "--probe", "-o", "value", "-s", "TYPE", device], timeout=30)
    return r.stdout.strip()


_FSCK: dict[str, list[str]] = {
    "ext2": ["e2fsck", "-f", "-n"],
    "ext3": ["e2fsck", "-f", "-n"],
    "ext4": ["e2fsck", "-f", "-n"],
    "xfs": ["xfs_repair", "-n"],
    "btrfs": ["btrfs", "check", "--readonly"],
}


def _check_fs(device: str, area: Path, disk: str, inspect: Callable[[str, Path], None] | None) -> FsResult:
    """What the failed-over machine would do at boot, on the scratch copy: mount read-write once (a journaling
    filesystem replays its log: a frozen XFS leaves one to replay, a frozen ext4 is clean) and unmount; then check
    with fsck -n (nothing repaired) and mount read-only."""
    fstype = _fstype(device)
    if not fstype or fstype in ("swap", "LVM2_member", "linux_raid_member", "crypto_LUKS"):
        return FsResult(device, fstype or "none", "skipped", "skipped", "no filesystem to check")
    point = area / f"mnt-{Path(device).name}"
    point.mkdir(parents=True, exist_ok=True)
    # nouuid: an XFS image and its source (or two points of it) share a UUID, which XFS otherwise refuses.
    extra = ",nouuid" if fstype == "xfs" else ""
    r = run_tool(["mount", "-t", fstype, "-o", "rw" + extra, device, str(point)], timeout=300)
    if r.returncode != 0:
        return FsResult(device, fstype, "skipped", "failed", "journal replay mount: " + _tail(r.stderr))
    try:
        fault_point("failover.step", step="mounted", disk=disk)
    finally:
        run_tool(["umount", str(point)], timeout=120)
    fsck = _FSCK.get(fstype)
    if fsck is None or shutil.which(fsck[0]) is None:
        state, detail = "skipped", f"no checker for {fstype} here"
    else:
        r = run_tool([*fsck, device], timeout=600)
        fault_point("failover.step", step="checked", disk=disk)
        state = "clean" if r.returncode == 0 else "errors"
        detail = "" if r.returncode == 0 else _tail(r.stdout + r.stderr)
    r = run_tool(["mount", "-t", fstype, "-o", "ro" + extra, device, str(point)], timeout=120)
    if r.returncode != 0:
        return FsResult(device, fstype, state, "failed", (detail + " " + _tail(r.stderr)).strip())
    try:
        fault_point("failover.step", step="mounted-ro", disk=disk)
        entries = len(os.listdir(point))
        if inspect is not None:
            inspect(disk, point)
    finally:
        run_tool(["umount", str(point)], timeout=120)
    return FsResult(device, fstype, state, "ok", detail, entries)


def _tail(text: str, size: int = 400) -> str:
    return re.sub(r"\s+", " ", text.strip())[-size:]
