from __future__ import annotations

import shutil
from pathlib import Path

from agent.checks import Status, run_checks
from agent.distros import gather_facts
from agent.paths import Paths
from agent.prereq import prerequisite_checks
from agent.prereq.checks import FreeSpace, GlibcFloor, GrubDeviceNames, InitSystem, RootUser, detect_init
from tests.conftest import DISTROS


def test_root_user() -> None:
    assert RootUser(0).run().status is Status.PASS
    r = RootUser(1000).run()
    assert r.status is Status.FAIL and "uid 1000" in r.message and r.remediation


def test_free_space_threshold(tmp_path: Path) -> None:
    assert FreeSpace(tmp_path / "not" / "yet", "/usr/local/mobility", minimum=1).run().status is Status.PASS
    r = FreeSpace(tmp_path, "/usr/local/mobility", minimum=1 << 62).run()
    assert r.status is Status.FAIL and r.threshold


def test_glibc_floor_against_this_machine() -> None:
    root = Paths(Path("/"))
    assert GlibcFloor(root, "2.17").run().status is Status.PASS
    r = GlibcFloor(root, "9.99").run()
    assert r.status is Status.FAIL and "older than the floor 9.99" in r.message


def test_init_systems_of_real_layouts(tmp_path: Path) -> None:
    systemd = tmp_path / "systemd"
    (systemd / "lib" / "systemd").mkdir(parents=True)
    (systemd / "lib" / "systemd" / "systemd").write_text("")
    (systemd / "sbin").mkdir()
    (systemd / "sbin" / "init").symlink_to("/lib/systemd/systemd")
    assert detect_init(Paths(systemd))[0] == "systemd"

    sysv = tmp_path / "sysv"
    (sysv / "sbin").mkdir(parents=True)
    (sysv / "sbin" / "init").write_text("")
    (sysv / "etc" / "init.d").mkdir(parents=True)
    assert detect_init(Paths(sysv))[0] == "sysv"
    # A systemd-era OS tag on a SysV-only root: the bundle could not drive it.
    shutil.copytree(DISTROS / "debian12", sysv, dirs_exist_ok=True, symlinks=True)
    r = InitSystem(Paths(sysv), gather_facts(Paths(sysv))).run()
    assert r.status is Status.FAIL and "DEBIAN12 bundle drives systemd" in r.message


def test_grub_check_reads_the_files_that_exist(tmp_path: Path) -> None:
    assert GrubDeviceNames(Paths(tmp_path)).run().status is Status.UNKNOWN
    (tmp_path / "etc" / "default").mkdir(parents=True)
    (tmp_path / "etc" / "default" / "grub").write_text('GRUB_CMDLINE_LINUX="resume=UUID=1234"\n')
    assert GrubDeviceNames(Paths(tmp_path)).run().status is Status.PASS
    (tmp_path / "boot" / "grub").mkdir(parents=True)
    (tmp_path / "boot" / "grub" / "menu.lst").write_text("title x\n\tkernel /vmlinuz root=/dev/hda1\n")
    r = GrubDeviceNames(Paths(tmp_path)).run()
    assert r.status is Status.FAIL and "/boot/grub/menu.lst:2 root=/dev/hda1" in r.message


def test_a_check_that_crashes_is_unknown_not_pass() -> None:
    class Broken:
        id = "PRQ-TEST"
        title = "broken"
        remediation = "none"

        def run(self) -> None:
            raise OSError("boom")

    report = run_checks([Broken()])  # type: ignore[list-item]
    assert report.results[0].status is Status.UNKNOWN and "boom" in report.results[0].message


def test_non_root_user_fails_the_report() -> None:
    report = run_checks(prerequisite_checks(Paths(DISTROS / "debian11"), euid=1000))
    assert report.failed
    assert report.results[0].status is Status.FAIL
