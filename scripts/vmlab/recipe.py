"""What a lab image is made of, as data: the Debian release, the packages, the disk layout and every file the build
writes into the guest. The image cache is keyed by a hash of all of it (`Recipe.key`), so changing any of it makes
a new image and never reuses a stale one. Pure: no I/O here."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

# Bumped when the build procedure itself (build.py) changes in a way the recipe's data does not show.
BUILD_REVISION = 1

MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"

# In every image: systemd as init with D-Bus (logind powers off on the ACPI power button the lab presses), the tools
# the tests drive the guest with, the default install's boot and storage stack, and an SSH server.
DEBOOTSTRAP_INCLUDE = ("systemd-sysv", "udev", "dbus", "iproute2", "ca-certificates", "kmod", "procps", "less")
BASE_PACKAGES = (
    "linux-image-amd64",
    "grub-pc",
    "lvm2",
    "xfsprogs",
    "openssh-server",
    "util-linux",
    "trace-cmd",
)

GUEST_ADDRESS_OF_HOST = "10.0.2.100"  # where a guest reaches the host's forwarded ports (guestfwd)
BOOT_MARKER = "VMLAB-BOOTED"
HOSTNAME_FW_CFG = "opt/vmlab/hostname"  # a per-VM host name, as a hypervisor's customisation would set it


@dataclass(frozen=True)
class Recipe:
    """A Debian image with the default install's layout: GPT, a BIOS boot partition, /boot on ext4, and an LVM PV
    holding vg0/swap and vg0/root (XFS), with free extents left in vg0 for snapshots.

    ``packages`` are what the guest gets on top of `BASE_PACKAGES` (a variant, e.g. PostgreSQL: `with_packages`)."""

    name: str
    suite: str
    os_tag: str
    packages: tuple[str, ...] = ()
    disk_mib: int = 4096
    boot_mib: int = 512
    swap_mib: int = 256
    root_mib: int = 2304  # of the ~3.5 GiB PV: ~1 GiB of vg0 stays free for snapshots
    xfs_options: tuple[str, ...] = ()  # mkfs.xfs options: the root this release's own installer would make

    def with_packages(self, suffix: str, *packages: str) -> Recipe:
        """A variant: the same image plus ``packages``, cached under its own name (``<name>-<suffix>``)."""
        return dataclasses.replace(self, name=f"{self.name}-{suffix}", packages=(*self.packages, *packages))

    @property
    def all_packages(self) -> tuple[str, ...]:
        return (*BASE_PACKAGES, *self.packages)

    def key(self) -> str:
        """The cache key: a hash of the recipe, every file the build writes into the guest, and the build revision."""
        doc = {
            "recipe": dataclasses.asdict(self),
            "include": DEBOOTSTRAP_INCLUDE,
            "base": BASE_PACKAGES,
            "files": guest_files(self, boot_uuid="BOOT-UUID"),
            "revision": BUILD_REVISION,
            "mirrors": [MIRROR, SECURITY_MIRROR],
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def cache_name(self) -> str:
        return f"{self.name}-{self.key()}"


DEBIAN12 = Recipe("debian12", "bookworm", "DEBIAN12")
# Root made as Debian 11's installer (xfsprogs 5.10) would have made it: without the features bookworm's mkfs.xfs
# turns on by default.
DEBIAN11 = Recipe("debian11", "bullseye", "DEBIAN11", xfs_options=("-m", "bigtime=0,inobtcount=0"))
RECIPES = {r.name: r for r in (DEBIAN12, DEBIAN11)}


def sources_list(recipe: Recipe) -> str:
    security = f"{recipe.suite}-security" if recipe.suite != "buster" else f"{recipe.suite}/updates"
    return (
        f"deb {MIRROR} {recipe.suite} main\n"
        f"deb {MIRROR} {recipe.suite}-updates main\n"
        f"deb {SECURITY_MIRROR} {security} main\n"
    )


def grub_cfg(boot_uuid: str) -> str:
    """A hand-written grub.cfg (grub-mkconfig needs device-mapper on the build host): the serial console, /boot found
    by its UUID, root on the LV by its /dev/mapper name as the Debian installer's own configuration names it."""
    return f"""\
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
set default=0
set timeout=0
insmod part_gpt
insmod ext2
search --no-floppy --fs-uuid --set=root {boot_uuid}
menuentry 'Debian GNU/Linux' {{
    linux /vmlinuz root=/dev/mapper/vg0-root ro console=ttyS0,115200 quiet
    initrd /initrd.img
}}
"""


