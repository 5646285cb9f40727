"""The support matrix: one table of data, the only place distributions are listed."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from agent.host.runtime import kernel_version

# The oldest kernel the frozen programs' bundled C library runs on (glibc >= 2.26 on x86_64: 3.2). packaging/build
# reads the real value from the bundled libc's ABI note and refuses to build when it is newer than this.
RUNTIME_KERNEL_FLOOR = "3.2"


class Family(StrEnum):
    RHEL = "rhel"
    ORACLE = "oracle"
    SUSE = "suse"
    UBUNTU = "ubuntu"
    DEBIAN = "debian"


class Init(StrEnum):
    """The init system a bundle for the tag ships units or scripts for."""

    SYSTEMD = "systemd"
    SYSV = "sysv"  # SysV init scripts; also run by upstart's rc compatibility (RHEL 6, Ubuntu 14.04)


@dataclass(frozen=True)
class Row:
    """One OS tag: which distribution IDs and versions map to it."""

    tag: str
    family: Family
    ids: frozenset[str]  # os-release ID values (legacy files are normalised to these)
    major: int
    minors: tuple[int, int] | None  # inclusive range of minor versions; None accepts any
    init: Init
    default_repo: bool  # shipped in the default repository (else placed by an operator, as in the seed)
    systems: str
    oldest_kernel: str  # the kernel of the oldest release this row accepts (its GA kernel)

    @property
    def supported(self) -> bool:
        """Whether a bundle runs on every release of the row: its oldest kernel is at or above the runtime's floor."""
        return (kernel_version(self.oldest_kernel) or (0, 0)) >= (kernel_version(RUNTIME_KERNEL_FLOOR) or (0, 0))

    @property
    def built_by_default(self) -> bool:
        """Built by `packaging/build` without --tags and shipped in the default repository."""
        return self.default_repo and self.supported

    @property
    def refusal(self) -> str:
        """Why the row is refused ("" when it is supported)."""
        if self.supported:
            return ""
        return (
            f"its oldest release runs Linux {self.oldest_kernel}, older than {RUNTIME_KERNEL_FLOOR}, "
            "the oldest kernel the agent's bundled C library runs on"
        )

    def matches(self, os_id: str, version: tuple[int, ...]) -> bool:
        if os_id not in self.ids or not version or version[0] != self.major:
            return False
        if self.minors is None:
            return True
        minor = version[1] if len(version) > 1 else 0
        return self.minors[0] <= minor <= self.minors[1]


_RH = frozenset({"rhel", "centos"})
_RH_NEW = _RH | {"rocky", "almalinux"}
_OL = frozenset({"ol"})
_SLES = frozenset({"sles", "sles_sap"})
_UB = frozenset({"ubuntu"})
_DEB = frozenset({"debian"})

