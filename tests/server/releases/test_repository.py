"""The installer repository: real bundles, real keys, metadata checked with python-tuf's own verification."""

from __future__ import annotations

import datetime
import errno
import json
import os
import re
import select
import stat
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

import server.releases.repository
from agent.shared import timefmt
from agent.shared.errors import BundleRefused
from server.datadir import DataDir
from server.errors import (
    RepoBundleConflict,
    RepoBusy,
    RepoDamaged,
    RepoNoSuchBundle,
    RepoNotInitialised,
    RepoWriteFailed,
)
from server.releases.repository import Repository, _locked
from tests.bundle_factory import add_member, make_bundle

NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)


@pytest.fixture
def data(tmp_path: Path) -> DataDir:
    return DataDir(tmp_path / "data")


@pytest.fixture
def repo(data: DataDir) -> Repository:
    return Repository.create(data)


def _md(data: DataDir, name: str) -> Metadata:  # type: ignore[type-arg]
    return Metadata.from_bytes((data.tuf_dir / "metadata" / name).read_bytes())


def assert_valid(data: DataDir) -> dict[str, Metadata]:  # type: ignore[type-arg]
    """The published metadata verifies as an agent would see it: signatures, versions, hashes."""
    root = _md(data, "root.json")
    root.signed.verify_delegate(Root.type, root.signed_bytes, root.signatures)
    timestamp = _md(data, "timestamp.json")
    root.signed.verify_delegate(Timestamp.type, timestamp.signed_bytes, timestamp.signatures)
    snap_meta = timestamp.signed.snapshot_meta
    snap_bytes = (data.tuf_dir / "metadata" / f"{snap_meta.version}.snapshot.json").read_bytes()
    snap_meta.verify_length_and_hashes(snap_bytes)
    snapshot = Metadata[Snapshot].from_bytes(snap_bytes)
    root.verify_delegate(Snapshot.type, snapshot)  # python-tuf's Metadata.verify_delegate, as the brief asks
    targets_meta = snapshot.signed.meta["targets.json"]
    targets_bytes = (data.tuf_dir / "metadata" / f"{targets_meta.version}.targets.json").read_bytes()
    targets_meta.verify_length_and_hashes(targets_bytes)
    targets = Metadata[Targets].from_bytes(targets_bytes)
    root.signed.verify_delegate(Targets.type, targets.signed_bytes, targets.signatures)
    assert targets.signed.version == snapshot.signed.meta["targets.json"].version
    assert targets_bytes == (data.tuf_dir / "metadata" / "targets.json").read_bytes()
    for md in (timestamp, snapshot, targets):
        assert not md.signed.is_expired()
    for name, target in targets.signed.targets.items():
        with (data.repository_dir / name).open("rb") as f:
            target.verify_length_and_hashes(f)
    return {"root": root, "timestamp": timestamp, "snapshot": snapshot, "targets": targets}


def test_create(data: DataDir, repo: Repository) -> None:
    md = assert_valid(data)
    assert md["root"].signed.consistent_snapshot is True
    assert all(m.signed.version == 1 for m in md.values())
    assert (data.tuf_dir / "metadata" / "1.root.json").read_bytes() == repo.root_json()
    now = datetime.datetime.now(datetime.UTC)  # the repository was made just before
    assert datetime.timedelta(days=364) < md["root"].signed.expires - now <= datetime.timedelta(days=365)
    assert datetime.timedelta(hours=23) < md["timestamp"].signed.expires - now <= datetime.timedelta(days=1)
    assert datetime.timedelta(days=29) < md["targets"].signed.expires - now <= datetime.timedelta(days=30)
    keys = sorted(p.name for p in (data.tuf_dir / "keys").iterdir())
    assert keys == ["root.pem", "snapshot.pem", "targets.pem", "timestamp.pem"]
    for key in (data.tuf_dir / "keys").iterdir():
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert repo.list() == []


