"""`repo add` on a real full (tmpfs) and read-only data directory: an error ID, all or nothing, agents unaffected."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.datadir import DataDir
from server.releases.repository import Repository
from tests.bundle_factory import DEFAULT_FILES, make_bundle
from tests.conftest import require_root
from tests.integration.serverproc import (
    configure_root,
    fetch_as,
    init_server,
    sandbox_root,
    secret_file,
    server_cli,
    start_server,
)
from tests.server.releases.test_repository import assert_valid

pytestmark = pytest.mark.integration

PAGE = 4096  # tmpfs counts space in pages


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    require_root()
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def free_bytes(mnt: Path) -> int:
    st = os.statvfs(mnt)
    return st.f_bavail * st.f_frsize


def leave_free(mnt: Path, free: int) -> None:
    """Grow or shrink a filler file until exactly ``free`` bytes are left on the tmpfs at ``mnt``."""
    filler = mnt / "filler"
    size = filler.stat().st_size if filler.exists() else 0
    target = size + free_bytes(mnt) - free
    assert target >= 0, "the disk is already fuller than asked"
    if target > size:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, target)
        finally:
            os.close(fd)
    else:
        os.truncate(filler, target)
    assert free_bytes(mnt) == free


def repository_files(data: Path) -> list[str]:
    return sorted(p.name for p in (data / "repository").iterdir())


def listed(data: Path) -> list[str]:
    r = server_cli(data, "repo", "list", "--json", check=True)
    return [e["name"] for e in json.loads(r.stdout)]


def assert_write_failed(r: subprocess.CompletedProcess[str], reason: str) -> str:
    """The CLI's answer to a failed write: exit 1, one `error REPO-WRITE-FAILED:` line and its fix; the file."""
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("error REPO-WRITE-FAILED: cannot change the repository: "), r.stderr
    assert reason in r.stderr and "Traceback" not in r.stderr and len(r.stderr) < 2048, r.stderr
    assert len(r.stderr.splitlines()) == 2
    m = re.search(r"\('([^']+)'\)$", r.stderr.splitlines()[0])
    assert m, r.stderr
    return Path(m.group(1)).name


def test_repo_add_on_a_full_disk_is_all_or_nothing(small_disk: Path, tmp_path: Path) -> None:
    data = small_disk / "data"
    server = start_server(data)
    try:
        a = make_bundle(tmp_path / "a", os_tag="DEBIAN12")
        assert server_cli(data, "repo", "add", str(a)).returncode == 0
        root = sandbox_root(tmp_path / "m", "f1" * 16)
        assert configure_root(server, root, secret_file(tmp_path / "pass", server.passphrase()))[0] == 0
        assert fetch_as(server, root, "DEBIAN12", tmp_path / "dl-a").read_bytes() == a.read_bytes()

        payload = os.urandom(1 << 20)  # incompressible: the bundle's size is known to the page
        b = make_bundle(tmp_path / "b", os_tag="DEBIAN11", files={**DEFAULT_FILES, "lib/payload.bin": payload})
        pages = -(-b.stat().st_size // PAGE)

        def refused_without_a_trace(free: int) -> str | None:
            """Run `repo add b` with ``free`` bytes left: None if it succeeded, else the file it could not write."""
            leave_free(small_disk, free)
            r = server_cli(data, "repo", "add", str(b))
            if r.returncode == 0:
                return None
            failed = assert_write_failed(r, "No space left on device [ENOSPC]")
            assert repository_files(data) == [a.name]  # neither b nor a temporary copy of it
            assert listed(data) == [a.name]
            assert list(assert_valid(DataDir(data))["targets"].signed.targets) == [a.name]
            assert [e.name for e in Repository(DataDir(data)).list()] == [a.name]
            return failed

        # One page short of the bundle: the copy fails.
        assert (refused_without_a_trace((pages - 1) * PAGE) or "").startswith(".incoming-")  # its temporary copy
        # Room for the bundle and a few pages more: the copy succeeds and a metadata write fails. A publication
        # writes a page for each file (the versioned one, then the plain one, which frees the page of the old one
        # when it replaces it); a failed one can leave a versioned file that the next one replaces in place.
        # With 0, 1, 1 spare pages the writes fail at N.targets.json, targets.json, then snapshot.json.
        failures = []
        for extra in (0, 1, 1, 1, 2, 2, 3, 4, 6, 8, 12):
            failed = refused_without_a_trace((pages + extra) * PAGE)
            if failed is None:
                break
            failures.append(failed)
        else:
            raise AssertionError(f"repo add kept failing with 12 pages to spare: {failures}")
        steps = [re.sub(r"^[0-9]+\.", "N.", f) for f in failures]
        # the last one after targets.json was written: taking the bundle back meant publishing again
        assert steps[:3] == ["N.targets.json", "targets.json", "snapshot.json"], failures
        # The agent, which trusted the metadata before, still verifies the repository after all this.
        assert fetch_as(server, root, "DEBIAN12", tmp_path / "dl-a2").read_bytes() == a.read_bytes()

        # With space, the same add (it succeeded just above) is published and agents get it.
        assert listed(data) == sorted([a.name, b.name])
        (small_disk / "filler").unlink()
        assert fetch_as(server, root, "DEBIAN11", tmp_path / "dl-b").read_bytes() == b.read_bytes()
        assert_valid(DataDir(data))
    finally:
        server.stop()


def test_repo_add_on_a_read_only_disk(small_disk: Path, tmp_path: Path) -> None:
    data = small_disk / "data"
    init_server(data)
    b = make_bundle(tmp_path / "b", os_tag="DEBIAN11")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        r = server_cli(data, "repo", "add", str(b))
        assert_write_failed(r, "Read-only file system [EROFS]")
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert repository_files(data) == [] and listed(data) == []
    assert server_cli(data, "repo", "add", str(b)).returncode == 0
    assert listed(data) == [b.name]
