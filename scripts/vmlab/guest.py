"""What the lab does inside a guest, as an operator would on a real machine: grow the root volume group onto another
disk (the layout a root LVM over several disks has), and read a guest's volumes back.

    vm = lab.vm("db", image(DEBIAN12), Spec(blank_disks=(1024,)))   # /dev/vdb, empty
    lab.start(vm); vm.wait_booted()
    grow_root_onto(vm, "/dev/vdb")                                  # vg0 and vg0/root now span vda3 and vdb

The image keeps one disk (its cache key and every test that boots it are unchanged); a VM that needs root over two
disks grows it at its first boot, with the guest's own LVM and XFS (device-mapper runs in the guest, not here)."""

from __future__ import annotations

from dataclasses import dataclass

from scripts.vmlab.host import VmLabError
from scripts.vmlab.machine import VM


@dataclass(frozen=True)
class Segment:
    """One segment of a logical volume: the physical volume it is on and its size in bytes."""

    lv: str
    pv: str
    size: int


def segments(vm: VM, vg: str = "vg0") -> list[Segment]:
    """The segments of every logical volume of ``vg``, as `lvs --segments` shows them."""
    out = vm.run(
        f"lvs --noheadings --units b --nosuffix --segments -o lv_name,devices,seg_size {vg}", timeout=60
    ).check(f"listing the segments of {vg}")
    found = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 3:
            found.append(Segment(fields[0], fields[1].split("(")[0], int(fields[2])))
    return found


def grow_root_onto(vm: VM, device: str, vg: str = "vg0", lv: str = "root") -> list[Segment]:
    """Make ``device`` (a whole, empty disk) a physical volume of ``vg`` and grow ``lv`` and its filesystem over all
    of it, online (`lvextend --resizefs`: xfs_growfs for XFS). Returns the root's segments: one on each disk."""
    vm.run(
        f"pvcreate -q {device} && vgextend -q {vg} {device} && lvextend -q -l +100%FREE --resizefs {vg}/{lv} {device}",
        timeout=300,
    ).check(f"growing {vg}/{lv} onto {device}")
    root = [s for s in segments(vm, vg) if s.lv == lv]
    if device not in {s.pv for s in root} or len({s.pv for s in root}) < 2:
        raise VmLabError(f"{vm.name}: {vg}/{lv} is not over {device} and another disk: {root}")
    return root
