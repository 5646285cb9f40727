"""Which disks back a filesystem, through partitions, device-mapper and MD, read from sysfs."""

from __future__ import annotations

import os
from pathlib import Path

SYS = Path("/sys")


def backing_disks(dev: int, sys_dir: Path = SYS) -> set[str] | None:
    """The whole disks under device number ``dev``; None when no block device backs it
    (overlay, tmpfs, NFS: device major 0)."""
    major, minor = os.major(dev), os.minor(dev)
    if major == 0:
        return None
    node = sys_dir / "dev" / "block" / f"{major}:{minor}"
    if not node.exists():
        return None
    return _disks_of(node.resolve())


def _disks_of(node: Path, depth: int = 0) -> set[str]:
    if depth > 8:  # stacked devices are never this deep; a loop in sysfs would be a kernel bug
        return set()
    slaves = node / "slaves"
    if slaves.is_dir() and any(slaves.iterdir()):
        disks: set[str] = set()
        for slave in slaves.iterdir():
            disks |= _disks_of(slave.resolve(), depth + 1)
        return disks
    if (node / "partition").exists():
        return _disks_of(node.parent, depth + 1)
    return {node.name}
