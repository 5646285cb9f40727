"""The install directory: parsed from input once (pure), made or adopted with a marker, released by name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.errors import InstallDirInvalid, InstallDirNotOurs
from agent.host.paths import Paths
from agent.lifecycle.install_dir import (
    MARKER,
    SYSTEM_DIRS,
    InstallDir,
    check,
    claim,
    is_ours,
    parse_install_dir,
    refusal,
    release,
)


@pytest.mark.parametrize(
    ("given", "parsed"),
    [
        ("/usr/local/mobility", "/usr/local/mobility"),
        ("/opt/mobility/", "/opt/mobility"),
        ("//srv//./mobility", "/srv/mobility"),
        ("/opt/vendor-1.2_x+y", "/opt/vendor-1.2_x+y"),
        ("/home/ops/mobility", "/home/ops/mobility"),
    ],
)
def test_parse_accepts_and_normalises(given: str, parsed: str) -> None:
    assert parse_install_dir(given) == parsed


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("", "relative"),
        ("mobility", "relative"),
        ("./mobility", "relative"),
        ("/opt/../usr", "'..'"),
        ("/", "root directory"),
        ("///", "root directory"),
        ("/opt", "system directory"),
        ("/usr/local/", "system directory"),
        ("/var/lib", "system directory"),
        ("/boot/efi", "system directory"),
        ("/proc/1", "kernel filesystem"),
        ("/tmp/m", "writable by every user"),
        ("/var/lib/mobility", "state directory"),
        ("/etc/mobility/bin", "configuration directory"),
        ("/opt/a b", "characters"),
        ("/opt/é", "characters"),
        ("/opt/%n", "characters"),
        ("/opt/x\n[Service]", "characters"),
        ("/" + "x" * 1100, "longer"),
    ],
)
def test_parse_refuses(given: str, why: str) -> None:
    with pytest.raises(InstallDirInvalid, match=why) as e:
        parse_install_dir(given, "-d")
    assert len(e.value.message) < 400


def test_the_table_holds_the_hierarchy_and_nothing_of_the_agent() -> None:
    assert {"/", "/opt", "/usr/local", "/usr/local/bin", "/var/lib", "/var/log", "/srv", "/home"} <= SYSTEM_DIRS
    assert "/usr/local/mobility" not in SYSTEM_DIRS
    assert refusal("/usr/local/mobility") is None
    assert refusal("/tmp/x", as_given=False) is None  # a root image's own layout, reached through its links
    assert refusal("/opt", as_given=False) == "is a system directory"


def test_claim_makes_marks_and_adopts(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    host = claim(paths, InstallDir("/srv/m"))
    assert host == tmp_path / "srv/m" and is_ours(host)
    assert json.loads((host / MARKER).read_text())["install_dir"] == "/srv/m"
    assert claim(paths, InstallDir("/srv/m")) == host  # ours: used as it is
    (tmp_path / "srv/empty").mkdir()
    assert is_ours(claim(paths, InstallDir("/srv/empty")))


def test_check_writes_nothing_and_refuses_what_is_not_ours(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    assert check(paths, InstallDir("/srv/m")) == tmp_path / "srv/m"
    assert not (tmp_path / "srv").exists()
    (tmp_path / "srv/full").mkdir(parents=True)
    (tmp_path / "srv/full/data").write_text("x")
    with pytest.raises(InstallDirNotOurs, match="data"):
        check(paths, InstallDir("/srv/full"))
    (tmp_path / "srv/file").write_text("x")
    with pytest.raises(InstallDirNotOurs, match="not a directory"):
        check(paths, InstallDir("/srv/file"))
    (tmp_path / "srv/fake").mkdir()
    (tmp_path / "srv/fake" / MARKER).symlink_to(tmp_path / "srv/m")  # a marker must be a file, not a link
    (tmp_path / "srv/fake/x").write_text("x")
    with pytest.raises(InstallDirNotOurs):
        check(paths, InstallDir("/srv/fake"))
    (tmp_path / "srv/open").mkdir(mode=0o755)
    os.chmod(tmp_path / "srv/open", 0o775)  # noqa: S103 - the case under test
    with pytest.raises(InstallDirNotOurs, match="mode 775"):
        check(paths, InstallDir("/srv/open"))


def test_an_earlier_agents_install_is_recognised_only_when_complete(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    old = tmp_path / "usr/local/mobility"
    (old / "versions/0.0.9").mkdir(parents=True)
    (old / "current").symlink_to("versions/0.0.9")
    with pytest.raises(InstallDirNotOurs):  # no .complete: not recognisably the agent's
        check(paths, InstallDir("/usr/local/mobility"))
    (old / "versions/0.0.9/.complete").write_text("0.0.9\n")
    assert is_ours(claim(paths, InstallDir("/usr/local/mobility")))
    (tmp_path / "srv/trap/versions").mkdir(parents=True)
    (tmp_path / "srv/trap/current").symlink_to("/etc")
    with pytest.raises(InstallDirNotOurs):
        check(paths, InstallDir("/srv/trap"))


def test_release_removes_only_the_agents_names(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    host = claim(paths, InstallDir("/srv/m"))
    (host / "versions/0.1.0").mkdir(parents=True)
    (host / "current").symlink_to("versions/0.1.0")
    (host / "theirs").write_text("x")
    removed, kept = release(paths, "/srv/m")
    assert removed == ["/srv/m/current", "/srv/m/versions"]
    assert kept and "theirs" in kept[0]
    assert sorted(p.name for p in host.iterdir()) == ["theirs"]
    (host / "theirs").unlink()
    claim(paths, InstallDir("/srv/m"))
    assert release(paths, "/srv/m") == (["/srv/m"], [])
    assert not host.exists()
    assert release(paths, "/srv/m") == ([], [])


def test_release_follows_no_link_at_an_agent_name(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    host = claim(paths, InstallDir("/srv/m"))
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious/data").write_text("x")
    (host / "versions").symlink_to(tmp_path / "precious")
    release(paths, "/srv/m")
    assert (tmp_path / "precious/data").read_text() == "x"
