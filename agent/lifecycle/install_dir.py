"""Where the agent may be installed, and which install directory is the agent's own.

``-d DIR`` (and ``install_dir`` in bootstrap.conf, and the one recorded in agent.json) is input: it is parsed
once, at the edge, into an ``InstallDir`` (absolute, normalised, no ``..``, plain characters, not a system
directory). Install makes the directory, or adopts an empty one or one an earlier agent installed, and marks it
with ``.mobility-install``; uninstall removes only the agent's own names from a marked directory, and the
directory itself only when that leaves it empty. A directory without the marker is never emptied: ``-d /opt``
once meant ``rm -rf /opt`` at uninstall.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import time
from pathlib import Path
from typing import NewType

from agent.errors import InstallDirInvalid, InstallDirNotOurs
from agent.host.paths import Paths
from agent.shared import timefmt
from agent.shared.errors import MobilityError
from agent.shared.fsutil import atomic_write, remove

InstallDir = NewType("InstallDir", str)  # an install directory that passed parse_install_dir

DEFAULT_INSTALL_DIR = InstallDir("/usr/local/mobility")

MARKER = ".mobility-install"
PRODUCT = "mobility"
# What install makes in the install directory besides the marker; uninstall removes these names and no others.
OUR_NAMES = ("current", ".current.new", "versions")
MAX_LENGTH = 1024
_MAX_MARKER_BYTES = 4096

# Never an install directory: the root, the directories of the filesystem hierarchy (FHS) and their usual
# children, whose contents belong to the system and to other software.
_HIERARCHY: dict[str, tuple[str, ...]] = {
    "/": (
        "bin", "boot", "dev", "etc", "home", "lib", "lib32", "lib64", "libx32", "lost+found", "media", "mnt",
        "opt", "proc", "root", "run", "sbin", "snap", "srv", "sys", "tmp", "usr", "var",
    ),
    "/boot": ("efi", "grub", "grub2"),
    "/usr": (
        "bin", "games", "include", "lib", "lib32", "lib64", "libexec", "libx32", "local", "sbin", "share", "src",
        "tmp", "X11R6",
    ),
    "/usr/local": ("bin", "etc", "games", "include", "lib", "lib64", "libexec", "man", "sbin", "share", "src"),
    "/var": (
        "account", "adm", "backups", "cache", "crash", "db", "empty", "games", "kerberos", "lib", "local", "lock",
        "log", "mail", "nis", "opt", "preserve", "run", "spool", "tmp", "www", "yp",
    ),
}  # fmt: skip
SYSTEM_DIRS = frozenset(
    {"/", *(f"{parent.rstrip('/')}/{child}" for parent, children in _HIERARCHY.items() for child in children)}
)
# Nor anything under these: kernel and device filesystems, and the agent's own fixed directories.
SYSTEM_TREES = {
    "/proc": "a kernel filesystem",
    "/sys": "a kernel filesystem",
    "/dev": "the device filesystem",
    "/etc/mobility": "the agent's configuration directory",
    "/var/lib/mobility": "the agent's state directory",
    "/var/log/mobility": "the agent's log directory",
}
# Nor, as given, places emptied at boot or writable by every user (whoever can write there could replace the
# agent, which runs as root). Where a -d leads through links of a root image is judged by the two tables above:
# the image's own layout is its maker's choice, the system's directories are never the agent's.
VOLATILE_TREES = {
    "/run": "emptied at every boot",
    "/var/run": "emptied at every boot",
    "/var/lock": "emptied at every boot",
    "/tmp": "emptied at boot and writable by every user",  # noqa: S108 - refused, not used
    "/var/tmp": "writable by every user",  # noqa: S108 - refused, not used
}
# Letters, digits and . _ - + only: the path is written into unit files and init scripts, where a space, a
# newline or a % would change their meaning.
_PLAIN = re.compile(r"[A-Za-z0-9._+/-]+")


def refusal(system_path: str, *, as_given: bool = True) -> str | None:
    """Why ``system_path`` (absolute, normalised) cannot be an install directory, or None. Pure.

    ``as_given``: the path as the user named it; else where it leads through the links of a root image.
    """
    if system_path == "/":
        return "is the root directory"
    if system_path in SYSTEM_DIRS:
        return "is a system directory"
    trees = {**SYSTEM_TREES, **VOLATILE_TREES} if as_given else SYSTEM_TREES
    for tree, what in trees.items():
        if system_path == tree or system_path.startswith(tree + "/"):
            return f"is {tree}, {what}" if system_path == tree else f"is under {tree}, {what}"
    return None


def parse_install_dir(text: str, what: str = "-d") -> InstallDir:
    """An install directory from input (``what`` names where it came from); InstallDirInvalid if unusable. Pure."""
    shown = repr(text[:200]) + ("..." if len(text) > 200 else "")
    if not text.startswith("/"):
        raise InstallDirInvalid(f"{what} {shown} is a relative path: give an absolute one (e.g. /opt/mobility)")
    if len(text) > MAX_LENGTH:
        raise InstallDirInvalid(f"{what} {shown} is longer than {MAX_LENGTH} characters")
    if not _PLAIN.fullmatch(text):
        raise InstallDirInvalid(f"{what} {shown} has characters other than letters, digits and . _ - + /")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InstallDirInvalid(f"{what} {shown} has '..' in it")
    normal = "/" + "/".join(parts)
    reason = refusal(normal)
    if reason is not None:
        raise InstallDirInvalid(f"{what} {normal} {reason}: the agent needs a directory of its own")
    return InstallDir(normal)


def is_ours(host: Path) -> bool:
    """Whether the directory ``host`` carries the agent's marker (a regular file, not a link)."""
    try:
        fd = os.open(host / MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        data = os.read(fd, _MAX_MARKER_BYTES + 1)
    finally:
        os.close(fd)
    try:
        doc = json.loads(data)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("product") == PRODUCT


def check(paths: Paths, install_dir: InstallDir) -> Path:
    """The install directory on the host (resolved inside the root) if install may use it; writes nothing.

    Usable: absent (install makes it); marked as the agent's; empty; or holding an install of an earlier agent
    (``versions/`` and a ``current`` link into it, complete). Refused: anything else, a directory others than
    its owner can write or that is not the installing user's, and a ``-d`` that leads (through links inside the
    root) to a directory ``-d`` could not name.
    """
    host = paths.install_dir(install_dir)
    where = paths.system_path(host)
    reason = refusal(where, as_given=where == install_dir)
    if reason is not None:
        raise InstallDirInvalid(f"-d {install_dir} leads (through links inside the root) to {where}, which {reason}")
    try:
        st = host.lstat()
    except FileNotFoundError:
        return host
    if not stat.S_ISDIR(st.st_mode):
        raise InstallDirNotOurs(f"{install_dir} exists and is not a directory")
    _require_private(install_dir, st)
    if is_ours(host):
        return host
    entries = sorted(name for name in os.listdir(host) if not _partial_marker(name))
    if entries and not _earlier_install(host):
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise InstallDirNotOurs(
            f"{install_dir} holds {shown} and no {MARKER}: Mobility did not create it, "
            "and an uninstall must never remove what others put there"
        )
    return host


def claim(paths: Paths, install_dir: InstallDir) -> Path:
    """``check``, then make the directory or adopt it: it carries the marker from then on."""
    host = check(paths, install_dir)
    if not host.exists():
        host.mkdir(parents=True, mode=0o755)
    if not is_ours(host):
        _remove_partial_markers(host)
        _mark(host, install_dir)
    return host


def release(paths: Paths, recorded: object) -> tuple[list[str], list[str]]:
    """Uninstall's part in the install directory ``recorded`` in agent.json (input: it may have been changed).

    Returns (removed, kept): the system paths removed, and what was left alone and why.
    """
    try:
        if not isinstance(recorded, str):
            raise InstallDirInvalid(f"{recorded!r} is not a path")
        install_dir = parse_install_dir(recorded, "the recorded install directory")
    except InstallDirInvalid as e:
        return [], [f"left the recorded install directory alone: {e.message}"]
    try:
        host = paths.install_dir(install_dir)
    except MobilityError as e:  # links that loop inside the root
        return [], [f"left {install_dir} alone: {e.message}"]
    where = paths.system_path(host)
    reason = refusal(where, as_given=where == install_dir)
    if reason is not None:
        return [], [f"left {install_dir} alone: it leads to {where}, which {reason}"]
    try:
        if not stat.S_ISDIR(host.lstat().st_mode):
            return [], [f"left {install_dir} alone: it is not a directory"]
    except FileNotFoundError:
        return [], []
    if not is_ours(host):
        return [], [
            f"left {install_dir} alone: it has no {MARKER}, so Mobility did not make it its own "
            "(if an earlier agent installed versions/ and current there, remove those by hand)"
        ]
    removed = [f"{install_dir}/{name}" for name in OUR_NAMES if remove(host / name)]
    _remove_partial_markers(host)
    remove(host / MARKER)  # last: an uninstall killed before this point finds the directory still marked
    try:
        host.rmdir()
    except OSError:
        left = ", ".join(sorted(os.listdir(host))[:5])
        return removed, [f"kept {install_dir}: it also holds files Mobility did not put there ({left})"]
    return [*removed, install_dir], []


def _mark(host: Path, install_dir: InstallDir) -> None:
    created = timefmt.iso(time.time())
    doc = {"product": PRODUCT, "created": created, "install_dir": install_dir}
    atomic_write(host / MARKER, (json.dumps(doc, indent=2) + "\n").encode())


def _require_private(install_dir: InstallDir, st: os.stat_result) -> None:
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise InstallDirNotOurs(
            f"{install_dir} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}: whoever else "
            "can write it could replace the agent, which runs as root"
        )


def _earlier_install(host: Path) -> bool:
    """What an agent before the marker left: ``versions/<v>/.complete`` and ``current -> versions/<v>``."""
    current, versions = host / "current", host / "versions"
    if not current.is_symlink() or versions.is_symlink() or not versions.is_dir():
        return False
    m = re.fullmatch(r"versions/([0-9]+(?:\.[0-9]+)+)", os.readlink(current))
    return m is not None and not (versions / m[1]).is_symlink() and (versions / m[1] / ".complete").is_file()


def _remove_partial_markers(host: Path) -> None:
    """The temporary files of a marker write that was killed (atomic_write's names)."""
    for name in os.listdir(host):
        if _partial_marker(name):
            with contextlib.suppress(OSError):
                remove(host / name)


def _partial_marker(name: str) -> bool:
    return name.startswith(f".{MARKER}.") and name.endswith(".tmp")
