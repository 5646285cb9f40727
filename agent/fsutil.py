"""The one way Mobility writes persistent files: atomically (temp file in the same directory, fsync, rename)."""

from __future__ import annotations

import hashlib
import os
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
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def sha256_stream(f: IO[bytes], chunk: int = 1 << 20) -> str:
    """SHA-256 of what remains in ``f``, read in chunks: memory stays bounded for bundles of any size."""
    h = hashlib.sha256()
    while data := f.read(chunk):
        h.update(data)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return sha256_stream(f)
