from __future__ import annotations

import os
from pathlib import Path

from agent.host.libc import elf_machine, find_libc, glibc_version_of, root_arch
from agent.host.paths import Paths


def test_elf_header_of_a_real_binary() -> None:
    with open("/bin/sh", "rb") as f:
        assert elf_machine(f.read(64)) == "x86_64"
    assert elf_machine(b"#!/bin/sh\n") is None


def test_glibc_of_this_machine_matches_the_running_one() -> None:
    # The libc file of / and the C library this interpreter loaded are the same release.
    running = os.confstr("CS_GNU_LIBC_VERSION") or ""
    libc = find_libc(Paths(Path("/")))
    assert libc is not None and f"glibc {glibc_version_of(Path(libc).read_bytes())}" == running
    assert root_arch(Paths(Path("/"))) == "x86_64"


def test_glibc_version_from_symbols_when_banner_is_missing() -> None:
    assert glibc_version_of(b"\0GLIBC_2.2.5\0GLIBC_2.17\0GLIBC_2.3\0") == "2.17"
    assert glibc_version_of(b"no libc here") is None
