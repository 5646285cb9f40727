"""The prerequisite checks of DESIGN.md, each a small object with a stable ID."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from agent.host.distros import SUPPORTED_ARCHES, Init, OsFacts, OsInfo, classify, gather_facts, require_supported
from agent.host.paths import Paths
from agent.host.runtime import kernel_version, running_kernel, running_kernel_floor
from agent.host.textfile import read_small_text
from agent.lifecycle.check_report import Check, Result, Status
from agent.lifecycle.prereq import DEFAULT_INSTALL_DIR, MIN_FREE_BYTES
from agent.lifecycle.prereq.disks import SYS, backing_disks
from agent.lifecycle.prereq.grub import GRUB_FILES, device_name_references
from agent.shared.errors import MobilityError

GRUB_MAX_BYTES = 4 * 1024 * 1024  # a grub.cfg with many kernels is tens of KiB


@dataclass(frozen=True)
class RootUser:
    euid: int
    id: ClassVar[str] = "PRQ-ROOT-USER"
    title: ClassVar[str] = "running as root"
    remediation: ClassVar[str] = "Run the command as root (sudo)."

    def run(self) -> Result:
        if self.euid == 0:
            return Result(self.id, Status.PASS, "running as root")
        return Result(self.id, Status.FAIL, f"running as uid {self.euid}, not root", self.remediation)


@dataclass(frozen=True)
class SupportedOs:
    facts: OsFacts | MobilityError
    id: ClassVar[str] = "PRQ-OS"
    title: ClassVar[str] = "supported operating system"
    remediation: ClassVar[str] = "Install on a system of the support matrix (`mobility detect-os` lists it)."

    def run(self) -> Result:
        info = _classified(self.facts)
        if isinstance(info, OsInfo) and not info.supported:
            try:
                require_supported(info)
            except MobilityError as e:
                info = e
        if isinstance(info, MobilityError):
            first = info.message.splitlines()[0]
            return Result(self.id, Status.FAIL, f"{info.code}: {first}", info.fix)
        return Result(self.id, Status.PASS, f"{info.pretty_name}: OS tag {info.os_tag}", value=info.os_tag)


@dataclass(frozen=True)
class Architecture:
    facts: OsFacts | MobilityError
    id: ClassVar[str] = "PRQ-ARCH"
    title: ClassVar[str] = "64-bit x86 machine"
    remediation: ClassVar[str] = "Mobility ships x86_64 bundles only; protect this machine from an x86_64 system."

    def run(self) -> Result:
        if isinstance(self.facts, MobilityError) or self.facts.arch == "unknown":
            return Result(
                self.id,
                Status.UNKNOWN,
                "architecture unknown: no binaries found in the root",
                self.remediation,
            )
        arch = self.facts.arch
        if arch in SUPPORTED_ARCHES:
            return Result(self.id, Status.PASS, f"architecture {arch}", value=arch)
        return Result(
            self.id,
            Status.FAIL,
            f"architecture {arch} is not supported (x86_64 only)",
            self.remediation,
            value=arch,
            threshold="x86_64",
        )


@dataclass(frozen=True)
class FreeSpace:
    install_dir: Path
    system_path: str
    minimum: int = MIN_FREE_BYTES
    id: ClassVar[str] = "PRQ-FREE-SPACE"
    title: ClassVar[str] = "free space at the install location"
    remediation: ClassVar[str] = (
        "Free at least 100 MiB on the filesystem of the install directory, or choose another with -d."
    )

    def run(self) -> Result:
        probe = self.install_dir
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        st = os.statvfs(probe)
        free = st.f_bavail * st.f_frsize
        mib = free // (1024 * 1024)
        value, threshold = f"{mib} MiB", f"{self.minimum // (1024 * 1024)} MiB"
        if free >= self.minimum:
            return Result(
                self.id,
                Status.PASS,
                f"{mib} MiB free for {self.system_path}",
                value=value,
                threshold=threshold,
            )
        return Result(
            self.id,
            Status.FAIL,
            f"only {mib} MiB free for {self.system_path}; {threshold} needed",
            self.remediation,
            value=value,
            threshold=threshold,
        )


@dataclass(frozen=True)
class KernelFloor:
    """The kernel against the floor of the agent's C library (bundled with the frozen programs: its ABI note).

    On the running machine that is the running kernel (``release`` stands in for it in tests). Under --root the
    root's kernel is not running: the kernels installed in it (/lib/modules) are judged, else the check says
    UNKNOWN."""

    paths: Paths
    floor: str | None
    release: str | None = None
    id: ClassVar[str] = "PRQ-KERNEL"
    title: ClassVar[str] = "kernel at or above the floor of the agent's C library"
    remediation: ClassVar[str] = (
        "Run the agent on a kernel at or above the floor in the message (a supported release, "
        "docs/support-matrix.md); older kernels cannot run its bundled C library."
    )

    def run(self) -> Result:
        need = kernel_version(self.floor or "")
        if need is None:
            return Result(
                self.id,
                Status.UNKNOWN,
                f"the kernel floor of the C library is unknown ({self.floor!r})",
                self.remediation,
            )
        floor = f"{need[0]}.{need[1]}"
        if self.paths.root == self.paths.root.parent:
            release = self.release or running_kernel()
            have = kernel_version(release)
            if have is None:
                return Result(self.id, Status.UNKNOWN, f"kernel release {release!r} is not a version", self.remediation)
            if have >= need:
                return Result(self.id, Status.PASS, f"Linux {release} (floor {floor})", value=release, threshold=floor)
            return Result(
                self.id,
                Status.FAIL,
                f"Linux {release} is older than {floor}, the oldest kernel the agent's bundled C library runs on",
                self.remediation,
                value=release,
                threshold=floor,
            )
        installed = installed_kernels(self.paths)
        if not installed:
            return Result(
                self.id,
                Status.UNKNOWN,
                f"no kernel installed in {self.paths.root} (/lib/modules) and the running kernel is not its own: "
                f"cannot tell whether it runs Linux {floor} or newer",
                self.remediation,
                threshold=floor,
            )
        old = [k for k in installed if (kernel_version(k) or (0, 0)) < need]
        listed = ", ".join(installed)
        if not old:
            return Result(
                self.id, Status.PASS, f"kernels installed in the root: {listed} (floor {floor})", threshold=floor
            )
        status = Status.FAIL if len(old) == len(installed) else Status.WARN
        return Result(
            self.id,
            status,
            f"kernels installed in the root older than {floor}, the oldest kernel the agent's bundled C library runs "
            f"on: {', '.join(old)} (of {listed})",
            self.remediation,
            value=listed,
            threshold=floor,
        )


def installed_kernels(paths: Paths) -> list[str]:
    """The releases of the kernels installed in a root (the directories of /lib/modules and /usr/lib/modules)."""
    found: set[str] = set()
    for where in ("/lib/modules", "/usr/lib/modules"):
        host = paths.resolve(where)
        if host.is_dir():
            found |= {p.name for p in host.iterdir() if p.is_dir() and kernel_version(p.name)}
    return sorted(found, key=lambda k: (kernel_version(k), k))


def detect_init(paths: Paths) -> tuple[Init | None, str]:
    """The init system of the root: for the running machine what PID 1 is, else what is installed."""
    if paths.root == paths.root.parent:
        comm = Path("/proc/1/comm").read_text().strip() if Path("/proc/1/comm").exists() else "?"
        if Path("/run/systemd/system").is_dir():
            return Init.SYSTEMD, "systemd is PID 1"
        if comm == "init" and (Path("/etc/inittab").exists() or Path("/etc/init").is_dir()):
            return Init.SYSV, "SysV-compatible init is PID 1"
        return None, f"PID 1 is {comm!r}, not an init system (a container?)"
    init = paths.resolve("/sbin/init")
    systemd = next(
        (p for p in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd") if paths.resolve(p).is_file()), None
    )
    if systemd and (init.name == "systemd" or not init.exists()):
        return Init.SYSTEMD, f"systemd installed ({systemd})"
    if init.is_file():
        if paths.resolve("/sbin/initctl").is_file() and paths.resolve("/etc/init").is_dir():
            return Init.SYSV, "upstart installed; it runs SysV init scripts"
        if paths.resolve("/etc/init.d").is_dir():
            return Init.SYSV, "SysV init installed"
    return None, "no init system found (/sbin/init, systemd)"


@dataclass(frozen=True)
class InitSystem:
    paths: Paths
    facts: OsFacts | MobilityError
    id: ClassVar[str] = "PRQ-INIT"
    title: ClassVar[str] = "an init system the agent can drive"
    remediation: ClassVar[str] = "Boot the system with systemd (or SysV init on the systems that predate it)."

    def run(self) -> Result:
        init, how = detect_init(self.paths)
        if init is None:
            status = Status.FAIL if self.paths.root == self.paths.root.parent else Status.UNKNOWN
            return Result(self.id, status, how, self.remediation)
        info = _classified(self.facts)
        if isinstance(info, OsInfo) and info.init == Init.SYSTEMD and init is not Init.SYSTEMD:
            return Result(
                self.id,
                Status.FAIL,
                f"{how}, but the {info.os_tag} bundle drives systemd",
                self.remediation,
                value=init.value,
                threshold=info.init,
            )
        return Result(self.id, Status.PASS, how, value=init.value)


@dataclass(frozen=True)
class BootDisk:
    paths: Paths
    sys_dir: Path = SYS
    id: ClassVar[str] = "PRQ-BOOT-DISK"
    title: ClassVar[str] = "boot disk present and single"
    remediation: ClassVar[str] = "Keep /boot (and /boot/efi) on one disk; the boot disk must be a block device."

    def run(self) -> Result:
        if not (self.sys_dir / "dev" / "block").is_dir():
            return Result(
                self.id,
                Status.UNKNOWN,
                f"{self.sys_dir} is not mounted: cannot tell which disks back /boot",
                self.remediation,
            )
        disks: set[str] = set()
        mounts = ["/boot", "/boot/efi"]
        for system_path in mounts:
            host = self.paths(system_path)
            if not host.is_dir():
                host = self.paths.root if system_path == "/boot" else host
                if not host.is_dir():
                    continue
            backing = backing_disks(host.stat().st_dev, self.sys_dir)
            if backing is None:
                return Result(
                    self.id,
                    Status.WARN,
                    f"no block device backs {system_path} (a container or a "
                    "network root?): the boot disk cannot be protected",
                    self.remediation,
                )
            disks |= backing
        if not disks:
            return Result(self.id, Status.FAIL, "no boot disk found", self.remediation)
        if len(disks) > 1:
            return Result(
                self.id,
                Status.FAIL,
                f"/boot and /boot/efi span {len(disks)} disks: {', '.join(sorted(disks))}",
                self.remediation,
                value=",".join(sorted(disks)),
            )
        (disk,) = disks
        return Result(self.id, Status.PASS, f"boot disk {disk}", value=disk)


@dataclass(frozen=True)
class GrubDeviceNames:
    paths: Paths
    id: ClassVar[str] = "PRQ-GRUB-DEVICE-NAMES"
    title: ClassVar[str] = "GRUB names root and resume devices by UUID or LABEL"
    remediation: ClassVar[str] = (
        "Edit the kernel command line to use root=UUID=... / resume=UUID=... (see blkid), then "
        "regenerate grub.cfg (update-grub or grub2-mkconfig)."
    )

    def run(self) -> Result:
        bad: list[str] = []
        seen: list[str] = []
        for system_path in GRUB_FILES:
            try:
                text = read_small_text(self.paths, system_path, limit=GRUB_MAX_BYTES)
            except MobilityError as e:
                return Result(self.id, Status.UNKNOWN, e.message, self.remediation)
            if text is None:
                continue
            seen.append(system_path)
            bad += [f"{system_path}:{r.line} {r.param}={r.value}" for r in device_name_references(text)]
        if not seen:
            return Result(
                self.id,
                Status.UNKNOWN,
                "no GRUB configuration found (" + ", ".join(GRUB_FILES) + ")",
                self.remediation,
            )
        if bad:
            return Result(
                self.id,
                Status.FAIL,
                "kernel command line names devices by kernel name: " + "; ".join(bad),
                self.remediation,
            )
        return Result(self.id, Status.PASS, "root= and resume= by UUID/LABEL in " + ", ".join(seen))


def _classified(facts: OsFacts | MobilityError) -> OsInfo | MobilityError:
    if isinstance(facts, MobilityError):
        return facts
    try:
        return classify(facts)
    except MobilityError as e:
        return e


def prerequisite_checks(
    paths: Paths,
    install_dir: str = DEFAULT_INSTALL_DIR,
    kernel_floor: str | None = None,
    euid: int | None = None,
) -> list[Check]:
    """Every prerequisite check for the system at ``paths``, in the order they are shown. ``kernel_floor``: the
    bundle's (bundle.json); by default the one of the C library this agent runs on."""
    facts: OsFacts | MobilityError
    try:
        facts = gather_facts(paths)
    except MobilityError as e:
        facts = e
    return [
        RootUser(os.geteuid() if euid is None else euid),
        SupportedOs(facts),
        Architecture(facts),
        FreeSpace(paths.install_dir(install_dir), install_dir),
        KernelFloor(paths, kernel_floor or running_kernel_floor()),
        InitSystem(paths, facts),
        BootDisk(paths),
        GrubDeviceNames(paths),
    ]
