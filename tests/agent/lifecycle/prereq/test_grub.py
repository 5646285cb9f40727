"""GRUB command lines. The configurations are hand-made in the formats grub-mkconfig and GRUB legacy
write (no real grub.cfg ships in the release-file tree); each mirrors a stock install of its system."""

from __future__ import annotations

from agent.lifecycle.prereq.grub import device_name_references

DEBIAN_GRUB_CFG = """\
### BEGIN /etc/grub.d/10_linux ###
function gfxmode {
\tset gfxpayload="${1}"
}
set linux_gfx_mode=
menuentry 'Debian GNU/Linux' --class debian --class gnu-linux --class gnu --class os {
\tload_video
\tinsmod part_gpt
\tinsmod ext2
\tset root='hd0,gpt1'
\tsearch --no-floppy --fs-uuid --set=root 5f2a1b3c-1d2e-4f50-9a6b-7c8d9e0f1a2b
\techo\t'Loading Linux 6.1.0-18-amd64 ...'
\tlinux\t/boot/vmlinuz-6.1.0-18-amd64 root=UUID=5f2a1b3c-1d2e-4f50-9a6b-7c8d9e0f1a2b ro  quiet
\tinitrd\t/boot/initrd.img-6.1.0-18-amd64
}
"""

CENTOS6_MENU_LST = """\
default=0
timeout=5
title CentOS (2.6.32-431.el6.x86_64)
\troot (hd0,0)
\tkernel /vmlinuz-2.6.32-431.el6.x86_64 ro root=/dev/sda2 rd_NO_LUKS LANG=en_US.UTF-8 resume=/dev/sda3 quiet
\tinitrd /initramfs-2.6.32-431.el6.x86_64.img
"""

RHEL8_DEFAULT_GRUB = """\
GRUB_TIMEOUT=5
GRUB_DISTRIBUTOR="$(sed 's, release .*$,,g' /etc/system-release)"
GRUB_CMDLINE_LINUX="crashkernel=auto resume=/dev/mapper/rhel-swap rd.lvm.lv=rhel/root rd.lvm.lv=rhel/swap"
GRUB_DISABLE_RECOVERY="true"
"""


def test_uuid_root_and_set_root_are_fine() -> None:
    assert device_name_references(DEBIAN_GRUB_CFG) == []


def test_device_names_on_legacy_kernel_line() -> None:
    refs = device_name_references(CENTOS6_MENU_LST)
    assert [(r.line, r.param, r.value) for r in refs] == [(5, "root", "/dev/sda2"), (5, "resume", "/dev/sda3")]


def test_lvm_mapper_names_are_stable() -> None:
    assert device_name_references(RHEL8_DEFAULT_GRUB) == []


def test_default_grub_with_kernel_names() -> None:
    text = 'GRUB_CMDLINE_LINUX_DEFAULT="quiet resume=/dev/nvme0n1p3"\nGRUB_CMDLINE_LINUX="root=/dev/xvda1"\n'
    assert [r.value for r in device_name_references(text)] == ["/dev/nvme0n1p3", "/dev/xvda1"]


def test_label_partuuid_and_by_uuid_paths_are_fine() -> None:
    text = (
        "\tlinux /vmlinuz root=LABEL=root resume=PARTUUID=0a1b-02\n"
        "\tlinux16 /vmlinuz root=/dev/disk/by-uuid/5f2a ro\n"
        "\tlinuxefi /vmlinuz root=/dev/vg0/root\n"
    )
    assert device_name_references(text) == []
