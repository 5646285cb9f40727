"""The installer repository: bundle files plus TUF metadata signed by the configuration server.

Layout under the data directory::

    repository/<bundle name>            the bundles (TUF targets, flat names)
    tuf/keys/<role>.pem                 one ed25519 key per top-level role, mode 0600
    tuf/metadata/root.json, N.root.json published metadata, served at /v1/repo/metadata/
    tuf/metadata/timestamp.json
    tuf/metadata/N.snapshot.json, N.targets.json (and snapshot.json, targets.json: the newest)
    tuf/lock                            fcntl lock held by every operation that changes metadata

Consistent snapshots are ON although they cost versioned file names: the CLI and the running server
publish while agents download, and without them an agent reading timestamp.json, snapshot.json and
targets.json one after the other can see a mix of two publications (or of a publication killed half
way) and refuse it. With them, every file a published timestamp leads to is immutable, so each publish
step (targets, then snapshot, then timestamp) is atomic for readers and a crash between steps is
invisible to agents. Target files keep their plain names (agents set ``prefix_targets_with_hash`` to
False): a published bundle name never changes content (``add`` refuses a different file under a
published name), so the hash prefix would buy nothing.

A change that fails (a full disk, a quota, a read-only or failing filesystem) ends as REPO-WRITE-FAILED,
never half done: ``add`` takes back the bundle files it put into repository/ (not ones that were there
before) and publishes the repository as it then is, so the metadata on disk lists exactly the bundles
whose files are there; where even that cannot be written, agents keep seeing the last complete
publication and the next change repairs the rest, as after a kill.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from agent.lifecycle.bundles import BundleName, inspect_bundle, parse_bundle_name
from agent.shared import timefmt
from agent.shared.errors import BundleRefused, MobilityError
from agent.shared.fsutil import atomic_write, fsync_dir, sha256_file, sha256_stream
from agent.shared.textsafe import printable, shown
from server.datadir import DataDir
from server.errors import (
    RepoBundleConflict,
    RepoBusy,
    RepoDamaged,
    RepoNoSuchBundle,
    RepoNotInitialised,
    RepoWriteFailed,
)
from server.progress import Progress, Quiet

if TYPE_CHECKING:
    from server.database.storage import Storage

ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
ROOT_LIFETIME = datetime.timedelta(days=365)
TARGETS_LIFETIME = datetime.timedelta(days=30)
SNAPSHOT_LIFETIME = datetime.timedelta(days=30)
TIMESTAMP_LIFETIME = datetime.timedelta(days=1)
MAX_BUNDLE_BYTES = 1 << 30  # a bundle is tens of MiB compressed
KEEP_VERSIONS = 20  # versioned snapshot/targets kept for agents in the middle of a refresh
LOCK_TIMEOUT = 60.0
_CHUNK = 1 << 20
_METADATA_NAME = re.compile(r"(?:(?P<version>[1-9][0-9]{0,9})\.)?(?P<role>root|timestamp|snapshot|targets)\.json")
_TMP_PREFIX = ".incoming-"
_SERIALIZER = JSONSerializer(compact=False)

_S = TypeVar("_S", bound=Signed)


@dataclass(frozen=True)
class Entry:
    """One published bundle."""

    name: str
    os_tag: str
    version: str
    size: int
    sha256: str
    added: datetime.datetime


_Entries = list[Entry]  # aliases: inside Repository, `list` is the method
_Refusals = list[tuple[str, str]]
_Roles = list[str]


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _expiry(now: datetime.datetime, lifetime: datetime.timedelta) -> datetime.datetime:
    return (now + lifetime).astimezone(datetime.UTC).replace(microsecond=0)


def _is_bundle_name(name: str) -> bool:
    try:
        parse_bundle_name(name)
    except BundleRefused:
        return False
    return True


def _make_target(name: str, size: int, digest: str, bundle: BundleName, now: datetime.datetime) -> TargetFile:
    # custom lets an agent pick the newest bundle for its OS tag without parsing names
    custom = {
        "os_tag": bundle.os_tag,
        "version": bundle.version,
        "added": timefmt.iso(now),
    }
    return TargetFile(size, {"sha256": digest}, name, {"custom": custom})


def _entry(target: TargetFile) -> Entry:
    custom = target.custom if isinstance(target.custom, dict) else {}
    added = custom.get("added")
    try:
        when = datetime.datetime.fromisoformat(added) if isinstance(added, str) else None
    except ValueError:
        when = None
    bundle = parse_bundle_name(target.path)
    return Entry(
        name=target.path,
        os_tag=str(custom.get("os_tag", bundle.os_tag)),
        version=str(custom.get("version", bundle.version)),
        size=target.length,
        sha256=target.hashes["sha256"],
        added=when or datetime.datetime.fromtimestamp(0, datetime.UTC),
    )


class Repository:
    """The repository of one data directory; every change holds ``tuf/lock`` and is crash-safe."""

    def __init__(self, datadir: DataDir, *, lock_timeout: float = LOCK_TIMEOUT, storage: Storage | None = None) -> None:
        """``storage`` on PostgreSQL adds its advisory lock to the file lock: instances on several hosts sharing the
        repository directory (where flock may not reach across hosts) still change it one at a time."""
        self.datadir = datadir
        self.lock_timeout = lock_timeout
        self.storage = storage
        self._metadata_dir = datadir.tuf_dir / "metadata"
        self._keys_dir = datadir.tuf_dir / "keys"
        if not (self._metadata_dir / "root.json").is_file():
            raise RepoNotInitialised(f"no repository metadata in {self._metadata_dir}")
        self._targets_cache: tuple[tuple[int, int], frozenset[str]] | None = None

    # Creation -------------------------------------------------------------

    @classmethod
    def create(cls, datadir: DataDir, *, now: datetime.datetime | None = None) -> Repository:
        """Make the keys and version-1 metadata; a repository that already exists is opened unchanged."""
        now = now or _utcnow()
        metadata_dir = datadir.tuf_dir / "metadata"
        with _io_errors(), _locked(datadir.tuf_dir, LOCK_TIMEOUT):
            datadir.repository_dir.mkdir(parents=True, exist_ok=True)
            if not (metadata_dir / "root.json").is_file():
                # A create killed half way left no root.json: start over, reusing any keys it made.
                signers = {role: _load_or_make_key(datadir.tuf_dir / "keys" / f"{role}.pem") for role in ROLES}
                root = Root(expires=_expiry(now, ROOT_LIFETIME), consistent_snapshot=True)
                for role, signer in signers.items():
                    root.add_key(signer.public_key, role)
                writer = _Writer(metadata_dir, signers)
                targets = writer.publish_targets(Targets(expires=_expiry(now, TARGETS_LIFETIME)))
                snapshot = writer.publish_snapshot(Snapshot(expires=_expiry(now, SNAPSHOT_LIFETIME)), targets)
                writer.publish_timestamp(Timestamp(expires=_expiry(now, TIMESTAMP_LIFETIME)), snapshot)
                writer.publish_root(root)  # root.json last: its presence marks a complete repository
        return cls(datadir)

    # Reading (no lock: every published file is replaced atomically) -------

    def list(self) -> _Entries:
        """The published bundles, by name (without any whose file vanished: the next change unpublishes those)."""
        targets = self._load(Targets, "targets.json")
        repo_dir = self.datadir.repository_dir
        return [_entry(t) for name, t in sorted(targets.targets.items()) if (repo_dir / name).is_file()]

    def root_json(self) -> bytes:
        """The current trusted root metadata, as enrolment hands it to agents."""
        return (self._metadata_dir / "root.json").read_bytes()

    def metadata_path(self, name: str) -> Path | None:
        """The file to serve for ``/v1/repo/metadata/<name>``, or None (404) for any other name."""
        if not _METADATA_NAME.fullmatch(name):
            return None
        path = self._metadata_dir / name
        return path if path.is_file() else None

    def target_path(self, name: str) -> Path | None:
        """The file to serve for ``/v1/repo/targets/<name>``: only published bundles, else None (404)."""
        if not _is_bundle_name(name):  # a flat, well-formed name: no '/', no '..'
            return None
        try:
            published = self._published_names()
        except (OSError, RepoDamaged):
            return None
        if name not in published:
            return None
        path = self.datadir.repository_dir / name
        return path if path.is_file() else None

    def _published_names(self) -> frozenset[str]:
        path = self._metadata_dir / "targets.json"
        st = path.stat()
        key = (st.st_mtime_ns, st.st_size)
        if self._targets_cache is None or self._targets_cache[0] != key:
            targets = self._load(Targets, "targets.json")
            self._targets_cache = (key, frozenset(targets.targets))
        return self._targets_cache[1]

    # Changes ------------------------------------------------------------------

    def add(
        self, files: Iterable[Path], *, now: datetime.datetime | None = None, progress: Progress | None = None
    ) -> _Entries:
        """Verify bundles, copy them into the repository and publish them; all or none.

        Each file is copied first and the copy is what gets verified and published, so a file changed
        while it is added cannot slip through. Adding the same bundle again changes nothing. ``progress``
        hears each bundle and the bytes of it copied (a terminal's bar: server/progress.py).
        """
        now = now or _utcnow()
        progress = progress or Quiet()
        repo_dir = self.datadir.repository_dir
        with self._change(now) as state:
            staged: list[tuple[Path, TargetFile, bool]] = []  # the copy, its target, whether to rename it in
            tmps: list[Path] = []
            try:
                for source in files:
                    name = source.name
                    tmp, size, digest = _copy_in(source, repo_dir, progress)
                    tmps.append(tmp)
                    bundle, _ = inspect_bundle(tmp, name=name)
                    target = _make_target(name, size, digest, bundle, now)
                    staged.append((tmp, target, self._needs_file(state, target)))
                names = [t.path for _, t, _ in staged]
                if len(set(names)) != len(names):
                    raise RepoBundleConflict("the same bundle name is given twice")
                for tmp, target, rename in staged:
                    if rename:
                        dest = repo_dir / target.path
                        new = not dest.exists()
                        os.replace(tmp, dest)
                        if new:
                            state.placed.append(dest)
                fsync_dir(repo_dir)
            finally:
                for tmp in tmps:
                    tmp.unlink(missing_ok=True)
            for _, target, _ in staged:
                if target.path not in state.targets.targets:
                    state.targets.targets[target.path] = target
                    state.targets_changed = True
            return [_entry(state.targets.targets[t.path]) for _, t, _ in staged]

    def _needs_file(self, state: _State, target: TargetFile) -> bool:
        """Whether ``target``'s copy must be renamed into repository/; RepoBundleConflict if its name is taken."""
        name, digest = target.path, target.hashes["sha256"]
        published = state.targets.targets.get(name)
        if published is not None:
            if published.hashes.get("sha256") != digest:
                raise RepoBundleConflict(
                    f"{name} is already published with sha256 {published.hashes['sha256']}, this file has {digest}"
                )
            return True  # the same content again; also repairs a published file changed on disk
        existing = self.datadir.repository_dir / name
        if not existing.exists() and not existing.is_symlink():
            return True
        # A file nobody published holds the name (dropped in by hand, or an add killed before its metadata):
        # the same bundle is published as it is; another one is not replaced behind the operator's back.
        if existing.is_file() and not existing.is_symlink() and sha256_file(existing) == digest:
            return False
        raise RepoBundleConflict(
            f"{existing} is in the repository but not published, and differs from the {name} being added"
        )

    def remove(self, name: str, *, now: datetime.datetime | None = None) -> None:
        """Unpublish a bundle and delete its file."""
        now = now or _utcnow()
        with self._change(now) as state:
            path = self.datadir.repository_dir / name
            known = name in state.targets.targets
            if not known and (not _is_bundle_name(name) or not path.is_file()):
                raise RepoNoSuchBundle(f"no bundle named {shown(name)} in the repository")
            # The file goes first: killed before the metadata follows, the next operation drops the
            # vanished target; the other order would let a rescan publish the removed bundle again.
            path.unlink(missing_ok=True)
            fsync_dir(self.datadir.repository_dir)
            if known:
                del state.targets.targets[name]
                state.targets_changed = True

    def rescan(self, *, verify: bool = False, now: datetime.datetime | None = None) -> tuple[_Entries, _Refusals]:
        """Publish bundles an operator dropped into the repository directory; unpublish vanished or changed ones.

        Returns the newly published entries and the refused files with the reason. Published bundles
        are re-hashed only with ``verify`` (else a changed size is what marks a changed file).
        """
        now = now or _utcnow()
        repo_dir = self.datadir.repository_dir
        added: _Entries = []
        refused: _Refusals = []
        with self._change(now) as state:
            for path in sorted(repo_dir.iterdir()):
                name = path.name
                if name.startswith(_TMP_PREFIX):
                    path.unlink(missing_ok=True)  # left by an add that was killed; we hold the lock
                    continue
                if name.startswith(".") or not path.is_file():
                    continue
                published = state.targets.targets.get(name)
                if published is not None:
                    if path.stat().st_size == published.length and not verify:
                        continue
                    if verify and path.stat().st_size == published.length:
                        with path.open("rb") as f:
                            if sha256_stream(f) == published.hashes.get("sha256"):
                                continue
                    # Changed under its published name: agents would refuse it as tampered.
                    del state.targets.targets[name]
                    state.targets_changed = True
                try:
                    size, digest = path.stat().st_size, sha256_file(path)
                    bundle, _ = inspect_bundle(path)
                except BundleRefused as e:
                    refused.append((name, e.message))
                    continue
                except OSError as e:
                    refused.append((name, f"{shown(name)}: cannot read ({e.strerror or e})"))
                    continue
                target = _make_target(name, size, digest, bundle, now)
                state.targets.targets[name] = target
                state.targets_changed = True
                added.append(_entry(target))
        return added, refused

    def refresh_timestamp(self, now: datetime.datetime, margin: datetime.timedelta) -> _Roles:
        """Re-sign the timestamp if it expires within ``margin`` of ``now``; return the roles re-signed.

        The running server calls this periodically. It also renews targets, snapshot and root when they
        near expiry (they are otherwise re-signed only when the bundles change), and, like every
        change, repairs a publication that was killed half way.
        """
        with self._change(now, margin=margin) as state:
            pass
        return state.resigned

    # Internals ----------------------------------------------------------------

    def _load(self, cls: type[_S], name: str) -> _S:
        path = self._metadata_dir / name
        try:
            md: Metadata[Any] = Metadata.from_bytes(path.read_bytes())
        except FileNotFoundError as e:
            raise RepoDamaged(f"repository metadata {path} is missing") from e
        except (OSError, DeserializationError) as e:
            raise RepoDamaged(f"repository metadata {path} is unreadable: {e}") from e
        signed = md.signed
        if not isinstance(signed, cls):
            raise RepoDamaged(f"repository metadata {path} is not {cls.type} metadata")
        return signed

    def _state(self) -> _State:
        state = _State(
            root=self._load(Root, "root.json"),
            targets=self._load(Targets, "targets.json"),
            snapshot=self._load(Snapshot, "snapshot.json"),
            timestamp=self._load(Timestamp, "timestamp.json"),
        )
        # Targets whose file vanished (deleted by hand, or a remove killed half way) are unpublished.
        for name in [n for n in state.targets.targets if not (self.datadir.repository_dir / n).is_file()]:
            del state.targets.targets[name]
            state.targets_changed = True
        return state

    @contextlib.contextmanager
    def _change(self, now: datetime.datetime, margin: datetime.timedelta | None = None) -> Iterator[_State]:
        with _io_errors(), _locked(self.datadir.tuf_dir, self.lock_timeout, self.storage):
            self.datadir.repository_dir.mkdir(parents=True, exist_ok=True)
            state = self._state()
            try:
                yield state
                self._publish(state, now, margin)
            except BaseException:
                self._withdraw(state, now)
                raise
            self._prune(state)

    def _withdraw(self, state: _State, now: datetime.datetime) -> None:
        """After a failed change, remove the bundle files it placed and publish what is left (best effort)."""
        if not state.placed:
            return
        for path in state.placed:
            with contextlib.suppress(OSError):
                path.unlink()
        with contextlib.suppress(OSError):
            fsync_dir(self.datadir.repository_dir)
        # The failed publication may have written targets.json (it goes before snapshot and timestamp) listing
        # the withdrawn bundles; publishing again drops them, in the space their files held. If this fails
        # too, agents still see the last complete publication and the next change repairs the rest.
        with contextlib.suppress(MobilityError, OSError):
            self._publish(self._state(), now, None)

    def _publish(self, state: _State, now: datetime.datetime, margin: datetime.timedelta | None) -> None:
        writer = _Writer(self._metadata_dir, self._signers(state.root))

        def due(signed: Signed, lifetime: datetime.timedelta) -> bool:
            # Longer-lived roles are renewed once less than a quarter of their lifetime is left.
            return margin is not None and signed.expires - now <= max(margin, lifetime / 4)

        if due(state.root, ROOT_LIFETIME):
            state.root.version += 1
            state.root.expires = _expiry(now, ROOT_LIFETIME)
            writer.publish_root(state.root)
            state.resigned.append(Root.type)
        # Publish in dependency order; each step also runs when the one before was killed half way
        # (the unversioned file is the newest written, the referencing metadata still points back).
        if state.targets_changed or due(state.targets, TARGETS_LIFETIME):
            state.targets.version = max(state.targets.version, state.snapshot.meta["targets.json"].version) + 1
            state.targets.expires = _expiry(now, TARGETS_LIFETIME)
            writer.publish_targets(state.targets)
            state.resigned.append(Targets.type)
        snapshot_stale = state.snapshot.meta["targets.json"].version != state.targets.version
        if snapshot_stale or due(state.snapshot, SNAPSHOT_LIFETIME):
            state.snapshot.version = max(state.snapshot.version, state.timestamp.snapshot_meta.version) + 1
            state.snapshot.expires = _expiry(now, SNAPSHOT_LIFETIME)
            writer.publish_snapshot(state.snapshot, state.targets)
            state.resigned.append(Snapshot.type)
        if state.timestamp.snapshot_meta.version != state.snapshot.version or due(state.timestamp, TIMESTAMP_LIFETIME):
            state.timestamp.version += 1
            state.timestamp.expires = _expiry(now, TIMESTAMP_LIFETIME)
            writer.publish_timestamp(state.timestamp, state.snapshot)
            state.resigned.append(Timestamp.type)

    def _prune(self, state: _State) -> None:
        """Drop versioned snapshot/targets that no recent timestamp can lead an agent to."""
        current = {"snapshot": state.snapshot.version, "targets": state.targets.version}
        # Housekeeping after a complete publication: what it cannot remove now, the next change will.
        with contextlib.suppress(OSError):
            for path in self._metadata_dir.iterdir():
                m = _METADATA_NAME.fullmatch(path.name)
                if m and m["version"] and m["role"] in current:
                    if int(m["version"]) <= current[m["role"]] - KEEP_VERSIONS:
                        path.unlink(missing_ok=True)
                elif path.name.startswith(".") and path.name.endswith(".tmp"):
                    path.unlink(missing_ok=True)  # an atomic_write killed half way; we hold the lock

    def _signers(self, root: Root) -> dict[str, CryptoSigner]:
        signers = {}
        for role in ROLES:
            path = self._keys_dir / f"{role}.pem"
            try:
                signer = _load_key(path)
            except (OSError, ValueError) as e:
                raise RepoDamaged(f"signing key {path} is unreadable: {e}") from e
            if signer.public_key.keyid not in root.roles[role].keyids:
                raise RepoDamaged(f"signing key {path} is not the {role} key of root.json")
            signers[role] = signer
        return signers


@dataclass
class _State:
    root: Root
    targets: Targets
    snapshot: Snapshot
    timestamp: Timestamp
    targets_changed: bool = False
    resigned: list[str] = field(default_factory=list)
    placed: list[Path] = field(default_factory=list)  # bundle files this change put into repository/


class _Writer:
    """Signs and writes metadata files; the versioned file before the unversioned one."""

    def __init__(self, metadata_dir: Path, signers: dict[str, CryptoSigner]) -> None:
        self.dir = metadata_dir
        self.signers = signers

    def _sign(self, signed: Signed) -> bytes:
        md: Metadata[Any] = Metadata(signed)
        try:
            md.sign(self.signers[signed.type])
        except UnsignedMetadataError as e:
            raise RepoDamaged(f"cannot sign {signed.type} metadata: {e}") from e
        return md.to_bytes(_SERIALIZER)

    def publish_root(self, root: Root) -> None:
        data = self._sign(root)
        _write(self.dir / f"{root.version}.root.json", data)
        _write(self.dir / "root.json", data)

    def publish_targets(self, targets: Targets) -> bytes:
        data = self._sign(targets)
        _write(self.dir / f"{targets.version}.targets.json", data)
        _write(self.dir / "targets.json", data)
        return data

    def publish_snapshot(self, snapshot: Snapshot, targets: Targets | bytes) -> bytes:
        targets_bytes = targets if isinstance(targets, bytes) else (self.dir / "targets.json").read_bytes()
        targets_version = Metadata[Targets].from_bytes(targets_bytes).signed.version
        snapshot.meta["targets.json"] = MetaFile.from_data(targets_version, targets_bytes, ["sha256"])
        data = self._sign(snapshot)
        _write(self.dir / f"{snapshot.version}.snapshot.json", data)
        _write(self.dir / "snapshot.json", data)
        return data

    def publish_timestamp(self, timestamp: Timestamp, snapshot: Snapshot | bytes) -> None:
        snapshot_bytes = snapshot if isinstance(snapshot, bytes) else (self.dir / "snapshot.json").read_bytes()
        version = Metadata[Snapshot].from_bytes(snapshot_bytes).signed.version
        timestamp.snapshot_meta = MetaFile.from_data(version, snapshot_bytes, ["sha256"])
        _write(self.dir / "timestamp.json", self._sign(timestamp))


@contextlib.contextmanager
def _locked(tuf_dir: Path, timeout: float, storage: Storage | None = None) -> Iterator[None]:
    """Hold the exclusive lock on ``tuf/lock`` (the CLI and the running server are separate processes), and on
    PostgreSQL the database's repository lock too. It waits with sleeps: call it from a worker thread (the server)
    or a command, never on an event loop."""
    deadline = time.monotonic() + timeout
    with _file_locked(tuf_dir, timeout):
        if storage is None or not storage.postgresql:
            yield
            return
        with storage.advisory_lock("repository", max(deadline - time.monotonic(), 0.001)) as held:
            if not held:
                raise RepoBusy(f"another instance holds the repository lock for more than {timeout:g} s")
            yield


@contextlib.contextmanager
def _file_locked(tuf_dir: Path, timeout: float) -> Iterator[None]:
    tuf_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(tuf_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if time.monotonic() >= deadline:
                    raise RepoBusy(f"the repository lock {tuf_dir / 'lock'} is held for more than {timeout:g} s") from e
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _load_key(path: Path) -> CryptoSigner:
    private = load_pem_private_key(path.read_bytes(), None)
    return CryptoSigner(private)


def _load_or_make_key(path: Path) -> CryptoSigner:
    if path.is_file():
        return _load_key(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    signer = CryptoSigner.generate_ed25519()
    _write(path, signer.private_bytes, mode=0o600)
    return signer


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """atomic_write, naming ``path`` in the error where the system names no file (a failed write or fsync)."""
    try:
        atomic_write(path, data, mode)
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def _copy_in(source: Path, repo_dir: Path, progress: Progress) -> tuple[Path, int, str]:
    """Stream ``source`` into a temporary file in the repository (fsynced); return it, its size and sha256.

    Bundles are too big for atomic_write's in-memory bytes; this is the same temp-fsync-rename
    discipline, with the rename done by the caller once every bundle has been verified. Reading the
    source fails as BundleRefused, writing the copy as OSError (REPO-WRITE-FAILED at the boundary).
    """
    h = hashlib.sha256()
    size = 0
    try:
        # Without blocking (a FIFO has no writer to wait for), and only a regular file: /dev/zero would fill the disk.
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise BundleRefused(f"{shown(source.name)}: cannot read {shown(str(source))} ({e.strerror})") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BUNDLE_BYTES:
        os.close(fd)
        what = "is not a regular file" if not stat.S_ISREG(st.st_mode) else f"is larger than {MAX_BUNDLE_BYTES} bytes"
        raise BundleRefused(f"{shown(source.name)}: {shown(str(source))} {what}")
    progress.task(f"copying {printable(source.name, 100)}", st.st_size)
    with os.fdopen(fd, "rb") as src:
        fd, tmp = tempfile.mkstemp(dir=repo_dir, prefix=_TMP_PREFIX, suffix=".tmp")
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as out:
                while True:
                    try:
                        chunk = src.read(_CHUNK)
                    except OSError as e:
                        raise BundleRefused(
                            f"{shown(source.name)}: cannot read {shown(str(source))} ({e.strerror})"
                        ) from e
                    if not chunk:
                        break
                    h.update(chunk)
                    size += len(chunk)
                    progress.advance(len(chunk))
                    if size > MAX_BUNDLE_BYTES:  # it grew while being copied
                        raise BundleRefused(f"{shown(source.name)}: larger than {MAX_BUNDLE_BYTES} bytes")
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            if e.filename is None:
                raise OSError(e.errno, e.strerror, tmp) from e
            raise
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return Path(tmp), size, h.hexdigest()


@contextlib.contextmanager
def _io_errors() -> Iterator[None]:
    """An OSError while changing the repository (full disk, quota, read-only, permissions, I/O) as REPO-WRITE-FAILED."""
    try:
        yield
    except OSError as e:
        code = errno.errorcode.get(e.errno or 0, "")
        name = e.filename
        where = f" ({shown(os.fsdecode(name))})" if isinstance(name, (str, bytes, os.PathLike)) else ""
        reason = f"{e.strerror} [{code}]" if e.strerror and code else shown(str(e))
        raise RepoWriteFailed(f"cannot change the repository: {reason}{where}") from e
