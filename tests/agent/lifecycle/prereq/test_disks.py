"""The sysfs walk from a device number to whole disks. The sysfs trees here are hand-made copies of
the kernel's layout (devices/.../block/<disk>/<part>/partition, dm-N/slaves/); real loop devices are
used in tests/integration/test_prereq_disks.py."""

from __future__ import annotations

import os
from pathlib import Path

from agent.lifecycle.prereq.disks import backing_disks


def _node(sys_dir: Path, majmin: str, device: str) -> Path:
    target = sys_dir / "devices" / device
    target.mkdir(parents=True, exist_ok=True)
    link = sys_dir / "dev" / "block" / majmin
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return target


def test_partition_maps_to_its_disk(tmp_path: Path) -> None:
    part = _node(tmp_path, "8:2", "pci0000:00/block/sda/sda2")
    (part / "partition").write_text("2\n")
    assert backing_disks(os.makedev(8, 2), tmp_path) == {"sda"}


def test_device_mapper_over_two_disks(tmp_path: Path) -> None:
    dm = _node(tmp_path, "253:0", "virtual/block/dm-0")
    for disk in ("vda", "vdb"):
        part = tmp_path / "devices" / "pci" / "block" / disk / f"{disk}1"
        part.mkdir(parents=True)
        (part / "partition").write_text("1\n")
        (dm / "slaves").mkdir(exist_ok=True)
        (dm / "slaves" / f"{disk}1").symlink_to(part)
    assert backing_disks(os.makedev(253, 0), tmp_path) == {"vda", "vdb"}


def test_anonymous_device_has_no_disk(tmp_path: Path) -> None:
    assert backing_disks(os.makedev(0, 42), tmp_path) is None
    assert backing_disks(os.makedev(9, 9), tmp_path) is None
