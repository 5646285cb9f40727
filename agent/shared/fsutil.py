"""The one way Mobility writes persistent files: atomically (temp file in the same directory, fsync, rename)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import IO


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that readers (and a crash) see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make the names in directory ``path`` durable: a rename, a new or a removed file survives a power cut only
    once its directory is synced."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_stream(f: IO[bytes], chunk: int = 1 << 20) -> str:
    """SHA-256 of what remains in ``f``, read in chunks: memory stays bounded for bundles of any size."""
    h = hashlib.sha256()
    while data := f.read(chunk):
        h.update(data)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return sha256_stream(f)


def remove(path: Path) -> bool:
    """Remove the name ``path`` without following it: a link is unlinked (its target stays), a directory is
    removed with its contents (shutil.rmtree never follows links inside it). Whether anything was there."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()
    return True


def append_text(path: Path, text: str, mode: int = 0o644) -> None:
    """Append ``text`` to the file ``path``, creating it. A symbolic link planted at ``path`` is removed and a
    file made in its place, never followed: a log must not be a way to write to another file as root."""
    fd = _open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    with os.fdopen(fd, "a") as f:
        f.write(text)


def open_lock_file(path: Path) -> int:
    """A descriptor of the lock file ``path``, created if absent (a link at its name is replaced, not followed)."""
    return _open_own(path, os.O_RDWR | os.O_CREAT, 0o600)


def _open_own(path: Path, flags: int, mode: int) -> int:
    """Open a file the agent owns by name; a link at that name is not the agent's file: it is removed."""
    for _ in range(3):
        try:
            return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            path.unlink()  # the link itself (unlink never follows); its target is left alone
    raise OSError(errno.ELOOP, "a symbolic link keeps reappearing at this name", str(path))


class NotSmallRegularFile(ValueError):
    """What ``read_small_file`` refuses: a FIFO, a device, a directory, a file larger than the limit."""


def read_small_file(path: Path, limit: int) -> tuple[os.stat_result, bytes]:
    """The status and content of the regular file ``path`` of at most ``limit`` bytes (links followed).

    Opened without blocking (a FIFO has no writer to wait for) and checked on the opened descriptor, so a file
    swapped in after the first look is seen; the read is bounded even if the file grows. OSError when it cannot
    be opened, NotSmallRegularFile when it is not a small regular file.
    """
    before = os.stat(path)
    if not stat.S_ISREG(before.st_mode):
        raise NotSmallRegularFile(f"{path} is {_kind(before.st_mode)}, not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            raise NotSmallRegularFile(f"{path} was replaced while it was being opened")
        if st.st_size > limit:
            raise NotSmallRegularFile(f"{path} is {st.st_size} bytes, more than the {limit} it may hold")
        data = b""
        while chunk := os.read(fd, limit + 1 - len(data)):
            data += chunk
            if len(data) > limit:
                raise NotSmallRegularFile(f"{path} grew past {limit} bytes while it was read")
        return st, data
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"
