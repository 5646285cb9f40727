"""Installer bundles: the file-name convention, ``bundle.json`` and verification of a bundle tarball.

The one definition of the bundle wire format, shared by the configuration server (which refuses bad
bundles before publishing them) and the agent (which checks what it is about to install). Parsing is
pure; ``inspect_bundle`` streams the archive once, hashing in chunks, behind a guard (agent/lifecycle/targuard.py) that
bounds every header before tarfile reads it, so memory stays bounded whatever the archive holds. Every message
that echoes the archive's content goes through ``shown`` (quoted, escaped, short).
"""

from __future__ import annotations

import datetime
import gzip
import json
import re
import tarfile
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.host.distros.matrix import BY_TAG, SUPPORTED_ARCHES, Init
from agent.lifecycle.targuard import GuardedStream, TarGuard, TarLimits
from agent.shared.errors import BundleRefused
from agent.shared.fsutil import sha256_stream
from agent.shared.textsafe import shown

MANIFEST_NAME = "bundle.json"
MAX_MANIFEST_BYTES = 1 << 20
# Members, name lengths, extended headers, unpacked size: the frozen agent is ~75 files today and a few hundred
# once it carries its C runtime, against 20,000 members; see TarLimits for the rest.
TAR_LIMITS = TarLimits()

