"""The agent's file primitives: remove a name, append to its own files, read small files with a bound."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.shared.fsutil import NotSmallRegularFile, append_text, open_lock_file, read_small_file, remove


def test_remove_removes_a_link_not_its_target(tmp_path: Path) -> None:
    (tmp_path / "target").mkdir()
    (tmp_path / "target/keep").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    assert remove(tmp_path / "link")
    assert (tmp_path / "target/keep").exists()
    (tmp_path / "d/e").mkdir(parents=True)
    (tmp_path / "d/e/inner-link").symlink_to(tmp_path / "target")
    assert remove(tmp_path / "d")
    assert (tmp_path / "target/keep").exists() and not (tmp_path / "d").exists()
    assert not remove(tmp_path / "nothing")


def test_append_and_lock_replace_a_planted_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "log").symlink_to(victim)
    append_text(tmp_path / "log", "line\n")
    append_text(tmp_path / "log", "line\n")
    assert victim.read_text() == "precious\n"
    assert (tmp_path / "log").read_text() == "line\nline\n"
    (tmp_path / "lock").symlink_to(victim)
    os.close(open_lock_file(tmp_path / "lock"))
    assert victim.read_text() == "precious\n" and not (tmp_path / "lock").is_symlink()


def test_read_small_file(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    st, data = read_small_file(f, 3)
    assert (data, st.st_size) == (b"abc", 3)
    with pytest.raises(NotSmallRegularFile, match="more than the 2"):
        read_small_file(f, 2)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(NotSmallRegularFile, match="a FIFO"):
        read_small_file(tmp_path / "fifo", 10)
    with pytest.raises(NotSmallRegularFile, match="a device file"):
        read_small_file(Path("/dev/zero"), 10)
    with pytest.raises(NotSmallRegularFile, match="a directory"):
        read_small_file(tmp_path, 10)
    with pytest.raises(FileNotFoundError):
        read_small_file(tmp_path / "missing", 10)
