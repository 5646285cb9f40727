"""Paths resolves every location as a chroot of the root would see it."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import RootSymlinkLoop
from agent.host.paths import Paths


def test_dot_dot_is_clamped_at_the_root(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    assert paths("/../../etc/x") == tmp_path / "etc/x"
    assert paths.resolve("/a/../../b/./c/..") == tmp_path / "b"
    assert paths("//etc//mobility/./x") == tmp_path / "etc/mobility/x"


def test_absolute_and_relative_links_are_followed_inside_the_root(tmp_path: Path) -> None:
    (tmp_path / "real/lib").mkdir(parents=True)
    (tmp_path / "var").mkdir()
    (tmp_path / "var/lib").symlink_to("/real/lib")  # absolute: inside the root, not the host's /real
    (tmp_path / "usr").symlink_to("../../../../../real")  # relative, climbing past the root: clamped
    paths = Paths(tmp_path)
    assert paths.resolve("/var/lib/mobility") == tmp_path / "real/lib/mobility"
    assert paths.state_dir == tmp_path / "real/lib/mobility"
    assert paths.resolve("/usr/lib") == tmp_path / "real/lib"


def test_a_file_is_its_resolved_directory_and_its_own_name(tmp_path: Path) -> None:
    (tmp_path / "etc/real").mkdir(parents=True)
    (tmp_path / "etc/systemd").symlink_to("/etc/real")
    (tmp_path / "etc/real/unit").symlink_to("/etc/passwd")
    paths = Paths(tmp_path)
    assert paths("/etc/systemd/unit") == tmp_path / "etc/real/unit"  # the link itself: unlink/replace act on it
    assert paths.resolve("/etc/systemd/unit") == tmp_path / "etc/passwd"
    assert paths("/etc/systemd/..") == tmp_path / "etc"  # a trailing '..' names a directory: resolved
    assert paths("/") == tmp_path


def test_agent_locations_are_resolved(tmp_path: Path) -> None:
    host = tmp_path / "host"
    root = tmp_path / "root"
    (root / "var/lib").mkdir(parents=True)
    (root / "var/lib/mobility").symlink_to(host / "state")
    paths = Paths(root)
    inside = root / str(host).lstrip("/") / "state"
    assert paths.state_dir == inside
    assert paths.identity == inside / "identity.json"
    assert paths.downloads_dir == inside / "downloads"
    assert paths.tuf_metadata_dir == inside / "tuf/metadata"
    assert paths.system_path(paths.identity) == f"{host}/state/identity.json"
    assert paths.system_path(root) == "/"


def test_a_link_loop_is_an_error_not_a_shorter_path(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to("/b")
    (tmp_path / "b").symlink_to("/a")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/systemd").symlink_to("/etc/systemd")  # a link to its own path: a loop under a chroot
    paths = Paths(tmp_path)
    with pytest.raises(RootSymlinkLoop):
        paths.resolve("/a/x")
    with pytest.raises(RootSymlinkLoop):
        paths("/etc/systemd/system/mobility.service")


def test_relative_paths_are_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an absolute path"):
        Paths(tmp_path)("etc/x")


def test_the_running_machine(tmp_path: Path) -> None:
    paths = Paths(Path("/"))
    assert paths("/../etc/hostname") == Path("/etc/hostname")
    assert paths.resolve("/proc/self/..") == Path("/proc")
