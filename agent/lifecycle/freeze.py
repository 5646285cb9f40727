"""The freeze provider: the Linux counterpart of a VSS provider. App-consistent recovery points run the hooks in
/etc/mobility/freeze.d (pre), freeze the filesystems with FIFREEZE, snapshot, thaw (FITHAW) and run the hooks
(post). Setting it up means the hooks directory exists and every filesystem to protect can be frozen.

Whether it is ready has one source: the set-up (install, the bootstrap's install, `mobility freeze-provider install`)
records its verdict and reason in /var/lib/mobility/freeze.json; health and status read that record and only
re-check what is cheap and can change behind it (the hooks directory is still there)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.host.paths import Paths
from agent.shared.fsutil import NotSmallRegularFile, atomic_write, read_small_file

# Filesystems whose kernel drivers implement freeze_fs (FIFREEZE works on them).
FREEZABLE = frozenset({"ext3", "ext4", "xfs", "btrfs", "f2fs", "gfs2", "jfs", "nilfs2", "reiserfs", "ocfs2"})


@dataclass(frozen=True)
class FreezeSetup:
    ready: bool
    reason: str

    def to_json(self) -> dict[str, object]:
        return {"ready": self.ready, "reason": self.reason}


NEVER_SET_UP = FreezeSetup(False, "never set up on this machine")
_MAX_RECORD = 4096


def save_setup(paths: Paths, setup: FreezeSetup) -> None:
    atomic_write(paths.freeze_state, json.dumps(setup.to_json(), indent=2).encode())


def load_setup(paths: Paths) -> FreezeSetup | None:
    """The verdict of the last set-up, or None when there is none (or it is damaged)."""
    try:
        doc = json.loads(read_small_file(paths.freeze_state, _MAX_RECORD)[1])
    except (OSError, NotSmallRegularFile, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("ready"), bool) or not isinstance(doc.get("reason"), str):
        return None
    return FreezeSetup(doc["ready"], doc["reason"])


def provider_status(paths: Paths) -> FreezeSetup:
    """What health and status show: the recorded set-up, re-checked cheaply (the hooks directory still exists)."""
    setup = load_setup(paths) or NEVER_SET_UP
    if setup.ready and not paths.freeze_dir.is_dir():
        return FreezeSetup(False, "/etc/mobility/freeze.d was removed after the set-up")
    return setup


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


def check_freezable(paths: Paths, mountinfo: str | None = None, euid: int | None = None) -> FreezeSetup:
    """Whether the filesystem holding the root (the one to protect) can be frozen, judged from its type (by default
    in this process's mount table, by this process's user)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError as e:  # no /proc (a chroot without it)
            return FreezeSetup(False, f"cannot read the mount table (/proc/self/mountinfo): {e.strerror}")
    mount = mount_of(mountinfo, str(paths.root))
    if mount is None:
        return FreezeSetup(False, f"no mount holds {paths.root}")
    point, fstype = mount
    if fstype not in FREEZABLE:
        return FreezeSetup(False, f"{point} is {fstype}, which cannot be frozen (no FIFREEZE)")
    if (os.geteuid() if euid is None else euid) != 0:
        return FreezeSetup(False, "freezing filesystems needs root (CAP_SYS_ADMIN)")
    return FreezeSetup(True, f"{point} ({fstype}) supports FIFREEZE")


def install_provider(paths: Paths, check: Callable[[Paths], FreezeSetup] = check_freezable) -> FreezeSetup:
    """Create the hooks directory and check the filesystems; a failure is a warning, never an install failure."""
    hooks = paths("/etc/mobility/freeze.d")  # the name: an operator's link to a shared hooks directory stays theirs
    try:
        hooks.mkdir(parents=True, exist_ok=True)
        if not hooks.is_symlink():
            hooks.chmod(0o700)
    except OSError as e:
        setup = FreezeSetup(False, f"cannot create {hooks}: {e.strerror}")
    else:
        setup = check(paths)
        if not setup.ready and not hooks.is_symlink() and not any(hooks.iterdir()):
            hooks.rmdir()  # made for nothing: an empty directory would only suggest hooks could run
    try:
        save_setup(paths, setup)
    except OSError as e:  # unrecorded, health will say not set up: so does this verdict
        return FreezeSetup(False, f"cannot record the set-up in {paths.freeze_state}: {e.strerror}")
    return setup