def test_create_again_changes_nothing(data: DataDir, repo: Repository) -> None:
    before = {p.name: p.read_bytes() for p in (data.tuf_dir / "metadata").iterdir()}
    Repository.create(data)
    assert {p.name: p.read_bytes() for p in (data.tuf_dir / "metadata").iterdir()} == before


def test_open_uninitialised(data: DataDir) -> None:
    with pytest.raises(RepoNotInitialised):
        Repository(data)


def test_add_list_remove(tmp_path: Path, data: DataDir, repo: Repository) -> None:
    b1 = make_bundle(tmp_path / "in", "UBUNTU-20.04", "0.1.0")
    b2 = make_bundle(tmp_path / "in", "RHEL7", "0.2.0", datetime.date(2027, 1, 5))
    added = repo.add([b1, b2], now=NOW)
    assert [e.name for e in added] == [b1.name, b2.name]
    assert added[0].os_tag == "UBUNTU-20.04" and added[0].version == "0.1.0"
    assert added[0].size == b1.stat().st_size
    assert added[0].added == NOW
    assert (data.repository_dir / b1.name).read_bytes() == b1.read_bytes()
    md = assert_valid(data)
    assert md["targets"].signed.version == 2
    assert md["targets"].signed.targets[b2.name].custom == {
        "os_tag": "RHEL7",
        "version": "0.2.0",
        "added": timefmt.iso(NOW),
    }
    assert sorted(repo.list(), key=lambda e: e.name) == sorted(added, key=lambda e: e.name)

    repo.remove(b1.name)
    assert not (data.repository_dir / b1.name).exists()
    assert [e.name for e in repo.list()] == [b2.name]
    assert assert_valid(data)["timestamp"].signed.version == 3


def test_adding_the_same_bundle_again_is_a_no_op(tmp_path: Path, data: DataDir, repo: Repository) -> None:
    b = make_bundle(tmp_path / "in")
    first = repo.add([b])
    version = assert_valid(data)["targets"].signed.version
    assert repo.add([b]) == first
    assert assert_valid(data)["targets"].signed.version == version


def test_add_refuses_a_different_file_under_a_published_name(tmp_path: Path, data: DataDir, repo: Repository) -> None:
    b = make_bundle(tmp_path / "a")
    repo.add([b])
    other = make_bundle(tmp_path / "b", files={"install": b"other"})
    assert other.name == b.name
    with pytest.raises(RepoBundleConflict, match="already published"):
        repo.add([other])
    assert (data.repository_dir / b.name).read_bytes() == b.read_bytes()
    assert_valid(data)


def test_add_refuses_bad_bundles_and_adds_none(tmp_path: Path, data: DataDir, repo: Repository) -> None:
    good = make_bundle(tmp_path / "in", "RHEL8")
    bad = make_bundle(tmp_path / "in", "RHEL9", extra=add_member("../../etc/cron.d/x"))
    before = {p.name: p.read_bytes() for p in (data.tuf_dir / "metadata").iterdir()}
    with pytest.raises(BundleRefused) as e:
        repo.add([good, bad])
    assert e.value.message.startswith(bad.name + ": member '../../etc/cron.d/x' has '..'")
    assert list(data.repository_dir.iterdir()) == []  # not even the temporary copies
    assert {p.name: p.read_bytes() for p in (data.tuf_dir / "metadata").iterdir()} == before
    assert repo.list() == []


def test_add_refuses_a_missing_file(tmp_path: Path, repo: Repository) -> None:
    with pytest.raises(BundleRefused, match="cannot read"):
        repo.add([tmp_path / "Mobility_UA_0.1.0_RHEL7-64_GA_05Jan2027_release.tar.gz"])


def test_remove_unknown(repo: Repository) -> None:
    with pytest.raises(RepoNoSuchBundle):
        repo.remove("Mobility_UA_0.1.0_RHEL7-64_GA_05Jan2027_release.tar.gz")
    with pytest.raises(RepoNoSuchBundle):
        repo.remove("../datadir/passphrase")


