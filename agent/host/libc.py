"""Facts read from a root's own binaries: the glibc version and the machine architecture."""

from __future__ import annotations

import re
import struct

from agent.host.paths import Paths

# Where distributions keep the C library, newest layouts first.
LIBC_LOCATIONS = (
    "/lib/x86_64-linux-gnu/libc.so.6",
    "/usr/lib/x86_64-linux-gnu/libc.so.6",
    "/lib64/libc.so.6",
    "/usr/lib64/libc.so.6",
    "/lib/aarch64-linux-gnu/libc.so.6",
    "/lib/libc.so.6",
    "/usr/lib/libc.so.6",
)
ARCH_PROBES = ("/bin/sh", "/usr/bin/env")

# e_machine values of the ELF header (elf.h).
_ELF_MACHINES = {0x03: "i386", 0x3E: "x86_64", 0xB7: "aarch64", 0x15: "ppc64", 0x16: "s390x", 0x28: "arm"}
_GLIBC_BANNER = re.compile(rb"GNU C Library [^\n\0]*?version (\d+\.\d+)")
_GLIBC_SYMBOL = re.compile(rb"GLIBC_(\d+)\.(\d+)(?:\.(\d+))?\0")


def elf_machine(header: bytes) -> str | None:
    """The architecture named by an ELF header, or None if ``header`` is not ELF."""
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    endian = "<" if header[5] == 1 else ">"
    (machine,) = struct.unpack_from(endian + "H", header, 18)
    return _ELF_MACHINES.get(machine, f"elf-{machine:#x}")


def glibc_version_of(libc: bytes) -> str | None:
    """The glibc release a libc.so.6 image belongs to: its banner, else its newest GLIBC_x.y symbol."""
    m = _GLIBC_BANNER.search(libc)
    if m:
        return m.group(1).decode()
    versions = {(int(a), int(b)) for a, b, _ in _GLIBC_SYMBOL.findall(libc)}
    if not versions:
        return None
    major, minor = max(versions)
    return f"{major}.{minor}"


def find_libc(paths: Paths) -> str | None:
    """The system path of the root's libc.so.6, or None."""
    return next((loc for loc in LIBC_LOCATIONS if paths.resolve(loc).is_file()), None)


def root_arch(paths: Paths) -> str | None:
    """The architecture of the root's binaries (libc, else /bin/sh), or None."""
    for loc in (find_libc(paths), *ARCH_PROBES):
        if loc is None:
            continue
        host = paths.resolve(loc)
        if host.is_file():
            with host.open("rb") as f:
                arch = elf_machine(f.read(64))
            if arch:
                return arch
    return None
