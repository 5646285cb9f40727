"""Install and uninstall from an unpacked bundle: versions side by side, `current` switched atomically.

Layout under the install dir (default /usr/local/mobility):
    .mobility-install     the marker that makes the directory the agent's (agent/lifecycle/install_dir.py)
    versions/<version>/   a verified copy of exactly the files bundle.json lists (agent/lifecycle/bundle_dir.py), with a
                          `.complete` marker written last
    current -> versions/<version>
The previous version is kept for rollback; older ones are removed. Killed at any point, the next run
converges: a half-copied version has no marker and is copied again, and `current` is replaced by rename.
Uninstall removes those names and nothing else from the install dir (the dir itself only if then empty)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from agent.errors import BundleWrongOs, InstallBusy, InstallFailed, PrerequisitesFailed
from agent.host.distros import Init, detect_os, require_supported
from agent.host.paths import Paths
from agent.lifecycle.bundle_dir import copy_verified, read_manifest
from agent.lifecycle.bundles import Manifest
from agent.lifecycle.check_report import Report, Status, run_checks
from agent.lifecycle.freeze import FreezeSetup, install_provider
from agent.lifecycle.install_dir import DEFAULT_INSTALL_DIR, InstallDir, check, claim, release
from agent.lifecycle.installed import InstallRecord, load_install_record, save_install_record
from agent.lifecycle.prereq.prerequisites import prerequisite_checks
from agent.lifecycle.services import install_units, remove_units, stop_daemon
from agent.recovery.builtins import install_builtin_checks
from agent.shared import timefmt
from agent.shared.errors import MobilityError
from agent.shared.fsutil import append_text, fsync_dir, open_lock_file, remove

COMPLETE = ".complete"


@dataclass(frozen=True)
class Installed:
    version: str
    os_tag: str
    install_dir: str
    previous: str | None
    report: Report
    init: Init
    freeze: FreezeSetup
    units: list[str]


def log(paths: Paths, message: str) -> None:
    paths.log_dir.mkdir(parents=True, exist_ok=True)
    append_text(paths.install_log, f"{timefmt.iso(time.time())} {message}\n")


_HELD: set[Path] = set()  # locks this process holds: a bootstrap holds it across its install


@contextlib.contextmanager
def install_lock(paths: Paths) -> Iterator[None]:
    """One install, uninstall or bootstrap at a time on a machine (re-entrant within one process)."""
    lock = paths.install_lock
    if lock in _HELD:
        yield
        return
    try:
        paths.state_dir.mkdir(parents=True, exist_ok=True)
        fd = open_lock_file(lock)
    except OSError as e:
        raise InstallFailed(f"cannot open the install lock {lock}: {e.strerror or e}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise InstallBusy(f"{lock} is held by another process") from e
        _HELD.add(lock)
        try:
            yield
        finally:
            _HELD.discard(lock)
    finally:
        os.close(fd)


def install(paths: Paths, bundle: Path, install_dir: InstallDir, role: str, platform: str) -> Installed:
    """Install the unpacked bundle at ``bundle`` into ``install_dir`` (made or adopted as the agent's own)."""
    manifest_bytes, manifest = read_manifest(bundle)
    os_tag = require_supported(detect_os(paths)).os_tag
    if os_tag != manifest.os_tag:
        raise BundleWrongOs(f"this bundle is for {manifest.os_tag}; this system is {os_tag}")
    report = run_checks(prerequisite_checks(paths, install_dir, manifest.kernel_floor))
    if report.failed:
        failed = "; ".join(f"{r.id}: {r.message}" for r in report.results if r.status is Status.FAIL)
        raise PrerequisitesFailed(f"prerequisite checks failed: {failed}")
    try:
        # Before anything is written there: a refused directory is left exactly as it was.
        fresh = not os.path.lexists(check(paths, install_dir))
    except MobilityError as e:
        log(paths, f"install failed: {e.id}: {e.message}")
        raise
    with install_lock(paths):
        log(paths, f"install {manifest.version} ({manifest.os_tag}) into {install_dir}, role {role}, {platform}")
        try:
            target = claim(paths, install_dir)
            running = current_version(target)
            previous = _previous_after(paths, target, running, manifest.version)
            try:
                place_version(bundle, manifest_bytes, manifest, target)
            except (MobilityError, OSError):
                if fresh:  # made by this run and never used: a refused bundle leaves no install directory
                    with contextlib.suppress(OSError):
                        release(paths, install_dir)
                raise
            units = activate_version(paths, install_dir, manifest.version, previous, role=role, platform=platform)
        except MobilityError as e:
            log(paths, f"install failed: {e.id}: {e.message}")
            raise
        except OSError as e:
            log(paths, f"install failed: {e}")
            raise InstallFailed(f"installing into {install_dir} failed: {e.strerror or e}") from e
        freeze = install_provider(paths)
        log(
            paths,
            f"installed {manifest.version}; previous {previous or 'none'}; units {', '.join(units)}; "
            f"freeze provider {'ready' if freeze.ready else 'NOT ready'}: {freeze.reason}",
        )
    return Installed(manifest.version, manifest.os_tag, install_dir, previous, report, manifest.init, freeze, units)


def _previous_after(paths: Paths, target: Path, running: str | None, version: str) -> str | None:
    """The version to keep for rollback once ``version`` is current: the running one, or, when the running one is
    reinstalled, the one it kept (reinstalling the same version must not lose the only way back)."""
    if running != version:
        return running
    record = load_install_record(paths)
    kept = record.previous if record is not None else None
    return kept if kept is not None and kept != version and version_complete(target, kept) else None


def current_version(target: Path) -> str | None:
    """The version ``current`` points at in the install directory ``target``, if any."""
    current = target / "current"
    return os.readlink(current).rsplit("/", 1)[-1] if current.is_symlink() else None


def version_complete(target: Path, version: str) -> bool:
    """Whether versions/<version> in ``target`` is a complete copy (its ``.complete`` marker is written last)."""
    final = target / "versions" / version
    return not final.is_symlink() and (final / COMPLETE).is_file()


def place_version(bundle: Path, manifest_bytes: bytes, manifest: Manifest, target: Path) -> None:
    """versions/<version>: a verified copy (see agent/lifecycle/bundle_dir.py), renamed into place once complete. A copy
    that fails (a refused file, a full disk) is removed: what was current is untouched and no space stays taken."""
    versions = target / "versions"
    final = versions / manifest.version
    if version_complete(target, manifest.version):
        return
    if versions.is_symlink():  # the agent makes a directory here: a link is not ours to write through
        versions.unlink()
    versions.mkdir(mode=0o755, exist_ok=True)
    staging = versions / f".{manifest.version}.partial"
    remove(staging)
    remove(final)  # an incomplete copy from a killed run
    try:
        copy_verified(bundle, manifest_bytes, manifest, staging)
        (staging / COMPLETE).write_text(manifest.version + "\n")
        os.sync()
        os.rename(staging, final)
    except (MobilityError, OSError):
        with contextlib.suppress(OSError):
            remove(staging)
        raise
    fsync_dir(versions)


def activate_version(
    paths: Paths,
    install_dir: InstallDir,
    version: str,
    previous: str | None,
    *,
    role: str | None = None,
    platform: str | None = None,
) -> list[str]:
    """Make the complete versions/<version> current: switch ``current`` atomically, keep ``previous`` (and nothing
    else) beside it, write its units and record it. Each step is idempotent: killed anywhere, running it again
    converges. Install, an upgrade and a rollback all end here. Returns the units written."""
    target = paths.install_dir(install_dir)
    _, manifest = read_manifest(target / "versions" / version)
    switch_current(target, version)
    keep = {version, previous} if previous is not None and version_complete(target, previous) else {version}
    prune_versions(target / "versions", keep)
    units = install_units(paths, target / "versions" / version, manifest.init, install_dir)
    # The agent's own recovery checks, run in a failover of this machine: through `current`, so that they follow
    # the version that runs (a switch rewrites nothing); an operator's replacement is left alone.
    checks = install_builtin_checks(paths, str(PurePosixPath(install_dir) / "current" / "mobility" / "mobility"))
    if checks:
        log(paths, f"recovery checks written: {', '.join(checks)}")
    record = load_install_record(paths)
    save_install_record(
        paths,
        InstallRecord(
            version,
            manifest.os_tag,
            install_dir,
            role if role is not None else (record.role if record else None),
            platform if platform is not None else (record.platform if record else None),
            previous if previous in keep else None,
        ),
    )
    return units


def switch_current(target: Path, version: str) -> None:
    """``current`` -> versions/<version>, by rename (readers and a power cut see the old or the new link)."""
    tmp = target / ".current.new"
    remove(tmp)
    tmp.symlink_to(f"versions/{version}")
    os.replace(tmp, target / "current")
    fsync_dir(target)


def prune_versions(versions: Path, keep: set[str]) -> None:
    """Remove every version (and leftover partial copy) but those in ``keep``."""
    for entry in versions.iterdir():
        if entry.name not in keep:
            with contextlib.suppress(OSError):
                remove(entry)


@dataclass(frozen=True)
class Uninstalled:
    removed: list[str] = field(default_factory=list)  # system paths
    kept: list[str] = field(default_factory=list)  # what was left alone, and why


# The agent's fixed directories, removed whole; their name is removed, never followed (a link stays a link).
_AGENT_DIRS = ("/etc/mobility", "/var/log/mobility")
_STATE_DIR = "/var/lib/mobility"


def uninstall(paths: Paths) -> Uninstalled:
    """Remove the agent: its units, what install made in the install directory, configuration, logs, state."""
    record = load_install_record(paths)
    recorded = record.install_dir if record is not None else DEFAULT_INSTALL_DIR
    removed: list[str] = []
    kept: list[str] = []
    had_state = os.path.lexists(paths(_STATE_DIR))  # the lock makes the directory: not news when it was absent
    with install_lock(paths):
        stop_daemon(paths)
        from agent.replication.tracing import remove_leftover

        remove_leftover(paths.state_dir)  # the tracing a clean stop keeps for the next start: there is none now
        removed += remove_units(paths)
        ours, left = release(paths, recorded)
        removed += ours
        kept += left
        for system_path in _AGENT_DIRS:
            _remove_agent_dir(paths, system_path, removed, kept)
    # The state directory holds the lock file: it goes last, after the lock is released.
    _remove_agent_dir(paths, _STATE_DIR, removed if had_state else [], kept)
    return Uninstalled(removed, kept)


def _remove_agent_dir(paths: Paths, system_path: str, removed: list[str], kept: list[str]) -> None:
    name = paths(system_path)
    if name.is_symlink():
        kept.append(f"removed the link {system_path} but not its target {os.readlink(name)}")
    if remove(name):
        removed.append(system_path)
