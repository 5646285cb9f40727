"""The freeze provider: the Linux counterpart of a VSS provider. App-consistent recovery points run the hooks in
/etc/mobility/freeze.d (pre), freeze the filesystems with FIFREEZE, snapshot, thaw (FITHAW) and run the hooks
(post). Setting it up means the hooks directory exists and every filesystem to protect can be frozen."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from agent.paths import Paths

# Filesystems whose kernel drivers implement freeze_fs (FIFREEZE works on them).
FREEZABLE = frozenset({"ext3", "ext4", "xfs", "btrfs", "f2fs", "gfs2", "jfs", "nilfs2", "reiserfs", "ocfs2"})


@dataclass(frozen=True)
class FreezeSetup:
    ready: bool
    reason: str


def mount_of(mountinfo: str, path: str) -> tuple[str, str] | None:
    """(mount point, filesystem type) of the mount holding ``path``: the longest mount point above it (pure)."""
    best: tuple[str, str] | None = None
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or not rfields:
            continue
        point = fields[4].replace("\\040", " ")
        inside = point in (path, "/") or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, rfields[0])
    return best


def check_freezable(paths: Paths) -> FreezeSetup:
    """Whether the filesystem holding the root (the one to protect) can be frozen, judged from its type."""
    mount = mount_of(Path("/proc/self/mountinfo").read_text(), str(paths.root))
    if mount is None:
        return FreezeSetup(False, f"no mount holds {paths.root}")
    point, fstype = mount
    if fstype not in FREEZABLE:
        return FreezeSetup(False, f"{point} is {fstype}, which cannot be frozen (no FIFREEZE)")
    if os.geteuid() != 0:
        return FreezeSetup(False, "freezing filesystems needs root (CAP_SYS_ADMIN)")
    return FreezeSetup(True, f"{point} ({fstype}) supports FIFREEZE")


def install_provider(paths: Paths) -> FreezeSetup:
    """Create the hooks directory and check the filesystems; a failure is a warning, never an install failure."""
    hooks = paths("/etc/mobility/freeze.d")  # the name: an operator's link to a shared hooks directory stays theirs
    try:
        hooks.mkdir(parents=True, exist_ok=True)
        if not hooks.is_symlink():
            hooks.chmod(0o700)
    except OSError as e:
        return FreezeSetup(False, f"cannot create {hooks}: {e.strerror}")
    setup = check_freezable(paths)
    if not setup.ready and not hooks.is_symlink() and not any(hooks.iterdir()):
        # Not ready: remove the marker directory so that health says so (only crash-consistent points).
        hooks.rmdir()
    return setup
