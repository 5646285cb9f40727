from __future__ import annotations

import shutil
from pathlib import Path

from agent.host.distros import gather_facts
from agent.host.paths import Paths
from agent.lifecycle.check_report import Status, run_checks
from agent.lifecycle.prereq.prerequisites import (
    FreeSpace,
    GrubDeviceNames,
    InitSystem,
    KernelFloor,
    RootUser,
    SupportedOs,
    detect_init,
    installed_kernels,
    prerequisite_checks,
)
from tests.conftest import DISTROS


def test_root_user() -> None:
    assert RootUser(0).run().status is Status.PASS
    r = RootUser(1000).run()
    assert r.status is Status.FAIL and "uid 1000" in r.message and r.remediation


def test_free_space_threshold(tmp_path: Path) -> None:
    assert FreeSpace(tmp_path / "not" / "yet", "/usr/local/mobility", minimum=1).run().status is Status.PASS
    r = FreeSpace(tmp_path, "/usr/local/mobility", minimum=1 << 62).run()
    assert r.status is Status.FAIL and r.threshold


def test_kernel_floor_on_the_running_machine() -> None:
    root = Paths(Path("/"))
    r = KernelFloor(root, "3.2").run()  # this machine's own kernel, read from /proc
    assert (r.status, r.threshold) == (Status.PASS, "3.2") and r.value and r.value in r.message
    r = KernelFloor(root, "3.2", release="3.1.0-old").run()
    assert r.status is Status.FAIL and r.remediation
    assert r.message == "Linux 3.1.0-old is older than 3.2, the oldest kernel the agent's bundled C library runs on"
    assert KernelFloor(root, "3.2", release="3.2.0-4-amd64").run().status is Status.PASS  # Debian 7
    assert KernelFloor(root, "3.2", release="2.6.32-754.el6.x86_64").run().status is Status.FAIL  # RHEL 6
    assert KernelFloor(root, None).run().status is Status.UNKNOWN
    assert KernelFloor(root, "3.2", release="not-a-kernel").run().status is Status.UNKNOWN


def test_kernel_floor_under_a_root_judges_its_installed_kernels(tmp_path: Path) -> None:
    root = Paths(tmp_path)
    r = KernelFloor(root, "3.2").run()  # never the running kernel: it is not the root's
    assert r.status is Status.UNKNOWN and "cannot tell" in r.message
    for release in ("5.10.0-28-amd64", "4.19.0-27-amd64"):
        (tmp_path / "lib" / "modules" / release).mkdir(parents=True)
    (tmp_path / "lib" / "modules" / "README").write_text("not a kernel\n")
    assert installed_kernels(root) == ["4.19.0-27-amd64", "5.10.0-28-amd64"]
    assert KernelFloor(root, "3.2").run().status is Status.PASS
    assert KernelFloor(root, "5.0").run().status is Status.WARN  # it may boot the old one
    r = KernelFloor(root, "6.1").run()
    assert r.status is Status.FAIL and "4.19.0-27-amd64, 5.10.0-28-amd64" in r.message


def test_refused_tags_fail_the_os_check_with_their_reason() -> None:
    r = SupportedOs(gather_facts(Paths(DISTROS / "centos6"))).run()
    assert r.status is Status.FAIL
    assert r.message.startswith("OS-KERNEL-TOO-OLD: CentOS 6.7 is RHEL6, which is detected but refused")
    assert "Linux 2.6.32, older than 3.2" in r.message
    assert SupportedOs(gather_facts(Paths(DISTROS / "centos7"))).run().status is Status.PASS


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