SUPPORT_MATRIX: tuple[Row, ...] = (
    Row("RHEL5", Family.RHEL, _RH, 5, None, Init.SYSV, False, "Red Hat Enterprise Linux 5, CentOS 5", "2.6.18"),
    Row("RHEL6", Family.RHEL, _RH, 6, None, Init.SYSV, True, "Red Hat Enterprise Linux 6, CentOS 6", "2.6.32"),
    Row("RHEL7", Family.RHEL, _RH, 7, None, Init.SYSTEMD, True, "Red Hat Enterprise Linux 7, CentOS 7", "3.10.0"),
    Row(
        "RHEL8",
        Family.RHEL,
        _RH_NEW,
        8,
        None,
        Init.SYSTEMD,
        True,
        "Red Hat Enterprise Linux 8, CentOS 8, Rocky Linux 8, AlmaLinux 8",
        "4.18.0",
    ),
    Row(
        "RHEL9",
        Family.RHEL,
        _RH_NEW,
        9,
        None,
        Init.SYSTEMD,
        True,
        "Red Hat Enterprise Linux 9, CentOS Stream 9, Rocky Linux 9, AlmaLinux 9",
        "5.14.0",
    ),
    Row("OL6", Family.ORACLE, _OL, 6, (4, 99), Init.SYSV, True, "Oracle Linux 6.4 and later 6.x", "2.6.32"),
    Row("OL7", Family.ORACLE, _OL, 7, None, Init.SYSTEMD, True, "Oracle Linux 7", "3.8.13"),
    Row("OL8", Family.ORACLE, _OL, 8, None, Init.SYSTEMD, True, "Oracle Linux 8", "4.18.0"),
    Row("OL9", Family.ORACLE, _OL, 9, None, Init.SYSTEMD, True, "Oracle Linux 9", "5.14.0"),
    Row(
        "SLES11-SP3", Family.SUSE, _SLES, 11, (3, 3), Init.SYSV, False, "SUSE Linux Enterprise Server 11 SP3", "3.0.76"
    ),
    Row(
        "SLES11-SP4", Family.SUSE, _SLES, 11, (4, 4), Init.SYSV, True, "SUSE Linux Enterprise Server 11 SP4", "3.0.101"
    ),
    Row(
        "SLES12",
        Family.SUSE,
        _SLES,
        12,
        (1, 5),
        Init.SYSTEMD,
        True,
        "SUSE Linux Enterprise Server 12 SP1-SP5",
        "3.12.49",
    ),
    Row(
        "SLES15",
        Family.SUSE,
        _SLES,
        15,
        None,
        Init.SYSTEMD,
        True,
        "SUSE Linux Enterprise Server 15 (any SP)",
        "4.12.14",
    ),
    Row("UBUNTU-14.04", Family.UBUNTU, _UB, 14, (4, 4), Init.SYSV, True, "Ubuntu 14.04 LTS", "3.13.0"),
    Row("UBUNTU-16.04", Family.UBUNTU, _UB, 16, (4, 4), Init.SYSTEMD, True, "Ubuntu 16.04 LTS", "4.4.0"),
    Row("UBUNTU-18.04", Family.UBUNTU, _UB, 18, (4, 4), Init.SYSTEMD, True, "Ubuntu 18.04 LTS", "4.15.0"),
    Row("UBUNTU-20.04", Family.UBUNTU, _UB, 20, (4, 4), Init.SYSTEMD, True, "Ubuntu 20.04 LTS", "5.4.0"),
    Row("UBUNTU-22.04", Family.UBUNTU, _UB, 22, (4, 4), Init.SYSTEMD, True, "Ubuntu 22.04 LTS", "5.15.0"),
    Row("UBUNTU-24.04", Family.UBUNTU, _UB, 24, (4, 4), Init.SYSTEMD, True, "Ubuntu 24.04 LTS", "6.8.0"),
    Row("DEBIAN7", Family.DEBIAN, _DEB, 7, None, Init.SYSV, False, "Debian 7 (wheezy)", "3.2.0"),
    Row("DEBIAN8", Family.DEBIAN, _DEB, 8, None, Init.SYSTEMD, True, "Debian 8 (jessie)", "3.16.0"),
    Row("DEBIAN9", Family.DEBIAN, _DEB, 9, None, Init.SYSTEMD, True, "Debian 9 (stretch)", "4.9.0"),
    Row("DEBIAN10", Family.DEBIAN, _DEB, 10, None, Init.SYSTEMD, True, "Debian 10 (buster)", "4.19.0"),
    Row("DEBIAN11", Family.DEBIAN, _DEB, 11, None, Init.SYSTEMD, True, "Debian 11 (bullseye)", "5.10.0"),
    Row("DEBIAN12", Family.DEBIAN, _DEB, 12, None, Init.SYSTEMD, True, "Debian 12 (bookworm)", "6.1.0"),
)

SUPPORTED_ARCHES = frozenset({"x86_64"})

BY_TAG: dict[str, Row] = {row.tag: row for row in SUPPORT_MATRIX}


def lookup(os_id: str, version: tuple[int, ...]) -> Row | None:
    """The row for a distribution ID and numeric version, or None when unsupported."""
    return next((row for row in SUPPORT_MATRIX if row.matches(os_id, version)), None)


def supported_list() -> str:
    """The supported systems, one line per tag, then the refused ones with their oldest kernel (for messages)."""
    supported = "\n".join(f"  {row.tag:<13} {row.systems}" for row in SUPPORT_MATRIX if row.supported)
    refused = "\n".join(
        f"  {row.tag:<13} {row.systems} (Linux {row.oldest_kernel})" for row in SUPPORT_MATRIX if not row.supported
    )
    return (
        f"{supported}\nDetected but refused (the oldest release runs a kernel older than {RUNTIME_KERNEL_FLOOR}, "
        f"the floor of the agent's bundled C library):\n{refused}"
    )
