"""agent/replication/devices.py: the filesystems whose writes reach a protected disk, through partitions, LVM
(device-mapper) and md, found from a sysfs tree shaped as the kernel makes it (symbolic links into /sys/devices,
``slaves/`` of each stacked device) and /proc/self/mountinfo lines as the kernel writes them.

The layout is the default of RHEL and Ubuntu server installs, on two disks: /boot on sda1; an LVM volume group over
sda2 and sdb1 holding root (dm-0), swap (dm-1) and /home (dm-2, a linear volume over both); an md RAID 1 over sdc1
and sdd1 carrying a partition (md127p1, mounted on /srv) and an LVM physical volume (dm-3, mounted on /var/lib/db);
and sde, a disk of its own, mounted whole on /data."""

from __future__ import annotations

import os
from pathlib import Path

from agent.replication.devices import BlockDevice, devices_above, mounts_of, mounts_on, read_block_tree

# (kernel name, major:minor, parent disk for a partition, slaves)
LAYOUT = [
    ("sda", "8:0", None, ()),
    ("sda1", "8:1", "sda", ()),
    ("sda2", "8:2", "sda", ()),
    ("sdb", "8:16", None, ()),
    ("sdb1", "8:17", "sdb", ()),
    ("sdc", "8:32", None, ()),
    ("sdc1", "8:33", "sdc", ()),
    ("sdd", "8:48", None, ()),
    ("sdd1", "8:49", "sdd", ()),
    ("sde", "8:64", None, ()),
    ("dm-0", "253:0", None, ("sda2",)),
    ("dm-1", "253:1", None, ("sda2",)),
    ("dm-2", "253:2", None, ("sda2", "sdb1")),
    ("md127", "9:127", None, ("sdc1", "sdd1")),
    ("md127p1", "259:0", "md127", ()),
    ("md127p2", "259:1", "md127", ()),
    ("dm-3", "253:3", None, ("md127p2",)),
    ("loop0", "7:0", None, ()),
]

MOUNTINFO = """\
22 1 253:0 / / rw,relatime shared:1 - xfs /dev/mapper/rl-root rw,attr2,inode64,logbufs=8,logbsize=32k,noquota
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
24 22 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
25 22 0:5 / /dev rw,nosuid shared:8 - devtmpfs devtmpfs rw,size=4096k,nr_inodes=1048576,mode=755
26 25 0:23 / /dev/shm rw,nosuid,nodev shared:9 - tmpfs tmpfs rw
27 22 0:24 / /run rw,nosuid,nodev shared:10 - tmpfs tmpfs rw,size=1599092k,nr_inodes=819200,mode=755
60 22 8:1 / /boot rw,relatime shared:28 - xfs /dev/sda1 rw,attr2,inode64,logbufs=8,logbsize=32k,noquota
61 22 253:2 / /home rw,relatime shared:29 - ext4 /dev/mapper/rl-home rw
62 22 259:0 / /srv rw,relatime shared:30 - ext4 /dev/md127p1 rw
63 22 253:3 / /var/lib/db rw,relatime shared:31 - xfs /dev/mapper/db-data rw,attr2,inode64,noquota
64 22 8:64 / /data\\040disk rw,relatime shared:32 - ext4 /dev/sde rw
65 22 253:2 /exports /exports rw,relatime shared:29 - ext4 /dev/mapper/rl-home rw
66 22 7:0 / /snap/core rw,relatime shared:33 - squashfs /dev/loop0 ro
"""


