"""What the server learns about a host over SFTP before it copies anything: its OS tag and its free space.

The release files are copied into a private mirror tree and read by the agent's own OS detection
(`agent.host.distros.detect_os`), so a pushed host is judged exactly as the agent on it would judge itself."""

from __future__ import annotations

import os
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from agent.host.distros import (
    ARCH_PROBES,
    MAX_RELEASE_FILE,
    RELEASE_FILES,
    RELEASE_GLOBS,
    OsInfo,
    detect_os,
    require_supported,
)
from agent.host.paths import Paths
from agent.lifecycle.prereq import MIN_FREE_BYTES
from server.errors import PushLowDiskSpace

ELF_HEADER = 64


async def _copy_head(sftp: asyncssh.SFTPClient, remote: str, mirror: Path, limit: int) -> None:
    """The first ``limit`` bytes of a remote regular file into the mirror; absent or special files are skipped."""
    try:
        attrs = await sftp.stat(remote)  # follows links, as the agent's reads do
        if attrs.type != asyncssh.FILEXFER_TYPE_REGULAR:
            return
        async with sftp.open(remote, "rb", encoding=None) as f:
            data = await f.read(limit)
    except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPPermissionDenied):
        return
    local = mirror / remote.lstrip("/")
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(data if isinstance(data, bytes) else data.encode())


async def detect_remote_os(sftp: asyncssh.SFTPClient) -> OsInfo:
    """The host's OS tag, from its release files and the ELF header of its shell (its architecture); the agent's
    own errors for a system it does not support or refuses (OS-UNSUPPORTED, OS-KERNEL-TOO-OLD)."""
    names = set(RELEASE_FILES)
    for pattern in RELEASE_GLOBS:
        try:
            names.update(os.fsdecode(n) for n in await sftp.glob(pattern))
        except asyncssh.SFTPNoSuchFile:
            continue
    with tempfile.TemporaryDirectory(prefix="mobility-push-") as mirror:
        for name in sorted(names):
            await _copy_head(sftp, name, Path(mirror), MAX_RELEASE_FILE + 1)  # +1: an oversized file stays oversized
        for probe in ARCH_PROBES:
            await _copy_head(sftp, probe, Path(mirror), ELF_HEADER)
        return require_supported(detect_os(Paths(Path(mirror))))


@dataclass(frozen=True)
class Space:
    path: str
    free: int


async def free_space(sftp: asyncssh.SFTPClient, path: str) -> Space:
    """Free bytes (for an unprivileged writer, as df shows) on the filesystem that holds ``path`` or would."""
    while True:
        try:
            st = await sftp.statvfs(path)
            return Space(path, st.bavail * st.frsize)
        except asyncssh.SFTPNoSuchFile:
            if path == "/":
                raise
            path = posixpath.dirname(path.rstrip("/")) or "/"


async def check_free_space(sftp: asyncssh.SFTPClient, paths: tuple[str, ...]) -> list[Space]:
    """Each location the push writes to needs the same 100 MB the agent's own prerequisite check asks for."""
    found = [await free_space(sftp, p) for p in paths]
    for space in found:
        if space.free < MIN_FREE_BYTES:
            raise PushLowDiskSpace(
                f"only {space.free // (1024 * 1024)} MiB free for {space.path}; "
                f"{MIN_FREE_BYTES // (1024 * 1024)} MiB needed"
            )
    return found
