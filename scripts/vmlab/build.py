"""Build and cache lab images (`image(recipe)`): a raw disk with the default install's layout, made with debootstrap
from Debian's packages on first use and kept in .cache/vmlab/<name>-<recipe hash>/.

The host kernel here has neither device-mapper nor a partition-table parser, so nothing is activated or probed on
the host: every partition and logical volume is a loop device at its byte offset (`losetup -o --sizelimit`), LVM
runs with activation off and a filter that shows it only the PV's loop device, and GRUB's core image is embedded
with the guest's own grub-mkimage and grub-bios-setup (GRUB reads the GPT itself). Parallel callers wait for the
one that builds (a lock per image); a build that was killed is swept (its mounts and loop devices) by the next."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.vmlab.host import Undo, VmLabError, locked, run, sweep
from scripts.vmlab.recipe import DEBOOTSTRAP_INCLUDE, ENABLED_UNITS, MIRROR, Recipe, grub_cfg, guest_files

REPO = Path(__file__).resolve().parent.parent.parent
CACHE = REPO / ".cache" / "vmlab"
MIB = 1 << 20
SECTOR = 512
log = logging.getLogger("vmlab.build")

# GPT type GUIDs: BIOS boot, Linux filesystem, Linux LVM.
_BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
_LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
_LVM = "E6D6D379-F507-44C2-A23C-238F2A3DF928"
CHROOT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "DEBCONF_NONINTERACTIVE_SEEN": "true", "LC_ALL": "C.UTF-8"}


@dataclass(frozen=True)
class Image:
    """A built image: its raw disk (never written: VMs boot qcow2 overlays over it), the SSH key its root accepts,
    and what the build recorded (``info``: recipe, UUIDs, kernel, timings)."""

    recipe: Recipe
    directory: Path

    @property
    def disk(self) -> Path:
        return self.directory / "disk.raw"

    @property
    def ssh_key(self) -> Path:
        return self.directory / "id_ed25519"

    @property
    def info(self) -> dict[str, Any]:
        return dict(json.loads((self.directory / "image.json").read_text()))

    @property
    def use_lock(self) -> Path:
        """Held shared by every VM that boots from this image (`prune` removes only images nobody holds)."""
        return self.directory.parent / f"{self.directory.name}.use.lock"


def image(recipe: Recipe, progress: Callable[[str], None] = log.info, cache: Path = CACHE) -> Image:
    """The cached image of ``recipe``, built first if there is none (the others that ask meanwhile wait). ``cache``:
    another cache directory (its own package cache too: a benchmark's cold build)."""
    final = cache / recipe.cache_name
    if not (final / ".complete").exists():
        with locked(cache / f"{recipe.cache_name}.build.lock"):
            if not (final / ".complete").exists():
                _build(recipe, final, progress)
    return Image(recipe, final)


def cached(recipe: Recipe) -> Image | None:
    final = CACHE / recipe.cache_name
    return Image(recipe, final) if (final / ".complete").exists() else None


def prune(keep: set[str]) -> list[str]:
    """Remove cached images whose name is not in ``keep`` and that no VM uses now; returns what was removed."""
    removed = []
    for entry in sorted(CACHE.glob("*/.complete")):
        directory = entry.parent
        if directory.name in keep:
            continue
        with locked(CACHE / f"{directory.name}.use.lock", wait=False) as free:
            if free:
                shutil.rmtree(directory)
                removed.append(directory.name)
    return removed


def _build(recipe: Recipe, final: Path, progress: Callable[[str], None]) -> None:
    work = final.parent / f"{recipe.cache_name}.build"
    for leftover in sweep(work):
        progress(f"swept a killed build's {leftover}")
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    work.mkdir(parents=True)
    timings: dict[str, float] = {}
    start = time.monotonic()
    undo = Undo()
    try:
        info = _make_disk(recipe, work, undo, progress, timings)
    finally:
        undo.close()
    timings["total_s"] = round(time.monotonic() - start, 1)
    info["timings"] = timings
    (work / "image.json").write_text(json.dumps(info, indent=2) + "\n")
    (work / "mnt").rmdir()
    shutil.rmtree(work / "debs")  # links: the suite's shared directory holds the packages
    (work / "disk.raw").chmod(0o444)
    os.rename(work, final)
    (final / ".complete").touch()
    progress(f"{recipe.name}: built in {timings['total_s']:.0f} s into {final}")


def _link_debs(source: Path, target: Path) -> None:
    """Hard links in ``target`` of the packages in ``source`` it lacks (one filesystem: the lab's cache). A link is
    made whole or not at all, so two builds linking the same package at once both end with it; apt and debootstrap
    check each package against the suite's signed index before they use it."""
    target.mkdir(parents=True, exist_ok=True)
    for deb in source.glob("*.deb"):
        with contextlib.suppress(FileExistsError):
            os.link(deb, target / deb.name)


def _timed(timings: dict[str, float], name: str, start: float) -> None:
    timings[name] = round(time.monotonic() - start, 1)


def _make_disk(
    recipe: Recipe, work: Path, undo: Undo, progress: Callable[[str], None], timings: dict[str, float]
) -> dict[str, Any]:
    disk = work / "disk.raw"
    with disk.open("xb") as raw:
        raw.truncate(recipe.disk_mib * MIB)
    boot_size = recipe.boot_mib * MIB
    table = (
        "label: gpt\n"
        f"start=2048, size=2048, type={_BIOS_BOOT}, name=bios\n"
        f"size={boot_size // SECTOR}, type={_LINUX}, name=boot\n"
        f"type={_LVM}, name=lvm\n"
    )
    run(["sfdisk", "--quiet", str(disk)], stdin=table)
    parts = json.loads(run(["sfdisk", "--json", str(disk)]).stdout)["partitiontable"]["partitions"]
    (_, boot, pv) = ((p["start"] * SECTOR, p["size"] * SECTOR) for p in parts)

    whole = undo.loop(disk)
    boot_loop = undo.loop(disk, *boot)
    pv_loop = undo.loop(disk, *pv)
    boot_uuid = str(uuid.uuid4())
    run(["mkfs.ext4", "-q", "-F", "-U", boot_uuid, "-L", "boot", boot_loop], timeout=300)

    lvm = _Lvm(pv_loop)
    lvm("pvcreate", "--yes", pv_loop)
    lvm("vgcreate", "--yes", "vg0", pv_loop)
    lvm("lvcreate", "--yes", "-an", "-Zn", "-L", f"{recipe.root_mib}m", "-n", "root", "vg0")
    lvm("lvcreate", "--yes", "-an", "-Zn", "-L", f"{recipe.swap_mib}m", "-n", "swap", "vg0")
    volumes = lvm.volumes()
    root_loop = undo.loop(disk, pv[0] + volumes["root"][0], volumes["root"][1])
    swap_loop = undo.loop(disk, pv[0] + volumes["swap"][0], volumes["swap"][1])
    run(["mkfs.xfs", "-q", "-f", *recipe.xfs_options, root_loop], timeout=300)
    run(["mkswap", "--label", "swap", swap_loop])

    mnt = work / "mnt"
    undo.mount([root_loop], mnt)
    undo.mount([boot_loop], mnt / "boot")

    # The suite's packages are fetched once for all its images, but each build works on hard links of them in a
    # directory of its own (apt locks the directory it downloads into, and fails at once on another build's lock) and
    # links what it fetched back: builds of two images run side by side.
    shared_debs = work.parent / f"debs-{recipe.suite}"
    debs = work / "debs"
    _link_debs(shared_debs, debs)
    progress(f"{recipe.name}: debootstrap {recipe.suite}")
    t = time.monotonic()
    run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(DEBOOTSTRAP_INCLUDE)}",
            f"--cache-dir={debs}",
            recipe.suite,
            str(mnt),
            MIRROR,
        ],
        timeout=1800,
    )
    (debs / "partial").mkdir(exist_ok=True)
    _timed(timings, "debootstrap_s", t)

    for path, (mode, text) in guest_files(recipe, boot_uuid).items():
        target = mnt / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)
    policy = mnt / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")  # nothing starts inside the build's chroot
    policy.chmod(0o755)

    for what, argv in (
        ("proc", ["-t", "proc", "proc"]),
        ("sys", ["-t", "sysfs", "sysfs"]),
        ("dev", ["--bind", "/dev"]),
        ("dev/pts", ["-t", "devpts", "devpts"]),
        ("var/cache/apt/archives", ["--bind", str(debs)]),
    ):
        undo.mount(argv, mnt / what)

    def chroot(*argv: str, stdin: str | None = None, timeout: float = 600) -> str:
        return run(["chroot", str(mnt), *argv], stdin=stdin, timeout=timeout, env=CHROOT_ENV).stdout

    # No disk to install GRUB to from inside the chroot: the build embeds it itself, below.
    chroot(
        "debconf-set-selections",
        stdin="grub-pc grub-pc/install_devices multiselect\ngrub-pc grub-pc/install_devices_empty boolean true\n",
    )
    progress(f"{recipe.name}: apt-get install {' '.join(recipe.all_packages)}")
    t = time.monotonic()
    apt = ("apt-get", "-o", "APT::Sandbox::User=root", "-o", "Dpkg::Use-Pty=0")
    chroot(*apt, "update", timeout=600)
    chroot(*apt, "install", "-y", "--no-install-recommends", *recipe.all_packages, timeout=1800)
    _link_debs(debs, shared_debs)
    _timed(timings, "apt_s", t)
    for unit in ENABLED_UNITS:
        chroot("systemctl", "enable", unit)

    # GRUB, as the guest's own grub-install would place it: modules and core.img in /boot/grub/i386-pc, boot.img in
    # the MBR, core.img in the BIOS boot partition (grub-bios-setup finds it in the GPT).
    grub_dir = mnt / "boot/grub/i386-pc"
    grub_dir.mkdir(parents=True, exist_ok=True)
    for f in (mnt / "usr/lib/grub/i386-pc").iterdir():
        if f.suffix in (".mod", ".lst", ".img", ".o") or f.name == "modinfo.sh":
            shutil.copy2(f, grub_dir / f.name)
    chroot(
        "grub-mkimage",
        "-O",
        "i386-pc",
        "-p",
        "(hd0,gpt2)/grub",
        "-o",
        "/boot/grub/i386-pc/core.img",
        "biosdisk",
        "part_gpt",
        "ext2",
    )
    chroot("/usr/lib/grub/i386-pc/grub-bios-setup", "--skip-fs-probe", "-d", "/boot/grub/i386-pc", whole)
    (mnt / "boot/grub/grub.cfg").write_text(grub_cfg(boot_uuid))

    key = work / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"vmlab-{recipe.name}", "-f", str(key)])
    ssh = mnt / "root/.ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    (ssh / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
    (ssh / "authorized_keys").chmod(0o600)

    kernels = sorted(p.name.removeprefix("vmlinuz-") for p in (mnt / "boot").glob("vmlinuz-*"))
    versions = chroot("dpkg-query", "-W", "-f", "${Package} ${Version}\n", *recipe.all_packages)
    machine_id = (mnt / "etc/machine-id").read_text().strip()
    policy.unlink()
    for leftover in (mnt / "var/lib/apt/lists").glob("*_*"):
        leftover.unlink()  # the package lists: ~50 MB the guest cannot use without a network
    return {
        "recipe": recipe.name,
        "suite": recipe.suite,
        "os_tag": recipe.os_tag,
        "key": recipe.key(),
        "boot_uuid": boot_uuid,
        "machine_id": machine_id,
        "kernels": kernels,
        "packages": dict(line.split(" ", 1) for line in versions.splitlines() if " " in line),
        "layout": {"disk_mib": recipe.disk_mib, "boot_mib": recipe.boot_mib, **lvm.summary()},
    }