def sysfs(root: Path) -> Path:
    """The tree as the kernel makes it: /sys/block/X links into /sys/devices, partitions as subdirectories of
    their disk with a ``partition`` file, ``slaves/`` links to the lower devices, swap and holders as noise."""
    devices = root / "devices" / "virtual" / "block"
    block = root / "block"
    block.mkdir(parents=True)
    for name, dev, disk, slaves in LAYOUT:
        where = devices / disk / name if disk else devices / name
        where.mkdir(parents=True, exist_ok=True)
        (where / "dev").write_text(f"{dev}\n")
        (where / "size").write_text("2097152\n")
        (where / "uevent").write_text(f"MAJOR={dev.split(':')[0]}\nDEVNAME={name}\n")
        if disk:
            (where / "partition").write_text(name[-1] + "\n")
            (where / "start").write_text("2048\n")
            continue
        (where / "holders").mkdir()
        (where / "slaves").mkdir()
        (where / "queue").mkdir()
        for lower in slaves:
            owner = next(d for n, _, d, _ in LAYOUT if n == lower)
            target = devices / owner / lower if owner else devices / lower
            (where / "slaves" / lower).symlink_to(os.path.relpath(target, where / "slaves"))
        (block / name).symlink_to(os.path.relpath(where, block))
    return root


def dev(name: str) -> tuple[int, int]:
    major, minor = next(d for n, d, _, _ in LAYOUT if n == name).split(":")
    return int(major), int(minor)


def test_the_tree_is_read_as_the_kernel_shows_it(tmp_path: Path) -> None:
    tree = read_block_tree(sysfs(tmp_path / "sys"))
    assert set(tree) == {name for name, *_ in LAYOUT}
    assert tree["dm-2"].slaves == ("sda2", "sdb1") and tree["dm-2"].dev == (253, 2)
    assert tree["md127p1"].disk == "md127" and tree["sdb1"].disk == "sdb" and tree["sda"].disk is None


def test_lvm_over_partitions_of_two_disks_reaches_both_disks(tmp_path: Path) -> None:
    tree = read_block_tree(sysfs(tmp_path / "sys"))
    assert devices_above(tree, "sda") == {dev(n) for n in ("sda", "sda1", "sda2", "dm-0", "dm-1", "dm-2")}
    assert devices_above(tree, "sdb") == {dev(n) for n in ("sdb", "sdb1", "dm-2")}
    mounts = mounts_on(devices_above(tree, "sda") | devices_above(tree, "sdb"), MOUNTINFO)
    # root and /home on LVM, /boot on a partition; the bind mount of a /home subtree is the same filesystem.
    assert mounts == [("/", "xfs"), ("/boot", "xfs"), ("/home", "ext4")]
    assert mounts_on(devices_above(tree, "sdb"), MOUNTINFO) == [("/home", "ext4")]


def test_md_carries_partitions_and_lvm_of_its_own(tmp_path: Path) -> None:
    tree = read_block_tree(sysfs(tmp_path / "sys"))
    for member in ("sdc", "sdd"):
        assert devices_above(tree, member) == {
            dev(n) for n in (member, f"{member}1", "md127", "md127p1", "md127p2", "dm-3")
        }
        assert mounts_on(devices_above(tree, member), MOUNTINFO) == [("/srv", "ext4"), ("/var/lib/db", "xfs")]


def test_a_plain_disk_and_an_unknown_disk(tmp_path: Path) -> None:
    tree = read_block_tree(sysfs(tmp_path / "sys"))
    assert mounts_on(devices_above(tree, "sde"), MOUNTINFO) == [("/data disk", "ext4")]  # \\040 is a space
    assert devices_above(tree, "nvme0n1") == set()
    assert read_block_tree(tmp_path / "nothing") == {}


def test_mounts_of_a_disk_follow_the_stack(tmp_path: Path) -> None:
    """The shell the points use: the disk's own number and partitions, and everything stacked on them."""
    tree = read_block_tree(sysfs(tmp_path / "sys"))
    sdb = BlockDevice("/dev/sdb", Path("/dev/sdb"), 8, 16, "sdb")
    assert mounts_of(sdb, MOUNTINFO, tree) == [("/home", "ext4")]


def test_a_btrfs_source_is_matched_by_its_device() -> None:
    """btrfs shows an anonymous device (0:NN) in mountinfo: the source's device number decides."""
    line = "70 22 0:45 / /mnt/pool rw,relatime shared:40 - btrfs /dev/mapper/pool rw,space_cache=v2\n"
    assert mounts_on({(253, 4)}, line, lambda source: (253, 4) if source == "/dev/mapper/pool" else None) == [
        ("/mnt/pool", "btrfs")
    ]
    assert mounts_on({(253, 4)}, line) == []
