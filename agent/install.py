"""Install and uninstall from an unpacked bundle: versions side by side, `current` switched atomically.

Layout under the install dir (default /usr/local/mobility):
    versions/<version>/   a complete copy of the bundle (a `.complete` marker is written last)
    current -> versions/<version>
The previous version is kept for rollback; older ones are removed. Killed at any point, the next run
converges: a half-copied version has no marker and is copied again, and `current` is replaced by rename."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.bundles import MANIFEST_NAME, Manifest, parse_manifest
from agent.checks import Report, Status, run_checks
from agent.distros import Init, detect_os, require_supported
from agent.errors import BundleRefused, BundleWrongOs, InstallBusy, InstallFailed, PrerequisitesFailed
from agent.freeze import FreezeSetup, install_provider
from agent.fsutil import atomic_write, sha256_file
from agent.paths import Paths
from agent.prereq import DEFAULT_INSTALL_DIR, prerequisite_checks
from agent.services import install_units, remove_units, stop_daemon

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
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    with paths.install_log.open("a") as f:
        f.write(f"{stamp} {message}\n")


_HELD: set[Path] = set()  # locks this process holds: a bootstrap holds it across its install


@contextlib.contextmanager
def install_lock(paths: Paths) -> Iterator[None]:
    """One install, uninstall or bootstrap at a time on a machine (re-entrant within one process)."""
    if paths.install_lock in _HELD:
        yield
        return
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    with paths.install_lock.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise InstallBusy(f"{paths.install_lock} is held by another process") from e
        _HELD.add(paths.install_lock)
        try:
            yield
        finally:
            _HELD.discard(paths.install_lock)


def read_unpacked_manifest(bundle: Path) -> Manifest:
    """bundle.json of an unpacked bundle, with every listed file checked against its hash."""
    try:
        manifest = parse_manifest((bundle / MANIFEST_NAME).read_bytes())
    except OSError as e:
        raise BundleRefused(f"{bundle}: no readable {MANIFEST_NAME} ({e.strerror})") from e
    for rel, digest in manifest.files.items():
        try:
            actual = sha256_file(bundle / rel)
        except OSError as e:
            raise BundleRefused(f"{bundle}: {rel} is missing or unreadable ({e.strerror})") from e
        if actual != digest:
            raise BundleRefused(f"{bundle}: {rel} changed since the bundle was made (sha256 mismatch)")
    return manifest


def install(paths: Paths, bundle: Path, install_dir: str, role: str, platform: str) -> Installed:
    manifest = read_unpacked_manifest(bundle)
    os_tag = require_supported(detect_os(paths)).os_tag
    if os_tag != manifest.os_tag:
        raise BundleWrongOs(f"this bundle is for {manifest.os_tag}; this system is {os_tag}")
    report = run_checks(prerequisite_checks(paths, install_dir, manifest.kernel_floor))
    if report.failed:
        failed = "; ".join(f"{r.id}: {r.message}" for r in report.results if r.status is Status.FAIL)
        raise PrerequisitesFailed(f"prerequisite checks failed: {failed}")
    target = paths.install_dir(install_dir)
    with install_lock(paths):
        log(paths, f"install {manifest.version} ({manifest.os_tag}) into {install_dir}, role {role}, {platform}")
        try:
            previous = _current_version(target)
            _place_version(bundle, target / "versions", manifest.version)
            _switch_current(target, manifest.version)
            _prune(target / "versions", keep={manifest.version, previous})
            units = install_units(paths, target / "versions" / manifest.version, manifest.init, install_dir)
            record = {
                "version": manifest.version,
                "os_tag": manifest.os_tag,
                "install_dir": install_dir,
                "role": role,
                "platform": platform,
                "previous": previous,
            }
            atomic_write(paths.agent_config, json.dumps(record, indent=2).encode())
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


def _current_version(target: Path) -> str | None:
    current = target / "current"
    return os.readlink(current).rsplit("/", 1)[-1] if current.is_symlink() else None


def _place_version(bundle: Path, versions: Path, version: str) -> None:
    final = versions / version
    if (final / COMPLETE).exists():
        return
    versions.mkdir(parents=True, exist_ok=True)
    staging = versions / f".{version}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)  # an incomplete copy from a killed run
    shutil.copytree(bundle, staging, symlinks=True)
    (staging / COMPLETE).write_text(version + "\n")
    os.sync()
    os.rename(staging, final)


def _switch_current(target: Path, version: str) -> None:
    tmp = target / ".current.new"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(f"versions/{version}")
    os.replace(tmp, target / "current")


def _prune(versions: Path, keep: set[str | None]) -> None:
    for entry in versions.iterdir():
        if entry.name not in keep:
            shutil.rmtree(entry, ignore_errors=True)


def uninstall(paths: Paths) -> list[str]:
    """Remove the agent: install dir, configuration, state and logs. Returns what was removed."""
    install_dir = DEFAULT_INSTALL_DIR
    with contextlib.suppress(OSError, ValueError, KeyError):
        install_dir = str(json.loads(paths.agent_config.read_text())["install_dir"])
    removed = []
    with install_lock(paths):
        stop_daemon(paths)
        removed += remove_units(paths)
        for what in (paths.install_dir(install_dir), paths.config_dir, paths.log_dir):
            if what.exists():
                shutil.rmtree(what)
                removed.append("/" + str(what.relative_to(paths.root)))
    # The state directory holds the lock file: it goes last, after the lock is released.
    if paths.state_dir.exists():
        shutil.rmtree(paths.state_dir)
        removed.append("/" + str(paths.state_dir.relative_to(paths.root)))
    return removed
