"""The freeze provider has one verdict: what its set-up recorded; health and status read it (issue 13)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.daemon.health.self_checks import FreezeProvider
from agent.daemon.status_commands import local_health
from agent.host.paths import Paths
from agent.lifecycle.check_report import Status
from agent.lifecycle.freeze import FreezeSetup, check_freezable, install_provider, load_setup, mount_of, provider_status

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:21 / /proc rw - proc proc rw
30 22 0:26 / /var/lib/docker rw - overlay overlay rw
31 22 8:2 / /srv/data\\040disk rw - xfs /dev/sda2 rw
32 22 0:27 / /tmp rw - tmpfs tmpfs rw
"""


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/", ("/", "ext4")),
        ("/etc/mobility", ("/", "ext4")),
        ("/proc/self", ("/proc", "proc")),
        ("/var/lib/docker/x", ("/var/lib/docker", "overlay")),
        ("/var/lib/dockerfile", ("/", "ext4")),  # a prefix of the name is not the mount above it
        ("/srv/data disk/db", ("/srv/data disk", "xfs")),  # \040 is a space in mountinfo
        ("/tmp", ("/tmp", "tmpfs")),
    ],
)
def test_mount_of(path: str, expected: tuple[str, str]) -> None:
    assert mount_of(MOUNTINFO, path) == expected


def test_mount_of_skips_lines_it_cannot_read() -> None:
    assert mount_of("garbage\n\n1 2 3 - \n", "/") is None
    assert mount_of("36 35 98:0 /mnt1 /mnt2 rw\n", "/mnt2") is None  # no " - " separator: not a mount line


def test_check_freezable_judges_the_filesystem_type_and_the_user() -> None:
    assert check_freezable(Paths(Path("/srv/data disk")), MOUNTINFO, 0) == FreezeSetup(
        True, "/srv/data disk (xfs) supports FIFREEZE"
    )
    assert not check_freezable(Paths(Path("/var/lib/docker/r")), MOUNTINFO, 0).ready
    assert check_freezable(Paths(Path("/")), MOUNTINFO, 1000) == FreezeSetup(
        False, "freezing filesystems needs root (CAP_SYS_ADMIN)"
    )


def test_health_agrees_with_install_when_the_hooks_directory_stays(tmp_path: Path) -> None:
    """An operator's hook keeps freeze.d in place on a filesystem that cannot be frozen (or without root): install
    says not ready, and so must health, though the directory exists (it used to say ready)."""
    paths = Paths(tmp_path)
    (tmp_path / "etc/mobility/freeze.d").mkdir(parents=True)
    (tmp_path / "etc/mobility/freeze.d/10-db").write_text("#!/bin/sh\n")
    (tmp_path / "var/lib/mobility").mkdir(parents=True)
    on_tmpfs = MOUNTINFO + f"40 22 0:30 / {tmp_path} rw - tmpfs tmpfs rw\n"  # as root: only the type says no
    setup = install_provider(paths, lambda p: check_freezable(p, on_tmpfs, 0))
    assert setup == FreezeSetup(False, f"{tmp_path} is tmpfs, which cannot be frozen (no FIFREEZE)")
    assert load_setup(paths) == setup and paths.freeze_dir.is_dir()
    _, report = local_health(paths)
    (freeze,) = [r for r in report.results if r.id == "HLT-FREEZE"]
    assert freeze.status is Status.WARN and setup.reason in freeze.message


def test_health_re_checks_the_hooks_directory_and_says_never_set_up(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    assert provider_status(paths) == FreezeSetup(False, "never set up on this machine")
    (tmp_path / "var/lib/mobility").mkdir(parents=True)
    paths.freeze_dir.mkdir(parents=True)
    from agent.lifecycle.freeze import save_setup

    save_setup(paths, FreezeSetup(True, "/ (ext4) supports FIFREEZE"))
    assert provider_status(paths).ready
    assert FreezeProvider(provider_status(paths)).run().status is Status.PASS
    paths.freeze_dir.rmdir()
    status = provider_status(paths)
    assert not status.ready and "removed" in status.reason
    assert FreezeProvider(status).run().status is Status.WARN


def test_a_set_up_that_cannot_be_recorded_is_not_ready_as_health_will_say(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    (tmp_path / "var/lib").mkdir(parents=True)
    (tmp_path / "var/lib/mobility").write_text("a file where the state directory goes")
    setup = install_provider(paths, lambda p: FreezeSetup(True, "/ (ext4) supports FIFREEZE"))
    assert not setup.ready and "cannot record the set-up" in setup.reason
    assert not provider_status(paths).ready
