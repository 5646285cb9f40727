"""Map a system to its OS tag: gather what the release files say (I/O), then classify (pure)."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import distro

from agent.errors import OsKernelTooOld, OsUnknown, OsUnsupported, ReleaseFilesConflict, ReleaseFileUnreadable
from agent.host.distros import matrix
from agent.host.distros.release_files import (
    legacy_id,
    numeric_version,
    parse_debian_version,
    parse_lsb_release,
    parse_suse_release,
)
from agent.host.libc import root_arch
from agent.host.os_release import OS_RELEASE_LOCATIONS, read_os_release
from agent.host.paths import Paths
from agent.host.textfile import MAX_TEXT_FILE, read_small_text

# What detection reads of a root, for a reader that must mirror a remote host first (push, server/push/inspect.py):
# these files, any file matching the globs (the redhat-style /etc/*-release that `distro` looks for), each up to
# MAX_RELEASE_FILE bytes, and the head of agent.host.libc's ARCH_PROBES binaries (their ELF header names the
# architecture).
RELEASE_FILES = (*OS_RELEASE_LOCATIONS, "/etc/SuSE-release", "/etc/lsb-release", "/etc/debian_version")
RELEASE_GLOBS = ("/etc/*-release", "/etc/*_version")
MAX_RELEASE_FILE = MAX_TEXT_FILE


@dataclass(frozen=True)
class OsFacts:
    """What a system's release files say, unjudged."""

    os_release: dict[str, str] | None = None
    os_release_path: str | None = None
    release_file: dict[str, str] | None = None  # first line of /etc/<name>-release, as `distro` parses it
    release_file_path: str | None = None
    suse_release: dict[str, str] | None = None
    lsb_release: dict[str, str] | None = None
    debian_version: str | None = None
    system_release: dict[str, str] | None = None  # /etc/system-release, the last resort (Amazon Linux)
    windows: bool = False
    arch: str = "unknown"


@dataclass(frozen=True)
class OsInfo:
    """A supported system: its OS tag and what it was recognised from."""

    os_tag: str
    id: str
    version: str
    pretty_name: str
    arch: str
    family: str
    init: str
    source: str
    supported: bool = True  # False: a known tag whose oldest release's kernel is below the runtime's floor

    def to_json(self) -> dict[str, str | bool]:
        return asdict(self)


@dataclass(frozen=True)
class _Identity:
    id: str
    version: str
    pretty_name: str
    source: str


# Pure -------------------------------------------------------------------------------


def classify(facts: OsFacts) -> OsInfo:
    """The OS tag of a system described by ``facts``; raises OsUnknown/OsUnsupported/ReleaseFilesConflict."""
    ident = _identify(facts)
    _check_consistent(ident, facts)
    row = matrix.lookup(ident.id, numeric_version(ident.version) or ())
    if row is None:
        version = ident.version or "no version"
        raise OsUnsupported(
            f"unsupported system: found {ident.pretty_name} (id {ident.id!r}, version {version!r}, "
            f"from {ident.source}).\nSupported systems:\n{matrix.supported_list()}"
        )
    return OsInfo(
        os_tag=row.tag,
        id=ident.id,
        version=ident.version,
        pretty_name=ident.pretty_name,
        arch=facts.arch,
        family=row.family.value,
        init=row.init.value,
        source=ident.source,
        supported=row.supported,
    )


def require_supported(info: OsInfo) -> OsInfo:
    """``info`` if a bundle runs on its OS tag; OsKernelTooOld for the tags detected but refused (RHEL6, SLES11...)."""
    row = matrix.BY_TAG[info.os_tag]
    if not row.supported:
        raise OsKernelTooOld(f"{info.pretty_name} is {row.tag}, which is detected but refused: {row.refusal}")
    return info


def _identify(facts: OsFacts) -> _Identity:
    osr = facts.os_release
    if osr and osr.get("ID"):
        os_id = osr["ID"].strip().lower()
        if os_id == "rhel":
            # Rebuilds (Scientific Linux 7) borrow ID=rhel; their NAME says who they are.
            os_id = legacy_id(osr.get("NAME", ""), os_id)
        version = osr.get("VERSION_ID", "").strip()
        source = facts.os_release_path or "/etc/os-release"
        if not version and os_id == "debian" and numeric_version(facts.debian_version):
            # Debian point releases without VERSION_ID in os-release still say it here.
            version, source = facts.debian_version or "", f"{source} + /etc/debian_version"
        pretty = osr.get("PRETTY_NAME") or " ".join(filter(None, (osr.get("NAME", os_id), osr.get("VERSION"))))
        return _Identity(os_id, version, pretty, source)
    if facts.suse_release and facts.suse_release.get("VERSION"):
        s = facts.suse_release
        name = s.get("NAME", "SUSE")
        version = s["VERSION"] + (f".{s['PATCHLEVEL']}" if s.get("PATCHLEVEL") else "")
        return _Identity(legacy_id(name, "suse"), version, name, "/etc/SuSE-release")
    rel = facts.release_file
    if rel and rel.get("name"):
        fallback = rel.get("id", "unknown")
        pretty = " ".join(filter(None, (rel["name"], rel.get("version_id"))))
        return _Identity(
            legacy_id(rel["name"], fallback),
            rel.get("version_id", ""),
            pretty,
            facts.release_file_path or "/etc/*-release",
        )
    lsb = facts.lsb_release
    if lsb and lsb.get("DISTRIB_ID"):
        pretty = lsb.get("DISTRIB_DESCRIPTION") or f"{lsb['DISTRIB_ID']} {lsb.get('DISTRIB_RELEASE', '')}".strip()
        return _Identity(lsb["DISTRIB_ID"].lower(), lsb.get("DISTRIB_RELEASE", ""), pretty, "/etc/lsb-release")
    sysrel = facts.system_release
    if sysrel and sysrel.get("name"):
        pretty = " ".join(filter(None, (sysrel["name"], sysrel.get("version_id"))))
        return _Identity(
            legacy_id(sysrel["name"], "unknown"), sysrel.get("version_id", ""), pretty, "/etc/system-release"
        )
    if facts.debian_version:
        return _Identity("debian", facts.debian_version, f"Debian {facts.debian_version}", "/etc/debian_version")
    if facts.windows:
        raise OsUnsupported(
            "found Windows: Windows Server is in the seed's support table, but this agent targets "
            f"Linux first and does not support Windows yet.\nSupported systems:\n{matrix.supported_list()}"
        )
    raise OsUnknown(
        "no release file found: looked for /etc/os-release, /usr/lib/os-release, /etc/*-release, "
        "/etc/SuSE-release, /etc/lsb-release and /etc/debian_version (each missing or empty)"
    )


