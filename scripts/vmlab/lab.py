"""A lab: the VMs and segments of one test or benchmark, in one work directory. `close()` stops every VM by PID and
removes what they made, also when the test failed halfway; a test killed outright loses its VMs to their
parent-death signal (scripts/vmlab/machine.py)::

    with Lab(tmp_path) as lab:
        vm = lab.vm("a", image(DEBIAN12))
        lab.start(vm)
        vm.wait_booted()
        assert vm.run("systemctl is-system-running").output.strip() == "running"
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from scripts.vmlab.build import Image
from scripts.vmlab.host import VmLabError
from scripts.vmlab.machine import VM, Disk, Segment, Spec, acquire_slots


class Lab:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.vms: list[VM] = []

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def vm(
        self,
        name: str,
        disk: Disk | Image,
        spec: Spec | None = None,
        *,
        boot_in_place: bool = False,
        extra: Sequence[Disk] = (),
    ) -> VM:
        """A VM (not started) booting ``disk`` (an image, or a template's disk) with the ``extra`` disks after it."""
        if any(v.name == name for v in self.vms):
            raise VmLabError(f"{name}: a VM of that name is in the lab already")
        vm = VM(
            name,
            Disk.of(disk) if isinstance(disk, Image) else disk,
            self.workdir,
            spec,
            boot_in_place=boot_in_place,
            extra=extra,
        )
        self.vms.append(vm)
        return vm

    @staticmethod
    def segment() -> Segment:
        return Segment()

    def start(self, *vms: VM, slot_timeout: float = 1800.0) -> None:
        """Start ``vms`` together: their slots are taken all at once (never one now and the rest later, which two
        labs waiting for each other's slot would deadlock on)."""
        slots = acquire_slots(len(vms), slot_timeout)
        for vm, slot in zip(vms, slots, strict=True):
            vm.give_slot(slot)
        for vm in vms:
            vm.start()

    def close(self) -> None:
        """Stop every VM (SIGKILL: whoever wanted a clean shutdown asked for it first) and remove their overlays."""
        errors = []
        for vm in reversed(self.vms):
            try:
                vm.close()
            except Exception as e:  # the others still go
                errors.append(f"{vm.name}: {e}")
        still = [vm.name for vm in self.vms if vm.running]
        if errors or still:
            raise VmLabError(f"lab clean-up incomplete: {'; '.join(errors)} still running: {still}")
