"""ELF facts read from real files of this machine: the loader a program names, what it needs, a libc's kernel floor."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from agent.host.elf import ElfError, parse_elf

LIBC = Path("/lib/x86_64-linux-gnu/libc.so.6")


def test_a_program_names_its_loader_and_libraries() -> None:
    sh = parse_elf(Path("/bin/sh").read_bytes())
    assert sh.interp == "/lib64/ld-linux-x86-64.so.2"
    assert "libc.so.6" in sh.needed and sh.soname is None


def test_the_c_library_says_its_soname_and_kernel_floor() -> None:
    libc = parse_elf(LIBC.read_bytes())
    assert libc.soname == "libc.so.6"
    assert libc.needed == ("ld-linux-x86-64.so.2",)
    assert libc.abi_kernel is not None and libc.abi_kernel >= (3, 2, 0)


def test_the_loader_needs_nothing() -> None:
    ld = parse_elf(Path("/lib64/ld-linux-x86-64.so.2").read_bytes())
    assert (ld.interp, ld.needed, ld.soname) == (None, (), "ld-linux-x86-64.so.2")


def test_not_elf_and_damaged_headers_are_refused() -> None:
    with pytest.raises(ElfError, match="not an ELF file"):
        parse_elf(b"#!/bin/sh\necho hi\n" * 4)
    data = bytearray(LIBC.read_bytes()[:4096])
    struct.pack_into("<Q", data, 32, 1 << 40)  # program headers far past the end of the file
    with pytest.raises(ElfError, match="outside the file"):
        parse_elf(bytes(data))