_MAX_LINK_HOPS = 40  # as the kernel's ELOOP limit

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_NAME = re.compile(
    r"Mobility_UA_(?P<version>[0-9]+(?:\.[0-9]+)+)_(?P<tag>[A-Z0-9.-]+)-64_GA_"
    r"(?P<day>[0-9]{2})(?P<month>[A-Za-z]{3})(?P<year>[0-9]{4})_release\.tar\.gz"
)
_VERSION = re.compile(r"[0-9]+(?:\.[0-9]+)+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MANIFEST_KEYS = frozenset({"os_tag", "version", "arch", "init", "kernel_floor", "runtime_glibc", "files"})
_OPTIONAL_KEYS = frozenset({"state_format"})  # absent in the bundles made before it existed: format 1
# The format of the agent's state (/var/lib/mobility, /etc/mobility) that this code writes. A version reads the state
# of its own format and of every older one; one that writes state an older version cannot read raises it. A bundle
# declares it in bundle.json, and an upgrade refuses a version whose format is older than the state on the machine
# (agent/update/beside.py): the way back across a format is not an upgrade.
STATE_FORMAT = 1
MAX_STATE_FORMAT = 1_000_000
_KERNEL = re.compile(r"[0-9]+\.[0-9]+")


@dataclass(frozen=True)
class BundleName:
    """What a bundle's file name says."""

    version: str
    os_tag: str
    date: datetime.date

    @property
    def version_key(self) -> tuple[int, ...]:
        """The version as numbers, for ordering (0.10.0 after 0.9.1)."""
        return version_key(self.version)


@dataclass(frozen=True)
class Manifest:
    """The content of ``bundle.json``."""

    os_tag: str
    version: str
    arch: str
    init: Init
    kernel_floor: str  # the oldest kernel the bundled C library runs on ("3.2")
    runtime_glibc: str  # the glibc release bundled with the frozen agent (informational: the host's is not used)
    files: dict[str, str]  # relative path -> sha256 hex; bundle.json itself is not listed
    state_format: int = 1  # the agent state format the version writes (STATE_FORMAT of its sources)


def version_key(version: str) -> tuple[int, ...]:
    """A dotted version as a tuple of integers."""
    return tuple(int(part) for part in version.split("."))


def bundle_file_name(version: str, os_tag: str, date: datetime.date) -> str:
    """The file name of a bundle (the inverse of ``parse_bundle_name``)."""
    return f"Mobility_UA_{version}_{os_tag}-64_GA_{date.day:02d}{_MONTHS[date.month - 1]}{date.year:04d}_release.tar.gz"


def parse_bundle_name(name: str) -> BundleName:
    """Parse ``Mobility_UA_<version>_<OSTAG>-64_GA_<DDMonYYYY>_release.tar.gz``; BundleRefused if it is not one."""
    m = _NAME.fullmatch(name)
    if m is None:
        raise BundleRefused(
            f"{shown(name)} is not a bundle name: expected "
            "Mobility_UA_<version>_<OSTAG>-64_GA_<DDMonYYYY>_release.tar.gz "
            "(e.g. Mobility_UA_0.1.0_UBUNTU-20.04-64_GA_26Nov2026_release.tar.gz)"
        )
    tag = m["tag"]
    if tag not in BY_TAG:
        raise BundleRefused(f"{name}: OS tag {shown(tag)} is not in the support matrix (known: {', '.join(BY_TAG)})")
    month_name = m["month"]
    if month_name not in _MONTHS:
        raise BundleRefused(f"{name}: month {shown(month_name)} is not one of {', '.join(_MONTHS)}")
    try:
        date = datetime.date(int(m["year"]), _MONTHS.index(month_name) + 1, int(m["day"]))
    except ValueError as e:
        raise BundleRefused(f"{name}: {m['day']}{month_name}{m['year']} is not a real date ({e})") from e
    return BundleName(version=m["version"], os_tag=tag, date=date)


def _require_str(doc: dict[str, Any], key: str) -> str:
    value = doc[key]
    if not isinstance(value, str) or not value:
        got = shown(value) if isinstance(value, str) else type(value).__name__
        raise BundleRefused(f"{MANIFEST_NAME}: {key!r} must be a non-empty string, got {got}")
    return value


def _check_member_path(path: str, what: str) -> str:
    """Normalise an archive path (strip ./) and refuse absolute paths and '..'."""
    if path.startswith("/"):
        raise BundleRefused(f"{what} {shown(path)} is an absolute path")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BundleRefused(f"{what} {shown(path)} has '..' in its path")
    return "/".join(parts)


def parse_manifest(data: bytes) -> Manifest:
    """Parse and validate ``bundle.json`` (types, known OS tag and architecture, hashes); raise BundleRefused."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleRefused(f"{MANIFEST_NAME} is not valid JSON: {shown(str(e))}") from e
    except RecursionError as e:  # 1 MiB of '[' is valid-looking JSON that the decoder cannot nest
        raise BundleRefused(f"{MANIFEST_NAME} nests too deeply to be a bundle manifest") from e
    if not isinstance(doc, dict):
        raise BundleRefused(f"{MANIFEST_NAME} must be a JSON object, got {type(doc).__name__}")
    missing = sorted(_MANIFEST_KEYS - doc.keys())
    if missing:
        raise BundleRefused(f"{MANIFEST_NAME} lacks {', '.join(missing)}")
    unknown = sorted(doc.keys() - _MANIFEST_KEYS - _OPTIONAL_KEYS)
    if unknown:
        listed = ", ".join(shown(key, 60) for key in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise BundleRefused(f"{MANIFEST_NAME} has unknown fields {listed}{more}")
    os_tag = _require_str(doc, "os_tag")
    if os_tag not in BY_TAG:
        raise BundleRefused(f"{MANIFEST_NAME}: os_tag {shown(os_tag)} is not in the support matrix")
    version = _require_str(doc, "version")
    if not _VERSION.fullmatch(version):
        raise BundleRefused(f"{MANIFEST_NAME}: version {shown(version)} is not dotted numbers (e.g. 0.1.0)")
    arch = _require_str(doc, "arch")
    if arch not in SUPPORTED_ARCHES:
        raise BundleRefused(f"{MANIFEST_NAME}: arch {shown(arch)} is not one of {', '.join(sorted(SUPPORTED_ARCHES))}")
    init_name = _require_str(doc, "init")
    try:
        init = Init(init_name)
    except ValueError as e:
        raise BundleRefused(f"{MANIFEST_NAME}: init {shown(init_name)} is not one of {', '.join(Init)}") from e
    if init is not BY_TAG[os_tag].init:
        raise BundleRefused(
            f"{MANIFEST_NAME}: init {shown(init_name)} is wrong for {os_tag}, which uses {BY_TAG[os_tag].init}"
        )
    kernel_floor = _require_str(doc, "kernel_floor")
    if not _KERNEL.fullmatch(kernel_floor):
        raise BundleRefused(f"{MANIFEST_NAME}: kernel_floor {shown(kernel_floor)} is not a kernel version like 3.2")
    runtime_glibc = _require_str(doc, "runtime_glibc")
    if not _VERSION.fullmatch(runtime_glibc):
        raise BundleRefused(f"{MANIFEST_NAME}: runtime_glibc {shown(runtime_glibc)} is not a version like 2.36")
    files = doc["files"]
    if not isinstance(files, dict):
        raise BundleRefused(f"{MANIFEST_NAME}: files must be an object of path -> sha256")
    checked: dict[str, str] = {}
    for path, digest in files.items():
        norm = _check_member_path(path, f"{MANIFEST_NAME}: file")
        if not norm or norm == MANIFEST_NAME:
            raise BundleRefused(f"{MANIFEST_NAME}: file {shown(path)} cannot be listed")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise BundleRefused(f"{MANIFEST_NAME}: hash of {shown(path)} is not 64 lower-case hex digits")
        if norm in checked:
            raise BundleRefused(f"{MANIFEST_NAME}: file {shown(path)} is listed twice")
        checked[norm] = digest
    state_format = doc.get("state_format", 1)
    if isinstance(state_format, bool) or not isinstance(state_format, int) or not 1 <= state_format <= MAX_STATE_FORMAT:
        raise BundleRefused(f"{MANIFEST_NAME}: state_format {shown(str(state_format), 40)} is not a number from 1 up")
    return Manifest(os_tag, version, arch, init, kernel_floor, runtime_glibc, checked, state_format)


def _link_escapes(link: str, links: dict[str, str]) -> bool:
    """Whether symlink ``link`` resolves (through the archive's other symlinks) outside the archive root."""
    stack = link.split("/")[:-1]
    pending = deque(links[link].split("/"))
    hops = 0
    while pending:
        part = pending.popleft()
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                return True
            stack.pop()
            continue
        stack.append(part)
        target = links.get("/".join(stack))
        if target is not None:
            hops += 1
            if hops > _MAX_LINK_HOPS or target.startswith("/"):
                return True
            stack.pop()
            pending.extendleft(reversed(target.split("/")))
    return False


def inspect_bundle(path: Path, name: str | None = None) -> tuple[BundleName, Manifest]:
    """Check a bundle tarball completely without extracting it; raise BundleRefused with the reason.

    ``name`` is the bundle's file name when ``path`` is a temporary copy. Refused: a bad name, members
    with absolute paths or '..', links that lead outside the bundle, device files and FIFOs, duplicate
    members, a missing, oversized or invalid bundle.json, one that disagrees with the name, any
    regular file whose sha256 differs from bundle.json or that is missing from or extra to it, and an
    archive out of the bounds of TAR_LIMITS (refused from its headers, before tarfile reads them).
    """
    name = name if name is not None else path.name
    bundle_name = parse_bundle_name(name)
    try:
        manifest, hashes = _scan(path)
    except BundleRefused as e:
        raise BundleRefused(f"{name}: {e.message}") from e
    except (OSError, EOFError, zlib.error, tarfile.TarError) as e:
        raise BundleRefused(f"{name}: not a readable gzip-compressed tar archive ({shown(str(e))})") from e
    problems = []
    if manifest.os_tag != bundle_name.os_tag:
        problems.append(f"bundle.json says os_tag {manifest.os_tag} but the name says {bundle_name.os_tag}")
    if manifest.version != bundle_name.version:
        problems.append(f"bundle.json says version {manifest.version} but the name says {bundle_name.version}")
    for member in sorted(manifest.files.keys() - hashes.keys()):
        problems.append(f"{shown(member)} is listed in bundle.json but missing from the archive")
    for member in sorted(hashes.keys() - manifest.files.keys()):
        problems.append(f"{shown(member)} is in the archive but not listed in bundle.json")
    for member in sorted(hashes.keys() & manifest.files.keys()):
        if hashes[member] != manifest.files[member]:
            problems.append(f"{shown(member)} has sha256 {hashes[member]}, bundle.json says {manifest.files[member]}")
    if problems:
        listed = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise BundleRefused(f"{name}: {listed}")
    return bundle_name, manifest


def _scan(path: Path) -> tuple[Manifest, dict[str, str]]:
    """One streaming pass: member checks, hashes of regular files, the parsed manifest."""
    # "r|": a plain tar stream, read forwards only; the guard has seen each header before tarfile parses it.
    with (
        path.open("rb") as raw,
        gzip.GzipFile(fileobj=raw, mode="rb") as gz,
        tarfile.open(fileobj=GuardedStream(gz, TarGuard(TAR_LIMITS)), mode="r|") as tar,
    ):
        return _scan_members(tar)


def _scan_members(tar: tarfile.TarFile) -> tuple[Manifest, dict[str, str]]:
    hashes: dict[str, str] = {}
    kinds: dict[str, str] = {}
    symlinks: dict[str, str] = {}
    manifest: Manifest | None = None
    for member in tar:
        rel = _check_member_path(member.name, "member")
        if not rel:
            if member.isdir():
                continue
            raise BundleRefused(f"member {shown(member.name)} has an empty path")
        kind = "dir" if member.isdir() else "other"
        if rel in kinds and not (kind == "dir" and kinds[rel] == "dir"):
            raise BundleRefused(f"member {shown(rel)} appears twice")
        if member.isdir():
            pass
        elif member.issym():
            symlinks[rel] = member.linkname
        elif member.islnk():
            target = _check_member_path(member.linkname, f"hard link {shown(rel)} to")
            if target not in hashes:
                raise BundleRefused(
                    f"hard link {shown(rel)} points to {shown(member.linkname)}, not an earlier regular file"
                )
            hashes[rel] = hashes[target]
        elif member.isreg():
            f = tar.extractfile(member)
            if f is None:  # pragma: no cover - isreg() members always have data
                raise BundleRefused(f"member {shown(rel)} cannot be read")
            if rel == MANIFEST_NAME:
                if member.size > MAX_MANIFEST_BYTES:
                    raise BundleRefused(f"{MANIFEST_NAME} is {member.size} bytes, more than {MAX_MANIFEST_BYTES}")
                manifest = parse_manifest(f.read(MAX_MANIFEST_BYTES + 1))
            else:
                hashes[rel] = sha256_stream(f)
        else:
            what = "device file" if member.ischr() or member.isblk() else "FIFO" if member.isfifo() else "special file"
            raise BundleRefused(f"member {shown(rel)} is a {what}")
        kinds[rel] = kind
    if manifest is None:
        raise BundleRefused(f"no {MANIFEST_NAME} at the top level of the archive")
    for link in sorted(symlinks):
        if symlinks[link].startswith("/") or _link_escapes(link, symlinks):
            raise BundleRefused(f"symlink {shown(link)} -> {shown(symlinks[link])} points outside the bundle")
    for rel in kinds:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in symlinks:
                raise BundleRefused(f"member {shown(rel)} lies under symlink {shown('/'.join(parts[:i]))}")
    return manifest, hashes
