"""Prerequisite checks against real block devices: loop devices, partition tables, ext4 filesystems."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from agent.host.paths import Paths
from agent.lifecycle.check_report import Status
from agent.lifecycle.prereq.prerequisites import BootDisk, FreeSpace
from tests.conftest import DISTROS, REPO, require_root

pytestmark = pytest.mark.integration


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout.strip()


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    require_root()
    with ExitStack() as s:
        yield s


def loop_device(stack: ExitStack, image: Path, size_mib: int) -> str:
    with image.open("wb") as f:
        f.truncate(size_mib * 1024 * 1024)
    dev = sh("losetup", "--find", "--show", str(image))
    stack.callback(sh, "losetup", "--detach", dev)
    return dev


def mount_ext4(stack: ExitStack, dev: str, where: Path) -> None:
    sh("mkfs.ext4", "-q", "-F", dev)
    where.mkdir(parents=True, exist_ok=True)
    sh("mount", dev, str(where))
    stack.callback(sh, "umount", str(where))


def test_too_little_free_space_on_a_small_filesystem(stack: ExitStack, tmp_path: Path) -> None:
    root = tmp_path / "root"
    dev = loop_device(stack, tmp_path / "small.img", 64)
    mount_ext4(stack, dev, root / "usr" / "local")
    r = FreeSpace(Paths(root).install_dir("/usr/local/mobility"), "/usr/local/mobility").run()
    assert r.status is Status.FAIL and "MiB free" in r.message

    # The same through the command line, as a user would run it.
    (root / "etc").mkdir()
    (root / "etc" / "os-release").write_text((DISTROS / "ubuntu22" / "etc" / "os-release").read_text())
    out = subprocess.run(
        [sys.executable, "-m", "agent", "prereq", "--json", "--root", str(root)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert out.returncode == 3
    free = next(c for c in json.loads(out.stdout)["checks"] if c["id"] == "PRQ-FREE-SPACE")
    assert free["status"] == "FAIL"


def test_boot_with_efi_on_the_same_disk_passes(stack: ExitStack, tmp_path: Path) -> None:
    # This kernel does not scan partitions of loop devices (no /dev/loopNpM), so one disk holds both
    # /boot and /boot/efi as directories; partitions are covered by the sysfs walk in test_disks.py.
    root = tmp_path / "root"
    dev = loop_device(stack, tmp_path / "disk.img", 48)
    mount_ext4(stack, dev, root / "boot")
    (root / "boot" / "efi").mkdir()
    r = BootDisk(Paths(root)).run()
    assert (r.status, r.value) == (Status.PASS, Path(dev).name)


def test_boot_and_efi_on_two_disks_fail(stack: ExitStack, tmp_path: Path) -> None:
    root = tmp_path / "root"
    a = loop_device(stack, tmp_path / "a.img", 48)
    b = loop_device(stack, tmp_path / "b.img", 48)
    mount_ext4(stack, a, root / "boot")
    mount_ext4(stack, b, root / "boot" / "efi")
    r = BootDisk(Paths(root)).run()
    assert r.status is Status.FAIL
    assert Path(a).name in r.message and Path(b).name in r.message


def test_no_block_device_under_boot_is_a_warning(stack: ExitStack, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "boot").mkdir(parents=True)
    sh("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root / "boot"))
    stack.callback(sh, "umount", str(root / "boot"))
    assert BootDisk(Paths(root)).run().status is Status.WARN