def fstab(boot_uuid: str) -> str:
    return f"""\
# <file system> <mount point> <type> <options> <dump> <pass>
/dev/mapper/vg0-root / xfs defaults 0 0
UUID={boot_uuid} /boot ext4 defaults 0 2
/dev/mapper/vg0-swap none swap sw 0 0
"""


_BOOTED_SCRIPT = f"""\
#!/bin/sh
# The lab's boot marker: the host waits for this line on the serial console.
echo "{BOOT_MARKER} uptime=$(cut -d' ' -f1 /proc/uptime) boot_id=$(cat /proc/sys/kernel/random/boot_id)" > /dev/ttyS0
"""

_HOSTNAME_SCRIPT = f"""\
#!/bin/sh
# A host name the hypervisor gives this VM (qemu -fw_cfg name={HOSTNAME_FW_CFG}), as a customisation spec would.
modprobe qemu_fw_cfg 2>/dev/null
f=/sys/firmware/qemu_fw_cfg/by_name/{HOSTNAME_FW_CFG}/raw
[ -r "$f" ] || exit 0
name=$(head -c 63 "$f" | tr -cd 'a-z0-9-')
[ -n "$name" ] || exit 0
hostname "$name"
echo "$name" > /etc/hostname
"""


def guest_files(recipe: Recipe, boot_uuid: str) -> dict[str, tuple[int, str]]:
    """path in the guest -> (mode, text): everything the build writes besides what the packages install."""
    return {
        "/etc/apt/sources.list": (0o644, sources_list(recipe)),
        "/etc/fstab": (0o644, fstab(boot_uuid)),
        "/etc/hostname": (0o644, f"{recipe.name}\n"),
        "/etc/hosts": (0o644, f"127.0.0.1 localhost\n127.0.1.1 {recipe.name}\n"),
        "/etc/resolv.conf": (0o644, "nameserver 10.0.2.3\n"),
        # The kernel's links in /boot: GRUB reads them from the /boot partition.
        "/etc/kernel-img.conf": (0o644, "do_symlinks = yes\nlink_in_boot = yes\n"),
        # Every module: the image boots on whatever virtual hardware the lab gives it; no resume device to wait for.
        "/etc/initramfs-tools/conf.d/vmlab": (0o644, "MODULES=most\nRESUME=none\n"),
        "/etc/systemd/network/20-wired.network": (0o644, "[Match]\nName=en*\n\n[Network]\nDHCP=ipv4\n"),
        # network-online.target waits for one link, boundedly (an isolated VM may have none that gets online).
        "/etc/systemd/system/systemd-networkd-wait-online.service.d/vmlab.conf": (
            0o644,
            "[Service]\nExecStart=\nExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=30\n",
        ),
        "/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf": (
            0o644,
            "[Service]\nExecStart=\n"
            "ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 %I $TERM\n",
        ),
        "/usr/local/sbin/vmlab-booted": (0o755, _BOOTED_SCRIPT),
        "/etc/systemd/system/vmlab-booted.service": (
            0o644,
            "[Unit]\nDescription=vmlab: boot marker on the serial console\nAfter=multi-user.target\n\n"
            "[Service]\nType=oneshot\nExecStart=/usr/local/sbin/vmlab-booted\n\n"
            "[Install]\nWantedBy=multi-user.target\n",
        ),
        "/usr/local/sbin/vmlab-hostname": (0o755, _HOSTNAME_SCRIPT),
        "/etc/systemd/system/vmlab-hostname.service": (
            0o644,
            "[Unit]\nDescription=vmlab: the host name the hypervisor gives this VM\nDefaultDependencies=no\n"
            "After=local-fs.target systemd-modules-load.service\nBefore=network-pre.target sysinit.target\n"
            "Wants=network-pre.target\n\n"
            "[Service]\nType=oneshot\nExecStart=/usr/local/sbin/vmlab-hostname\n\n"
            "[Install]\nWantedBy=sysinit.target\n",
        ),
        "/etc/ssh/sshd_config.d/vmlab.conf": (0o644, "PermitRootLogin prohibit-password\nUseDNS no\n"),
        "/etc/systemd/journald.conf.d/vmlab.conf": (0o644, "[Journal]\nStorage=persistent\n"),
    }


# Units the build enables (links made in the chroot, as `systemctl enable` would) and masks.
ENABLED_UNITS = ("systemd-networkd.service", "vmlab-booted.service", "vmlab-hostname.service")
