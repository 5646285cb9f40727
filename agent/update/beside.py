"""Install a fetched version beside the running one: versions/<v>, a verified copy of the staged bundle (agent/
install.py ``place_version``), with at most two versions kept (the running one and the target)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from agent.errors import InstallFailed
from agent.install import place_version, prune_versions
from agent.paths import Paths
from agent.shared.fsutil import remove


def place_beside(host_dir: Path, staging: Path, from_version: str, to_version: str, os_tag: str | None) -> None:
    """Place the staged bundle of ``to_version`` under ``host_dir``/versions (the caller holds the install lock)."""
    from agent.bundle_dir import read_manifest

    prune_versions(host_dir / "versions", {from_version, to_version})
    manifest_bytes, manifest = read_manifest(staging)
    if (manifest.version, manifest.os_tag) != (to_version, os_tag):
        raise InstallFailed(f"the bundle fetched for {to_version} is {manifest.version} for {manifest.os_tag}")
    place_version(staging, manifest_bytes, manifest, host_dir)


def clean_staging(paths: Paths, staging: Path) -> None:
    """The staged copy and the downloaded archives, once the version is in place."""
    with contextlib.suppress(OSError):
        remove(staging)
        for old in paths.downloads_dir.glob("Mobility_UA_*"):
            remove(old)