class _Lvm:
    """LVM on the build host without device-mapper: activation off, no udev, no devices file, no backups in the
    host's /etc/lvm, and a filter that shows it the one PV's loop device only."""

    def __init__(self, pv: str) -> None:
        self.pv = pv
        self.config = (
            "global{activation=0} activation{udev_sync=0 udev_rules=0} backup{backup=0 archive=0} "
            f'devices{{obtain_device_list_from_udev=0 use_devicesfile=0 filter=["a|^{pv}$|","r|.*|"]}}'
        )

    def __call__(self, *argv: str) -> str:
        env = {"LVM_SUPPRESS_FD_WARNINGS": "1"}
        return run(["lvm", argv[0], "--config", self.config, *argv[1:]], env=env).stdout

    def volumes(self) -> dict[str, tuple[int, int]]:
        """name -> (byte offset inside the PV, size) of each logical volume: linear, one segment each."""
        pe_start = int(self("pvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start", self.pv))
        extent = int(self("vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_extent_size", "vg0"))
        found: dict[str, tuple[int, int]] = {}
        for line in self("lvs", "--noheadings", "--segments", "-o", "lv_name,seg_pe_ranges", "vg0").splitlines():
            if not line.strip():
                continue
            name, ranges = line.split()
            device, _, span = ranges.rpartition(":")
            first, last = (int(n) for n in span.split("-"))
            if device != self.pv or name in found:
                raise VmLabError(f"logical volume {name} is not one linear segment on {self.pv}: {line.strip()}")
            found[name] = (pe_start + first * extent, (last - first + 1) * extent)
        return found

    def summary(self) -> dict[str, int]:
        free = int(self("vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_free", "vg0"))
        sizes = {name: size for name, (_, size) in self.volumes().items()}
        return {"root_bytes": sizes["root"], "swap_bytes": sizes["swap"], "vg0_free_bytes": free}
