"""What the server does inside a point's images, always through the appliance (server/process/appliance.py): check
every filesystem as a booting machine would (journal replay, ``fsck -n``, a read-only mount), find the machine's
root filesystem, and write into it (the test failover's check runner into a scratch copy; the failover mark into a
failover's images)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.faults import fault_point
from server.process.appliance import DEVICE, Appliance, ApplianceError

# The checkers, run inside the appliance with the options that change nothing (libguestfs's own e2fsck cannot -n).
CHECKERS: dict[str, str] = {
    "ext2": "e2fsck -f -n",
    "ext3": "e2fsck -f -n",
    "ext4": "e2fsck -f -n",
    "xfs": "xfs_repair -n",
    "btrfs": "btrfs check --readonly",
}
NOT_A_FILESYSTEM = ("", "unknown", "swap", "LVM2_member", "linux_raid_member", "crypto_LUKS")
_DETAIL = 400
_PARTITION = re.compile(r"(/dev/(?:sd|vd|hd)[a-z]+)[0-9]+")
_RC = re.compile(r"^rc=(\d+)$", re.M)


@dataclass
class FsResult:
    device: str
    fstype: str
    replay: str  # ok, failed, skipped: the read-write mount that replays a journal
    fsck: str  # clean, errors, skipped
    mount: str  # ok, failed, skipped: the read-only mount
    detail: str = ""
    entries: int = 0  # names in the filesystem's root directory

    @property
    def ok(self) -> bool:
        return self.fsck in ("clean", "skipped") and self.mount in ("ok", "skipped") and self.replay != "failed"


class Reader:
    """A filesystem mounted read-only in the appliance, for the ``inspect`` hook: files read through the VM."""

    def __init__(self, appliance: Appliance, workdir: Path) -> None:
        self._appliance = appliance
        self._workdir = workdir

    def read(self, path: str, limit: int = 1 << 20) -> bytes:
        size = int(self._appliance.call("filesize", path).strip() or "0")
        if size > limit:
            raise ApplianceError(f"{path} holds {size} bytes, more than {limit}")
        local = self._workdir / "read.tmp"
        local.unlink(missing_ok=True)
        self._appliance.call("download", path, str(local))
        try:
            with local.open("rb") as f:
                return f.read(limit)
        finally:
            local.unlink(missing_ok=True)

    def exists(self, path: str) -> bool:
        return self._appliance.call("exists", path).strip() == "true"


Inspect = Callable[[str, str, Reader], None]  # (disk or volume, device, reader)


def _tail(text: str, size: int = _DETAIL) -> str:
    return re.sub(r"\s+", " ", text.strip())[-size:]


def _options(fstype: str, *extra: str) -> str:
    # nouuid: two disks of a point (or a point and anything else the appliance sees) may share an XFS UUID.
    return ",".join([*extra, *(["nouuid"] if fstype == "xfs" else [])])


def disk_of(device: str, disks: list[str]) -> int | None:
    """Which of the appliance's disks (list-devices order) a filesystem is on; None for a volume (LVM, md) that is
    on none of them by itself."""
    if device in disks:
        return disks.index(device)
    m = _PARTITION.fullmatch(device)
    if m and m.group(1) in disks:
        return disks.index(m.group(1))
    return None


def check_filesystem(
    appliance: Appliance, device: str, fstype: str, where: str, workdir: Path, inspect: Inspect | None
) -> FsResult:
    """What the failed-over machine would do at boot, on an overlay the appliance throws away: mount read-write once
    (a journaling filesystem replays its log: a frozen XFS leaves one to replay) and unmount; check with the
    filesystem's own checker, changing nothing; mount read-only and count the root directory's names."""
    if fstype in NOT_A_FILESYSTEM:
        return FsResult(device, fstype or "none", "skipped", "skipped", "skipped", "no filesystem to check")
    try:
        appliance.call("mount-vfs", _options(fstype, "rw"), fstype, device, "/", timeout=600)
    except ApplianceError as e:
        return FsResult(device, fstype, "failed", "skipped", "failed", "journal replay mount: " + _tail(str(e)))
    try:
        fault_point("failover.step", step="mounted", disk=where)
    finally:
        appliance.call("umount-all", timeout=300)
    checker = CHECKERS.get(fstype)
    if checker is None:
        fsck, detail = "skipped", f"no checker for {fstype}"
    else:
        out = appliance.sh(
            f"{checker} '{device}' > /tmp/fsck.out 2>&1; echo rc=$?; tail -c 2000 /tmp/fsck.out", timeout=3600
        )
        fault_point("failover.step", step="checked", disk=where)
        m = _RC.search(out)
        code = int(m.group(1)) if m else -1
        fsck = "clean" if code == 0 else "errors"
        detail = "" if code == 0 else _tail(out)
    try:
        appliance.call("mount-vfs", _options(fstype, "ro"), fstype, device, "/", timeout=600)
    except ApplianceError as e:
        return FsResult(device, fstype, "ok", fsck, "failed", (detail + " read-only mount: " + _tail(str(e))).strip())
    try:
        fault_point("failover.step", step="mounted-ro", disk=where)
        count = appliance.sh("find /sysroot -mindepth 1 -maxdepth 1 -printf . | wc -c").strip()
        entries = int(count) if count.isdigit() else 0
        if inspect is not None:
            inspect(where, device, Reader(appliance, workdir))
    finally:
        appliance.call("umount-all", timeout=300)
    return FsResult(device, fstype, "ok", fsck, "ok", detail, entries)


@dataclass(frozen=True)
class Root:
    device: str
    fstype: str
    systemd: bool


def find_root(appliance: Appliance) -> tuple[Root | None, str]:
    """The machine's root filesystem: the first one with an /etc/os-release (or /usr/lib/os-release) and an /etc/fstab;
    None and why when there is none. Looked at read-only without replaying a journal (``norecovery``, ``noload``),
    so that the disks it is not on are left exactly as the point holds them."""
    seen = []
    for device, fstype in appliance.filesystems():
        if fstype in NOT_A_FILESYSTEM or not DEVICE.fullmatch(device):
            continue
        seen.append(f"{device} ({fstype})")
        quiet = {"xfs": ["ro", "norecovery"], "ext3": ["ro", "noload"], "ext4": ["ro", "noload"]}.get(fstype, ["ro"])
        try:
            appliance.call("mount-vfs", _options(fstype, *quiet), fstype, device, "/", timeout=600)
        except ApplianceError:
            continue
        try:
            release = any(
                appliance.call("is-file", p).strip() == "true" for p in ("/etc/os-release", "/usr/lib/os-release")
            )
            if release and appliance.call("is-file", "/etc/fstab").strip() == "true":
                systemd = appliance.call("is-dir", "/etc/systemd/system").strip() == "true"
                return Root(device, fstype, systemd), ""
        finally:
            appliance.call("umount-all", timeout=300)
    if not seen:
        return None, "no filesystem in the point's disks"
    return None, f"no filesystem with /etc/os-release and /etc/fstab among {', '.join(seen[:8])}"


def write_files(appliance: Appliance, root: Root, files: dict[str, tuple[Path, int]], links: dict[str, str]) -> None:
    """Mount ``root`` read-write (its journal replayed, as at boot) and put ``files`` (path in the machine -> local
    file, mode) and symbolic ``links`` (path -> target) there."""
    appliance.call("mount-vfs", _options(root.fstype, "rw"), root.fstype, root.device, "/", timeout=600)
    try:
        for remote, (local, mode) in files.items():
            appliance.call("mkdir-p", str(Path(remote).parent))
            appliance.upload(local, remote, mode)
        for link, target in links.items():
            appliance.call("mkdir-p", str(Path(link).parent))
            appliance.call("ln-sf", target, link)
    finally:
        appliance.call("umount-all", timeout=300)
    appliance.call("sync", timeout=300)