def _check_consistent(ident: _Identity, facts: OsFacts) -> None:
    """Refuse to guess when two release files disagree on the major version."""
    others: list[tuple[str, str | None]] = []
    if ident.id == "debian":
        others.append(("/etc/debian_version", facts.debian_version))
    elif ident.id == "ubuntu" and facts.lsb_release:
        lsb_id = facts.lsb_release.get("DISTRIB_ID", "")
        if lsb_id.lower() not in ("", "ubuntu"):
            # A derivative (Linux Mint 17) that kept Ubuntu's os-release but says who it is here.
            raise ReleaseFilesConflict(
                f"{ident.source} says {ident.pretty_name} but /etc/lsb-release says "
                f"{facts.lsb_release.get('DISTRIB_DESCRIPTION') or lsb_id}: an Ubuntu derivative, not Ubuntu"
            )
        others.append(("/etc/lsb-release", facts.lsb_release.get("DISTRIB_RELEASE")))
    elif ident.id in ("sles", "sles_sap") and facts.suse_release:
        others.append(("/etc/SuSE-release", facts.suse_release.get("VERSION")))
    elif facts.release_file and legacy_id(facts.release_file.get("name", ""), "") == ident.id:
        others.append((facts.release_file_path or "/etc/*-release", facts.release_file.get("version_id")))
    mine = numeric_version(ident.version)
    for path, text in others:
        theirs = numeric_version(text)
        if mine and theirs and mine[0] != theirs[0] and path not in ident.source:
            raise ReleaseFilesConflict(
                f"{ident.source} says {ident.pretty_name} (version {ident.version}) but {path} says {text}"
            )


# I/O --------------------------------------------------------------------------------


def gather_facts(paths: Paths) -> OsFacts:
    """Read every release file the root holds; missing files are None, unreadable ones raise."""
    found = read_os_release(paths)
    suse = read_small_text(paths, "/etc/SuSE-release")
    lsb = read_small_text(paths, "/etc/lsb-release")
    debian = read_small_text(paths, "/etc/debian_version")
    release_file, release_path = _distro_release_file(paths)
    system_release, _ = _distro_release_file(paths, "/etc/system-release")
    is_root_fs = paths.root == paths.root.parent  # "/": the running machine
    return OsFacts(
        os_release=found[1] if found else None,
        os_release_path=found[0] if found else None,
        release_file=release_file,
        release_file_path=release_path,
        suse_release=parse_suse_release(suse) if suse else None,
        lsb_release=parse_lsb_release(lsb) if lsb else None,
        debian_version=parse_debian_version(debian) if debian else None,
        system_release=system_release,
        windows=any((paths.root / d / "System32").is_dir() for d in ("Windows", "WINDOWS", "windows")),
        arch=platform.machine() if is_root_fs else (root_arch(paths) or "unknown"),
    )


def _distro_release_file(paths: Paths, only: str | None = None) -> tuple[dict[str, str] | None, str | None]:
    """The first redhat-style /etc/<name>-release (or just ``only``), found and parsed by `distro`."""
    if only is not None and not paths.resolve(only).is_file():
        return None, None
    dist = distro.LinuxDistribution(
        root_dir=str(paths.root),
        include_lsb=False,
        include_uname=False,
        include_oslevel=False,
        distro_release_file=str(paths.resolve(only)) if only else "",
    )
    try:
        info = dist.distro_release_info()
    except (UnicodeDecodeError, OSError) as e:
        where = dist.distro_release_file or "/etc/*-release"
        raise ReleaseFileUnreadable(f"cannot read {where}: not a text release file ({e})") from e
    if not info.get("name"):
        return None, None
    host = dist.distro_release_file
    return dict(info), ("/" + str(Path(host).relative_to(paths.root))) if host else None


def detect_os(paths: Paths) -> OsInfo:
    """The OS tag of the system at ``paths.root``."""
    return classify(gather_facts(paths))