def test_rescan_picks_up_dropped_bundles_and_reports_refusals(tmp_path: Path, data: DataDir, repo: Repository) -> None:
    published = make_bundle(tmp_path / "in", "UBUNTU-22.04")
    repo.add([published])
    # An operator drops files by hand (the RHEL5 / SLES11-SP3 / Debian 7 case)
    dropped = make_bundle(data.repository_dir, "RHEL5", "0.1.0")
    make_bundle(data.repository_dir, "DEBIAN7", edit_manifest=lambda d: d["files"].update(install="0" * 64))
    (data.repository_dir / "README.txt").write_text("notes")
    added, refused = repo.rescan()
    assert [e.name for e in added] == [dropped.name]
    reasons = dict(refused)
    assert set(reasons) == {"README.txt", "Mobility_UA_0.1.0_DEBIAN7-64_GA_26Nov2026_release.tar.gz"}
    assert "is not a bundle name" in reasons["README.txt"]
    assert "'install' has sha256" in reasons["Mobility_UA_0.1.0_DEBIAN7-64_GA_26Nov2026_release.tar.gz"]
    assert {e.name for e in repo.list()} == {published.name, dropped.name}
    assert_valid(data)
    # a second rescan changes nothing
    version = assert_valid(data)["timestamp"].signed.version
    assert repo.rescan()[0] == []
    assert assert_valid(data)["timestamp"].signed.version == version


def test_rescan_drops_vanished_and_changed_bundles(tmp_path: Path, data: DataDir, repo: Repository) -> None:
    b1 = make_bundle(tmp_path / "in", "RHEL7")
    b2 = make_bundle(tmp_path / "in", "RHEL8")
    repo.add([b1, b2])
    (data.repository_dir / b1.name).unlink()
    (data.repository_dir / b2.name).write_bytes(b"garbage")
    added, refused = repo.rescan()
    assert added == []
    assert [name for name, _ in refused] == [b2.name]
    assert repo.list() == []
    assert_valid(data)


