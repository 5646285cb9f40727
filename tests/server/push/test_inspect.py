"""The OS of a host, read over SFTP, is what the agent on that host would say: every real release tree is
served by an SFTP server (asyncssh, on loopback, chrooted to the tree) and detected through it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TypeVar

import asyncssh
import pytest

from agent.host.distros import detect_os, require_supported
from agent.host.paths import Paths
from agent.shared.errors import MobilityError
from server.errors import PushLowDiskSpace
from server.push.inspect import check_free_space, detect_remote_os, free_space
from tests.conftest import DISTROS

T = TypeVar("T")
TREES = sorted(p.name for p in DISTROS.iterdir() if p.is_dir())


class _NoAuth(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False


@asynccontextmanager
async def sftp_to(root: Path) -> AsyncIterator[asyncssh.SFTPClient]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_host_keys=[key],
        server_factory=_NoAuth,
        sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=str(root).encode()),
    )
    port = server.sockets[0].getsockname()[1]
    try:
        async with (
            asyncssh.connect("127.0.0.1", port, username="t", known_hosts=None, config=None) as conn,
            conn.start_sftp_client() as sftp,
        ):
            yield sftp
    finally:
        server.close()
        await server.wait_closed()


def over_sftp(root: Path, work: Callable[[asyncssh.SFTPClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with sftp_to(root) as sftp:
            return await asyncio.wait_for(work(sftp), 30)

    return asyncio.run(main())


def _local_tag(tree: str) -> str:
    return require_supported(detect_os(Paths(DISTROS / tree))).os_tag


def _outcome(get: Callable[[], object]) -> object:
    try:
        return get()
    except MobilityError as e:
        return e.id


def test_every_real_release_tree_is_detected_over_sftp_as_locally() -> None:
    async def all_trees(sftp: asyncssh.SFTPClient) -> dict[str, object]:
        found: dict[str, object] = {}
        for tree in TREES:
            try:
                found[tree] = (await detect_remote_os(_Under(sftp, f"/{tree}"))).os_tag  # type: ignore[arg-type]
            except MobilityError as e:
                found[tree] = e.id
        return found

    remote = over_sftp(DISTROS, all_trees)
    local = {t: _outcome(partial(_local_tag, t)) for t in TREES}
    assert remote == local
    assert remote["debian12"] == "DEBIAN12" and remote["fedora30"] == "OS-UNSUPPORTED"
    assert remote["centos6"] == remote["sles11sp4"] == "OS-KERNEL-TOO-OLD"  # detected, refused for its kernel
    assert sum(1 for v in remote.values() if not str(v).startswith("OS-")) >= 31  # 8 more are refused tags


class _Under:
    """One tree of the served directory as if it were the host's root (paths are prefixed)."""

    def __init__(self, sftp: asyncssh.SFTPClient, prefix: str) -> None:
        self.sftp, self.prefix = sftp, prefix

    async def stat(self, path: str) -> asyncssh.SFTPAttrs:
        return await self.sftp.stat(self.prefix + path)

    def open(self, path: str, *args: object, **kwargs: object) -> object:
        return self.sftp.open(self.prefix + path, *args, **kwargs)

    async def glob(self, pattern: str) -> list[str]:
        return [str(p)[len(self.prefix) :] for p in await self.sftp.glob(self.prefix + pattern)]


def test_free_space_walks_up_to_the_nearest_existing_directory(tmp_path: Path) -> None:
    (tmp_path / "var/lib").mkdir(parents=True)
    space = over_sftp(tmp_path, lambda sftp: free_space(sftp, "/usr/local/mobility"))
    assert space.path == "/" and space.free > 0
    space = over_sftp(tmp_path, lambda sftp: free_space(sftp, "/var/lib"))
    assert space.path == "/var/lib"


@pytest.mark.parametrize("enough", [True, False])
def test_less_than_100_mb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, enough: bool) -> None:
    from server.push import inspect

    free = over_sftp(tmp_path, lambda sftp: free_space(sftp, "/")).free
    monkeypatch.setattr(inspect, "MIN_FREE_BYTES", free // 2 if enough else free * 2)
    work = lambda sftp: check_free_space(sftp, ("/",))  # noqa: E731
    if enough:
        assert over_sftp(tmp_path, work)[0].path == "/"
    else:
        with pytest.raises(PushLowDiskSpace, match=r"^only \d+ MiB free for /; \d+ MiB needed$"):
            over_sftp(tmp_path, work)
