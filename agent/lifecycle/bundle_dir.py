"""An unpacked installer bundle on disk (``install --bundle DIR``, push install's copy, the bootstrap's and the
upgrade's staging, which ``unpack`` makes from a verified archive).

The directory is input and may change while it is read: install reads ``bundle.json`` once, then copies exactly
the files it lists (nothing else) and hashes each while copying, so what is verified is the copy, which nobody
else can change. Every source is opened component by component below the bundle directory without following
a symbolic link (``openat`` with ``O_NOFOLLOW``), and only regular files are read: a listed name that is a link
out of the bundle, a FIFO or a device is refused, never followed, waited on or opened.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

from agent.errors import InstallFailed
from agent.host.paths import Paths
from agent.lifecycle.bundles import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    TAR_LIMITS,
    Manifest,
    inspect_bundle,
    parse_manifest,
)
from agent.shared.errors import BundleRefused
from agent.shared.fsutil import remove

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in after the check must not block the open; O_NOCTTY: nor may a terminal adopt us.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CHUNK = 1 << 20


def read_manifest(bundle: Path) -> tuple[bytes, Manifest]:
    """The bytes of ``bundle.json`` and what they say; install writes these same bytes into its copy."""
    with _bundle_fd(bundle) as top:
        fd = _open_member(bundle, top, MANIFEST_NAME)
        try:
            data = _read_bounded(bundle, fd, MANIFEST_NAME, MAX_MANIFEST_BYTES)
        finally:
            os.close(fd)
    return data, parse_manifest(data)


def copy_verified(bundle: Path, manifest_bytes: bytes, manifest: Manifest, dest: Path) -> None:
    """Make ``dest`` (absent) a copy of the bundle: ``manifest_bytes`` as bundle.json and each listed file,
    hashed as it is copied and checked against bundle.json; modes keep their read and execute bits
    (``mode & 0o755``). BundleRefused names the first file that is missing, not a regular file, reached
    through a link, or not what bundle.json says; ``dest`` is then incomplete and the caller removes it."""
    dest.mkdir(mode=0o755)
    _write_new(dest / MANIFEST_NAME, manifest_bytes, 0o644)
    copied = 0
    with _bundle_fd(bundle) as top:
        for rel, digest in sorted(manifest.files.items()):
            src = _open_member(bundle, top, rel)
            try:
                size = os.fstat(src).st_size
                copied += size
                if copied > TAR_LIMITS.unpacked_bytes:
                    raise BundleRefused(f"{bundle}: the listed files hold more than {TAR_LIMITS.unpacked_bytes} bytes")
                out = dest / rel
                _make_dirs(dest, out.parent)
                actual = _copy(bundle, rel, src, size, out)
            finally:
                os.close(src)
            if actual != digest:
                raise BundleRefused(f"{bundle}: {rel} is not the file bundle.json lists (its sha256 is {actual})")


@contextlib.contextmanager
def _bundle_fd(bundle: Path) -> Iterator[int]:
    # The bundle directory itself is the caller's choice (a link to it is fine); nothing below it may be a link.
    try:
        fd = os.open(bundle, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise BundleRefused(f"{bundle}: not a readable bundle directory ({e.strerror})") from e
    try:
        yield fd
    finally:
        os.close(fd)


def _open_member(bundle: Path, top: int, rel: str) -> int:
    """A descriptor of the regular file ``rel`` below ``top``, no component followed if it is a link."""
    *dirs, name = rel.split("/")
    opened: list[int] = []
    try:
        parent = top
        for i, part in enumerate(dirs):
            parent = _openat(bundle, parent, part, _DIR_FLAGS, "/".join(dirs[: i + 1]), directory=True)
            opened.append(parent)
        before = _lstat_at(bundle, parent, name, rel)
        if not stat.S_ISREG(before.st_mode):
            raise BundleRefused(f"{bundle}: {rel} is {_kind(before.st_mode)}, not a regular file")
        fd = _openat(bundle, parent, name, _FILE_FLAGS, rel, directory=False)
    finally:
        for d in opened:
            os.close(d)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
        os.close(fd)
        raise BundleRefused(f"{bundle}: {rel} was replaced while it was being opened")
    return fd


def _openat(bundle: Path, dir_fd: int, name: str, flags: int, shown: str, *, directory: bool) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            st = _lstat_at(bundle, dir_fd, name, shown)
            want = "a directory" if directory else "a regular file"
            raise BundleRefused(f"{bundle}: {shown} is {_kind(st.st_mode)}, not {want}") from e
        raise BundleRefused(f"{bundle}: {shown} cannot be read ({e.strerror})") from e


def _lstat_at(bundle: Path, dir_fd: int, name: str, shown: str) -> os.stat_result:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as e:
        what = "is listed in bundle.json but missing" if e.errno == errno.ENOENT else f"cannot be read ({e.strerror})"
        raise BundleRefused(f"{bundle}: {shown} {what}") from e


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a regular file" if stat.S_ISREG(mode) else "a special file"


def _read_bounded(bundle: Path, fd: int, rel: str, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := os.read(fd, min(_CHUNK, limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise BundleRefused(f"{bundle}: {rel} is larger than {limit} bytes")
    return b"".join(chunks)


def _copy(bundle: Path, rel: str, src: int, size: int, out: Path) -> str:
    """Copy ``src`` (``size`` bytes when opened) to the new file ``out``; the sha256 of what was written."""
    h = hashlib.sha256()
    mode = stat.S_IMODE(os.fstat(src).st_mode) & 0o755
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        written = 0
        # A file that grows while it is copied is not the one bundle.json lists: read one byte past its size.
        while chunk := os.read(src, min(_CHUNK, size + 1 - written)):
            written += len(chunk)
            if written > size:
                raise BundleRefused(f"{bundle}: {rel} grew while it was being copied")
            h.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return h.hexdigest()


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _make_dirs(dest: Path, directory: Path) -> None:
    # Directories of the copy: made by us just now, under a directory that did not exist before.
    if directory != dest and not directory.is_dir():
        _make_dirs(dest, directory.parent)
        directory.mkdir(mode=0o755)


def unpack(paths: Paths, bundle: Path) -> Path:
    """The verified bundle archive unpacked into the staging directory (removed again if that fails)."""
    name, _ = inspect_bundle(bundle)  # content hashes, no traversal, no links out: before anything is written
    staging = paths.staging_dir / name.version
    try:
        remove(staging)
        staging.mkdir(parents=True)
        with tarfile.open(bundle) as tar:
            # "data": no owners, devices, set-id bits or links out of the directory, whatever the archive says
            tar.extractall(staging, filter="data")
    except tarfile.FilterError as e:
        with contextlib.suppress(OSError):
            remove(staging)
        raise BundleRefused(f"{bundle.name}: {e}") from e
    except OSError as e:
        with contextlib.suppress(OSError):
            remove(staging)  # a full disk leaves nothing half-unpacked behind
        raise InstallFailed(f"unpacking {bundle.name} failed: {e.strerror or e}") from e
    return staging