def test_rescan_verify_rehashes_same_size_changes(tmp_path: Path, data: DataDir, repo: Repository) -> None:
    b = make_bundle(tmp_path / "in")
    repo.add([b])
    content = bytearray((data.repository_dir / b.name).read_bytes())
    content[len(content) // 2] ^= 0xFF
    (data.repository_dir / b.name).write_bytes(bytes(content))
    assert repo.rescan()[1] == []  # same size: not noticed without verify
    _, refused = repo.rescan(verify=True)
    assert [name for name, _ in refused] == [b.name]
    assert repo.list() == []
    assert_valid(data)


def test_refresh_timestamp(data: DataDir, repo: Repository) -> None:
    assert repo.refresh_timestamp(NOW, datetime.timedelta(hours=1)) == []
    assert repo.refresh_timestamp(NOW + datetime.timedelta(hours=20), datetime.timedelta(hours=6)) == ["timestamp"]
    md = assert_valid(data)
    assert md["timestamp"].signed.version == 2
    assert md["snapshot"].signed.version == 1
    assert md["timestamp"].signed.expires - NOW > datetime.timedelta(hours=43)
    # near the end of targets' life, targets and snapshot are renewed too
    later = NOW + datetime.timedelta(days=25)
    assert repo.refresh_timestamp(later, datetime.timedelta(hours=6)) == ["targets", "snapshot", "timestamp"]
    md = assert_valid(data)
    assert md["targets"].signed.expires - later > datetime.timedelta(days=29)


def test_killed_publication_is_repaired_by_the_next_operation(tmp_path: Path, data: DataDir, repo: Repository) -> None:
    meta = data.tuf_dir / "metadata"
    before_ts = (meta / "timestamp.json").read_bytes()
    before_snapshot = (meta / "snapshot.json").read_bytes()
    b = make_bundle(tmp_path / "in")
    repo.add([b])
    # Simulate a kill after targets were written: snapshot and timestamp still the old ones.
    (meta / "timestamp.json").write_bytes(before_ts)
    (meta / "snapshot.json").write_bytes(before_snapshot)
    (meta / "2.snapshot.json").unlink()
    assert repo.refresh_timestamp(NOW, datetime.timedelta(0)) == ["snapshot", "timestamp"]
    md = assert_valid(data)
    assert b.name in md["targets"].signed.targets


def test_a_killed_add_leaves_a_file_that_rescan_publishes(tmp_path: Path, data: DataDir, repo: Repository) -> None:
    b = make_bundle(tmp_path / "in")
    (data.repository_dir / ".incoming-abc.tmp").write_bytes(b"half a copy")
    (data.repository_dir / b.name).write_bytes(b.read_bytes())  # renamed in, metadata never written
    added, refused = repo.rescan()
    assert [e.name for e in added] == [b.name] and refused == []
    assert not (data.repository_dir / ".incoming-abc.tmp").exists()


def test_metadata_and_target_paths_refuse_traversal(tmp_path: Path, data: DataDir, repo: Repository) -> None:
    b = make_bundle(tmp_path / "in")
    repo.add([b])
    meta = data.tuf_dir / "metadata"
    assert repo.metadata_path("root.json") == meta / "root.json"
    assert repo.metadata_path("1.root.json") == meta / "1.root.json"
    assert repo.metadata_path("2.targets.json") == meta / "2.targets.json"
    assert repo.metadata_path("timestamp.json") == meta / "timestamp.json"
    for bad in ("2.root.json", "../keys/root.pem", "keys/root.pem", "lock", "0.root.json", "x.json", ""):
        assert repo.metadata_path(bad) is None, bad
    assert repo.target_path(b.name) == data.repository_dir / b.name
    unpublished = make_bundle(data.repository_dir, "RHEL9")
    for bad in (unpublished.name, "../tuf/keys/root.pem", f"../repository/{b.name}", "x"):
        assert repo.target_path(bad) is None, bad


def test_lock_is_exclusive_across_opens(data: DataDir, repo: Repository) -> None:
    busy = Repository(data, lock_timeout=0.2)
    with _locked(data.tuf_dir, 1.0), pytest.raises(RepoBusy):
        busy.refresh_timestamp(NOW, datetime.timedelta(days=2))
    assert busy.refresh_timestamp(NOW, datetime.timedelta(days=2)) == ["timestamp"]


def test_lock_is_exclusive_across_processes(data: DataDir, repo: Repository) -> None:
    to_parent, from_child = os.pipe()
    to_child, from_parent = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: hold the lock until the parent has tried (at most 10 s)
        try:
            with _locked(data.tuf_dir, 5.0):
                os.write(from_child, b"x")
                select.select([to_child], [], [], 10.0)
        finally:
            os._exit(0)
    try:
        assert select.select([to_parent], [], [], 10.0)[0], "child never took the lock"
        assert os.read(to_parent, 1) == b"x"
        with pytest.raises(RepoBusy):
            Repository(data, lock_timeout=0.2).refresh_timestamp(NOW, datetime.timedelta(days=2))
    finally:
        os.write(from_parent, b"y")
        os.waitpid(pid, 0)
    assert Repository(data).refresh_timestamp(NOW, datetime.timedelta(days=2)) == ["timestamp"]


def test_old_versioned_metadata_is_pruned(tmp_path: Path, data: DataDir, repo: Repository) -> None:
    for i in range(25):
        repo.refresh_timestamp(NOW + datetime.timedelta(days=26, minutes=i), datetime.timedelta(days=40))
    names = {p.name for p in (data.tuf_dir / "metadata").iterdir()}
    assert "1.targets.json" not in names and "26.targets.json" in names
    assert_valid(data)


def test_metadata_is_readable_json(data: DataDir, repo: Repository) -> None:
    doc = json.loads((data.tuf_dir / "metadata" / "targets.json").read_text())
    assert doc["signed"]["_type"] == "targets"


# A full disk, a read-only or failing filesystem: all or nothing, and an error ID -------------------------------

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
# The metadata files one publication writes, in order (each through atomic_write).
PUBLICATION = ("N.targets.json", "targets.json", "N.snapshot.json", "snapshot.json", "timestamp.json")


def agent_view(data: DataDir) -> list[str]:
    """The bundles an agent would see: timestamp -> snapshot -> targets, every step verified as TUF does."""
    root = _md(data, "root.json")
    timestamp = _md(data, "timestamp.json")
    root.signed.verify_delegate(Timestamp.type, timestamp.signed_bytes, timestamp.signatures)
    snap_meta = timestamp.signed.snapshot_meta
    snap_bytes = (data.tuf_dir / "metadata" / f"{snap_meta.version}.snapshot.json").read_bytes()
    snap_meta.verify_length_and_hashes(snap_bytes)
    snapshot = Metadata[Snapshot].from_bytes(snap_bytes)
    root.verify_delegate(Snapshot.type, snapshot)
    targets_meta = snapshot.signed.meta["targets.json"]
    targets_bytes = (data.tuf_dir / "metadata" / f"{targets_meta.version}.targets.json").read_bytes()
    targets_meta.verify_length_and_hashes(targets_bytes)
    targets = Metadata[Targets].from_bytes(targets_bytes)
    root.verify_delegate(Targets.type, targets)
    return sorted(targets.signed.targets)


def _failing_writes(monkeypatch: pytest.MonkeyPatch, first: int, *, once: bool) -> list[str]:
    """Make the ``first``-th metadata write (0-based) fail with ENOSPC, and every later one unless ``once``."""
    written: list[str] = []
    real = server.releases.repository.atomic_write

    def write(path: Path, data: bytes, mode: int = 0o644) -> None:
        written.append(path.name)
        n = len(written) - 1
        if n == first or (n > first and not once):
            raise ENOSPC
        real(path, data, mode)

    monkeypatch.setattr(server.releases.repository, "atomic_write", write)
    return written


@pytest.mark.parametrize("step", range(len(PUBLICATION)), ids=PUBLICATION)
def test_add_whose_metadata_cannot_be_written_takes_its_bundle_back(
    tmp_path: Path, data: DataDir, repo: Repository, monkeypatch: pytest.MonkeyPatch, step: int
) -> None:
    a = make_bundle(tmp_path / "in", "RHEL8")
    repo.add([a])
    b = make_bundle(tmp_path / "in", "RHEL9")
    written = _failing_writes(monkeypatch, step, once=True)  # the space the withdrawn bundle held is enough
    with pytest.raises(RepoWriteFailed) as e:
        repo.add([a, b])
    assert e.value.code == "REPO-WRITE-FAILED" and "No space left on device [ENOSPC]" in e.value.message
    assert re.fullmatch(PUBLICATION[step].replace("N", "[0-9]+"), written[step])  # it failed where meant to
    # b is gone, a (there before, published, the same bytes) stays; metadata on disk is whole and lists a alone
    assert sorted(p.name for p in data.repository_dir.iterdir()) == [a.name]
    assert [x.name for x in repo.list()] == [a.name]
    assert list(assert_valid(data)["targets"].signed.targets) == [a.name]
    monkeypatch.undo()
    assert [x.name for x in repo.add([b])] == [b.name]
    assert agent_view(data) == sorted([a.name, b.name])


@pytest.mark.parametrize("step", range(len(PUBLICATION)), ids=PUBLICATION)
def test_add_on_a_disk_that_stays_full_leaves_the_last_publication(
    tmp_path: Path, data: DataDir, repo: Repository, monkeypatch: pytest.MonkeyPatch, step: int
) -> None:
    a = make_bundle(tmp_path / "in", "RHEL8")
    repo.add([a])
    b = make_bundle(tmp_path / "in", "RHEL9")
    _failing_writes(monkeypatch, step, once=False)
    with pytest.raises(RepoWriteFailed):
        repo.add([b])
    assert sorted(p.name for p in data.repository_dir.iterdir()) == [a.name]
    assert [x.name for x in repo.list()] == [a.name]
    assert agent_view(data) == [a.name]  # what agents see: the last complete publication
    monkeypatch.undo()
    repo.refresh_timestamp(NOW, datetime.timedelta(0))  # the next change, once there is space, repairs the rest
    assert list(assert_valid(data)["targets"].signed.targets) == [a.name]


def test_add_whose_copy_cannot_be_written_leaves_nothing(
    tmp_path: Path, data: DataDir, repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = make_bundle(tmp_path / "in", "RHEL8")
    repo.add([a])
    before = {p.name: p.read_bytes() for p in (data.tuf_dir / "metadata").iterdir()}
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".incoming-"):
            raise ENOSPC
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(RepoWriteFailed, match=r"No space left on device \[ENOSPC\]"):
        repo.add([make_bundle(tmp_path / "in", "RHEL9")])
    assert sorted(p.name for p in data.repository_dir.iterdir()) == [a.name]  # no temporary copy either
    assert {p.name: p.read_bytes() for p in (data.tuf_dir / "metadata").iterdir()} == before


@pytest.mark.parametrize("operation", ["remove", "rescan", "refresh"])
def test_every_change_on_a_full_disk_is_an_error_id(
    tmp_path: Path, data: DataDir, repo: Repository, monkeypatch: pytest.MonkeyPatch, operation: str
) -> None:
    a = make_bundle(tmp_path / "in", "RHEL8")
    repo.add([a])
    make_bundle(data.repository_dir, "RHEL9")  # for rescan to publish
    _failing_writes(monkeypatch, 0, once=False)
    with pytest.raises(RepoWriteFailed):
        if operation == "remove":
            repo.remove(a.name)
        elif operation == "rescan":
            repo.rescan()
        else:
            repo.refresh_timestamp(NOW + datetime.timedelta(days=2), datetime.timedelta(hours=1))
    assert a.name in agent_view(data)  # untouched for agents (remove took the file: the next change unpublishes it)


def test_a_source_that_cannot_be_read_is_refused_not_a_write_failure(data: DataDir, repo: Repository) -> None:
    # /proc/self/mem opens, then its first read fails with EIO: the operator's file, not the repository
    with pytest.raises(BundleRefused, match=r"cannot read '/proc/self/mem' \(Input/output error\)"):
        repo.add([Path("/proc/self/mem")])
    assert list(data.repository_dir.iterdir()) == []


def test_add_does_not_replace_an_unpublished_file_of_the_same_name(
    tmp_path: Path, data: DataDir, repo: Repository
) -> None:
    b = make_bundle(tmp_path / "in", "RHEL9")
    other = make_bundle(data.repository_dir, "RHEL9", files={"install": b"other"})  # dropped in by hand
    assert other.name == b.name
    with pytest.raises(RepoBundleConflict, match="is in the repository but not published"):
        repo.add([b])
    assert other.read_bytes() != b.read_bytes() and repo.list() == []
    # the very same bundle, there but unpublished (an add killed before its metadata): published as it is
    other.write_bytes(b.read_bytes())
    inode = other.stat().st_ino
    assert [x.name for x in repo.add([b])] == [b.name]
    assert other.stat().st_ino == inode


def test_damaged_metadata_or_keys_are_refused_by_name(tmp_path: Path, data: DataDir, repo: Repository) -> None:
    targets = next(data.tuf_dir.rglob("targets.json"))
    targets.write_text("{not json")
    with pytest.raises(RepoDamaged) as e:
        Repository(data).list()
    assert str(targets) in e.value.message
    targets.unlink()
    with pytest.raises(RepoDamaged, match="is missing"):
        Repository(data).list()
