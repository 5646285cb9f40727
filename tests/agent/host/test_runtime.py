"""The C runtime the agent runs on and the kernel under it (agent/host/runtime.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from agent.host.runtime import (
    bundled_runtime,
    kernel_floor_of,
    kernel_version,
    running_kernel,
    running_kernel_floor,
    running_libc,
    self_command,
)


def test_kernel_versions() -> None:
    assert kernel_version("5.10.0-28-amd64") == (5, 10)
    assert kernel_version("2.6.32-754.el6.x86_64") == (2, 6)
    assert kernel_version("3.2") == (3, 2)
    assert kernel_version("garbage") is None
    assert kernel_version("6") is None


def test_the_running_kernel_is_the_one_uname_names() -> None:
    import os

    assert running_kernel() == os.uname().release


def test_the_floor_of_the_c_library_this_process_loaded() -> None:
    libc = running_libc()
    assert libc is not None and libc.name.startswith("libc")
    assert running_kernel_floor() == kernel_floor_of(libc.read_bytes()) == "3.2"
    assert kernel_floor_of(b"not elf") is None


def test_outside_a_frozen_program_it_starts_again_with_python(monkeypatch: pytest.MonkeyPatch) -> None:
    assert bundled_runtime() is None
    assert self_command(["run"]) == [sys.executable, "-m", "agent", "run"]


def test_a_frozen_program_starts_again_through_its_bundled_loader(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "ld-linux-x86-64.so.2").write_bytes(b"")
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "_MEIPASS", str(tmp_path), raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "mobility"))
    assert bundled_runtime() == tmp_path
    assert self_command(["run", "--root", "/x"]) == [
        str(tmp_path / "ld-linux-x86-64.so.2"),
        "--library-path",
        str(tmp_path),
        str(tmp_path / "mobility"),
        "run",
        "--root",
        "/x",
    ]
    (tmp_path / "ld-linux-x86-64.so.2").unlink()  # frozen without a bundled runtime: its own ELF it is
    assert self_command(["run"]) == [str(tmp_path / "mobility"), "run"]
