"""`install -d DIR` and `uninstall -Y`: the agent installs only into a directory of its own and removes only what it
made (issue 11, item 1). Before: `install -d /opt` then `uninstall -Y` removed other vendors' data in /opt, and
`-d /` removed the whole root; a relative `-d` was a traceback (item "relative -d")."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.security.sandbox import error_id, install, make_root, mobility, snapshot, uninstall, unpacked_bundle


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = make_root(tmp_path / "root")
    (r / "opt" / "vendor").mkdir(parents=True)
    (r / "opt" / "vendor" / "data.db").write_text("another vendor's data\n")
    (r / "srv" / "app").mkdir(parents=True)
    (r / "srv" / "app" / "config.yml").write_text("someone's app\n")
    return r


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return unpacked_bundle(tmp_path / "bundle")


def installed_version(root: Path, install_dir: str = "/usr/local/mobility") -> str | None:
    current = root / install_dir.lstrip("/") / "current"
    return os.readlink(current) if current.is_symlink() else None


@pytest.mark.parametrize(
    "install_dir",
    [
        "/",
        "/opt",
        "/usr",
        "/usr/local",
        "/usr/local/bin",
        "/var/lib",
        "/etc",
        "/home",
        "/srv",
        "/boot",
        "/root",
        "/var",
    ],
)
def test_system_directories_are_refused_and_nothing_is_written(root: Path, bundle: Path, install_dir: str) -> None:
    before = snapshot(root)
    r = install(root, bundle, "-d", install_dir)
    assert (r.returncode, error_id(r)) == (2, "INSTALL-DIR-INVALID"), r.stderr
    assert "Traceback" not in r.stderr
    assert snapshot(root) == before


@pytest.mark.parametrize(
    "install_dir",
    [
        "relative/dir",
        ".",
        "/../x",
        "/usr/local/mobility/../../../srv/app",
        "/tmp/mobility",
        "/var/tmp/m",
        "/proc/self/cwd",
        "/dev/shm/m",
        "/run/m",
        "/etc/mobility",
        "/var/lib/mobility/bin",
        "/opt/a b",
        "/opt/m\nExecStartPre=/bin/sh -c evil",
        "/opt/100%",
        "/" + "a" * 2000,
    ],
)
def test_unusable_install_dirs_are_refused(root: Path, bundle: Path, tmp_path: Path, install_dir: str) -> None:
    before = snapshot(tmp_path)
    r = install(root, bundle, "-d", install_dir)
    assert (r.returncode, error_id(r)) == (2, "INSTALL-DIR-INVALID"), r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr) < 2000  # the message echoes at most a bounded part of the input
    assert snapshot(tmp_path) == before  # nothing written, inside the root or beside it


def only_the_log_was_written(root: Path, before: dict[str, str]) -> None:
    """The refusal is recorded in install.log; nothing else in the root changed."""
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) - set(before) <= {"var", "var/log", "var/log/mobility", "var/log/mobility/install.log"}
    assert "install failed: INSTALL-DIR-" in (root / "var/log/mobility/install.log").read_text()


def test_a_directory_that_is_not_empty_and_not_ours_is_refused(root: Path, bundle: Path) -> None:
    before = snapshot(root)
    r = install(root, bundle, "-d", "/srv/app")
    assert (r.returncode, error_id(r)) == (1, "INSTALL-DIR-NOT-OURS"), r.stderr
    assert "config.yml" in r.stderr
    only_the_log_was_written(root, before)


def test_a_directory_others_can_write_is_refused(root: Path, bundle: Path) -> None:
    shared = root / "srv" / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # whoever can write here could replace the agent, which runs as root
    r = install(root, bundle, "-d", "/srv/shared")
    assert (r.returncode, error_id(r)) == (1, "INSTALL-DIR-NOT-OURS"), r.stderr
    assert list(shared.iterdir()) == []
    if os.geteuid() == 0:
        mine = root / "srv" / "users"
        mine.mkdir()
        os.chown(mine, 1000, 1000)
        r = install(root, bundle, "-d", "/srv/users")
        assert (r.returncode, error_id(r)) == (1, "INSTALL-DIR-NOT-OURS"), r.stderr
        assert list(mine.iterdir()) == []


def test_a_dir_that_leads_to_a_system_directory_through_a_link_in_the_root_is_refused(root: Path, bundle: Path) -> None:
    (root / "srv" / "mobility").symlink_to("/opt")  # inside the root: /srv/mobility is /opt
    before = snapshot(root)
    r = install(root, bundle, "-d", "/srv/mobility")
    assert (r.returncode, error_id(r)) == (2, "INSTALL-DIR-INVALID"), r.stderr
    only_the_log_was_written(root, before)


def test_install_marks_its_directory_and_uninstall_removes_only_its_own_names(root: Path, bundle: Path) -> None:
    before = snapshot(root)
    r = install(root, bundle, "-d", "/srv/mobility")
    assert r.returncode == 0, r.stderr
    marker = json.loads((root / "srv/mobility/.mobility-install").read_text())
    assert marker["product"] == "mobility"
    # Someone keeps a file of their own in the install directory afterwards.
    (root / "srv/mobility/NOTES").write_text("mine\n")
    r = uninstall(root)
    assert r.returncode == 0, r.stderr
    done = json.loads(r.stdout)
    assert "/srv/mobility/versions" in done["removed"] and "/srv/mobility/current" in done["removed"]
    assert "/srv/mobility" not in done["removed"]
    assert any("kept /srv/mobility" in note for note in done["kept"])
    assert sorted(p.name for p in (root / "srv/mobility").iterdir()) == ["NOTES"]
    (root / "srv/mobility/NOTES").unlink()
    (root / "srv/mobility").rmdir()
    left = snapshot(root)
    assert {k: v for k, v in left.items() if k in before} == before  # everything that was there stays
    assert {left[k] for k in set(left) - set(before)} <= {"dir"}  # only empty parents the install made


def test_a_new_install_dir_is_removed_whole_at_uninstall(root: Path, bundle: Path) -> None:
    assert install(root, bundle, "-d", "/srv/mobility").returncode == 0
    r = uninstall(root)
    assert "/srv/mobility" in json.loads(r.stdout)["removed"]
    assert not (root / "srv/mobility").exists()
    assert (root / "srv/app/config.yml").exists() and (root / "opt/vendor/data.db").exists()


@pytest.mark.parametrize(
    "poisoned",
    ["/", "/opt", "/srv/app", "/srv/../opt", "relative", "", 42, None, ["/opt"], "/opt/vendor"],
)
def test_a_poisoned_recorded_install_dir_is_never_removed(root: Path, bundle: Path, poisoned: object) -> None:
    assert install(root, bundle).returncode == 0
    agent_json = root / "etc/mobility/agent.json"
    record = json.loads(agent_json.read_text())
    record["install_dir"] = poisoned
    agent_json.write_text(json.dumps(record))
    keep = {k: v for k, v in snapshot(root).items() if k.startswith(("opt", "srv", "usr/lib", "etc/os-release"))}
    r = uninstall(root)
    assert r.returncode == 0, r.stderr
    assert any("left" in note for note in json.loads(r.stdout)["kept"]), r.stdout
    assert {k: v for k, v in snapshot(root).items() if k in keep} == keep
    # The real install directory had the marker, but agent.json no longer names it: it is left too.
    assert installed_version(root) == "versions/0.1.0"


def test_an_install_by_an_earlier_agent_is_adopted_on_upgrade(root: Path, tmp_path: Path) -> None:
    """An agent before the marker left versions/<v>/ (with .complete) and current -> versions/<v>."""
    target = root / "usr/local/mobility"
    (target / "versions/0.0.9/units").mkdir(parents=True)
    (target / "versions/0.0.9/.complete").write_text("0.0.9\n")
    (target / "current").symlink_to("versions/0.0.9")
    r = install(root, unpacked_bundle(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    assert (target / ".mobility-install").is_file()
    assert json.loads((root / "etc/mobility/agent.json").read_text())["previous"] == "0.0.9"
    assert installed_version(root) == "versions/0.1.0"
    r = uninstall(root)
    assert not target.exists(), r.stdout


def test_without_the_marker_uninstall_leaves_the_install_dir_alone_and_says_so(root: Path, bundle: Path) -> None:
    assert install(root, bundle).returncode == 0
    (root / "usr/local/mobility/.mobility-install").unlink()
    before = snapshot(root / "usr/local/mobility")
    r = uninstall(root)
    assert r.returncode == 0, r.stderr
    assert any("no .mobility-install" in note for note in json.loads(r.stdout)["kept"])
    assert snapshot(root / "usr/local/mobility") == before
    r = mobility("uninstall", "-Y", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("removed nothing") and "left /usr/local/mobility alone" in r.stdout


def test_a_partial_marker_from_a_killed_install_does_not_block_the_next(root: Path, bundle: Path) -> None:
    target = root / "usr/local/mobility"
    target.mkdir(parents=True)
    (target / "..mobility-install.k1ll3d.tmp").write_text('{"prod')  # atomic_write's temporary file
    r = install(root, bundle)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in target.iterdir()) == [".mobility-install", "current", "versions"]


def test_relative_install_dir_is_a_usage_error_everywhere(root: Path, bundle: Path) -> None:
    """Before: a traceback (PurePosixPath.relative_to) from install, prereq and bootstrap."""
    for args in (
        ["install", "--bundle", str(bundle), "-r", "MS", "-v", "VmWare", "-q", "-d", "rel"],
        ["prereq", "-d", "rel"],
        ["prereq", "--install-dir", "../x"],
        ["bootstrap", "-i", "127.0.0.1:1", "-P", "/nonexistent", "-d", "rel", "--retry-for", "0"],
    ):
        r = mobility(*args, "--root", str(root), "--json")
        assert (r.returncode, error_id(r)) == (2, "INSTALL-DIR-INVALID"), (args, r.stderr)
        assert json.loads(r.stdout)["error"]["code"] == "INSTALL-DIR-INVALID"
        assert "Traceback" not in r.stderr
    conf = root / "etc/mobility/bootstrap.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("server = 127.0.0.1:1\npassphrase_file = /etc/mobility/passphrase\ninstall_dir = opt/m\n")
    r = mobility("bootstrap", "--root", str(root), "--retry-for", "0")
    assert (r.returncode, error_id(r)) == (2, "INSTALL-DIR-INVALID"), r.stderr
    assert "bootstrap.conf" in r.stderr
    conf.write_text("server = 127.0.0.1:1\npassphrase_file = /etc/mobility/passphrase\ninstall_dir = /opt\n")
    r = mobility("bootstrap", "--root", str(root), "--retry-for", "0")
    assert (r.returncode, error_id(r)) == (2, "INSTALL-DIR-INVALID"), r.stderr


def test_uninstall_without_install_and_twice_is_harmless(root: Path, bundle: Path) -> None:
    before = snapshot(root)
    r = uninstall(root)
    assert (r.returncode, json.loads(r.stdout)["removed"]) == (0, [])
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k in before} == before
    assert {after[k] for k in set(after) - set(before)} <= {"dir"}  # /var/lib: where its lock was
    assert install(root, bundle).returncode == 0
    assert uninstall(root).returncode == 0
    r = uninstall(root)
    assert (r.returncode, json.loads(r.stdout)["removed"]) == (0, [])
