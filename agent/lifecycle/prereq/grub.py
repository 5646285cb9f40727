"""GRUB kernel command lines must name the root and resume devices by UUID or LABEL (pure)."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Files that may carry kernel command lines, GRUB 2 and GRUB legacy.
GRUB_FILES = ("/boot/grub/grub.cfg", "/boot/grub2/grub.cfg", "/boot/grub/menu.lst", "/etc/default/grub")

_KERNEL_LINE = re.compile(r"^\s*(?:linux|linux16|linuxefi|kernel)\s|^\s*GRUB_CMDLINE_LINUX(?:_DEFAULT)?=")
_PARAM = re.compile(r"""(?:^|[\s"'])(root|resume)=([^\s"']+)""")
# Kernel names of disks and partitions: they move when disks are added, removed or re-ordered.
_DEVICE_NAME = re.compile(r"/dev/(?:[shv]d[a-z]+|xvd[a-z]+|nvme\d+n\d+|mmcblk\d+|dm-\d+)(?:p?\d+)?")


@dataclass(frozen=True)
class DeviceReference:
    line: int
    param: str
    value: str


def device_name_references(text: str) -> list[DeviceReference]:
    """Every ``root=``/``resume=`` on a kernel command line that names a device by its kernel name."""
    found = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not _KERNEL_LINE.match(line):
            continue
        for m in _PARAM.finditer(line):
            if _DEVICE_NAME.fullmatch(m.group(2)):
                found.append(DeviceReference(lineno, m.group(1), m.group(2)))
    return found
