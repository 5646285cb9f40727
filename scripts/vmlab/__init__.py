"""The project's VM lab: real virtual machines for the tests and benchmarks (needs root, QEMU; docs/vmlab.md).

- `image(DEBIAN12)` / `image(DEBIAN11)`: a Debian disk with the default install's layout (GPT, BIOS boot partition,
  /boot on ext4, LVM with vg0/root on XFS and vg0/swap, free extents left in vg0), built with debootstrap on first
  use and cached in .cache/vmlab/ by a hash of its recipe (scripts/vmlab/recipe.py, build.py). A variant with more
  packages: `image(DEBIAN12.with_packages("pg", "postgresql-15"))`.
- `Lab(workdir)`: VMs booting qcow2 overlays (scripts/vmlab/lab.py, machine.py): `lab.vm(name, disk, spec)`,
  `lab.start(*vms)`, `vm.wait_booted()`, `vm.run(cmd)` over the serial console (console.py), `vm.ssh(cmd)`,
  `vm.poweroff()`, `vm.kill()`; isolated segments between VMs (`lab.segment()`); the host reachable only through
  `Forward`s; at most two VMs on the machine at once; every VM stopped by PID at `close()` or with its owner.
- scripts/vmlab/mobility.py: a configuration server that guests reach, templates made as docs/templates.md says.

People use it through `python -m scripts.vmlab` (build, boot, console, sweep, prune)."""

from scripts.vmlab.build import Image, cached, image
from scripts.vmlab.console import CommandResult, ConsoleTimeout
from scripts.vmlab.host import VmLabError
from scripts.vmlab.lab import Lab
from scripts.vmlab.machine import (
    CRYPTO_CPU,
    VM,
    Boot,
    Disk,
    Forward,
    Hardware,
    Segment,
    Spec,
)
from scripts.vmlab.recipe import DEBIAN11, DEBIAN12, GUEST_ADDRESS_OF_HOST, RECIPES, Recipe
from server.process.recovery_vm import MAX_VMS, accelerator

__all__ = [
    "CRYPTO_CPU",
    "DEBIAN11",
    "DEBIAN12",
    "GUEST_ADDRESS_OF_HOST",
    "MAX_VMS",
    "RECIPES",
    "VM",
    "Boot",
    "CommandResult",
    "ConsoleTimeout",
    "Disk",
    "Forward",
    "Hardware",
    "Image",
    "Lab",
    "Recipe",
    "Segment",
    "Spec",
    "VmLabError",
    "accelerator",
    "cached",
    "image",
]
