"""The C runtime this agent runs on, and the kernel under it.

The frozen programs carry their own loader and C library (packaging/README.md): a static launcher starts them as
``RUNTIME/ld-linux-x86-64.so.2 --library-path RUNTIME RUNTIME/PROGRAM``, so the host's libc is never loaded. What
that means here: a frozen program that starts itself again goes through the same loader (`self_command`), the
kernel floor is the one of the C library this process loaded (`running_kernel_floor`), and the running kernel is
read where a test can also show another one (`running_kernel`)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.host.elf import ElfError, parse_elf

LOADER_NAME = "ld-linux-x86-64.so.2"
OSRELEASE = Path("/proc/sys/kernel/osrelease")
_KERNEL = re.compile(r"\s*(\d+)\.(\d+)")
_LIBC_MAPPING = re.compile(r"\s(/\S*/libc(?:-[0-9.]+)?\.so(?:\.6)?)\s*$")


def kernel_version(text: str) -> tuple[int, int] | None:
    """ "5.10.0-28-amd64" -> (5, 10); None if it does not start with MAJOR.MINOR. Pure."""
    m = _KERNEL.match(text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def kernel_floor_of(libc: bytes) -> str | None:
    """The oldest kernel a C library runs on, from its GNU ABI note: "3.2" for glibc 2.26 and newer on x86_64."""
    try:
        tag = parse_elf(libc).abi_kernel
    except ElfError:
        return None
    return f"{tag[0]}.{tag[1]}" if tag else None


def bundled_runtime() -> Path | None:
    """The directory of the bundled loader and libc, when this is a frozen program that carries them."""
    if not getattr(sys, "frozen", False):
        return None
    home = Path(getattr(sys, "_MEIPASS", ""))
    return home if (home / LOADER_NAME).is_file() else None


def self_command(args: Sequence[str]) -> list[str]:
    """The argv that starts this program again with ``args``: a frozen program through its bundled loader (its
    own ELF names the host's loader, which must never run it), otherwise this Python with ``-m agent``."""
    runtime = bundled_runtime()
    if runtime is not None:
        return [str(runtime / LOADER_NAME), "--library-path", str(runtime), sys.executable, *args]
    if getattr(sys, "frozen", False):
        return [sys.executable, *args]
    return [sys.executable, "-m", "agent", *args]


def running_libc() -> Path | None:
    """The file of the C library this process loaded (its mapping in /proc/self/maps), else the bundled one."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    for line in maps.splitlines():
        m = _LIBC_MAPPING.search(line)
        if m:
            return Path(m.group(1))
    runtime = bundled_runtime()
    return runtime / "libc.so.6" if runtime is not None else None


def running_kernel_floor() -> str | None:
    """The kernel floor of the C library this process runs on, or None if it cannot be read."""
    libc = running_libc()
    if libc is None:
        return None
    try:
        return kernel_floor_of(libc.read_bytes())
    except OSError:
        return None


def running_kernel() -> str:
    """The running kernel's release, as `uname -r` prints it (read from /proc first, as the launchers do)."""
    try:
        release = OSRELEASE.read_text().strip()
    except OSError:
        release = ""
    return release or os.uname().release
