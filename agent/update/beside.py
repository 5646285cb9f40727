"""Install a fetched version beside the running one: versions/<v>, a verified copy of the staged bundle (agent/
install.py ``place_version``), with at most two versions kept (the running one and the target)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from agent.errors import InstallFailed, UpdateStateFormat
from agent.host.paths import Paths
from agent.lifecycle.bundles import STATE_FORMAT
from agent.lifecycle.install import place_version, prune_versions
from agent.shared.errors import BundleRefused
from agent.shared.fsutil import remove


def place_beside(host_dir: Path, staging: Path, from_version: str, to_version: str, os_tag: str | None) -> None:
    """Place the staged bundle of ``to_version`` under ``host_dir``/versions (the caller holds the install lock).
    A version that cannot read this machine's state is refused first (UpdateStateFormat): nothing is removed, placed
    or switched."""
    from agent.lifecycle.bundle_dir import read_manifest

    manifest_bytes, manifest = read_manifest(staging)
    if (manifest.version, manifest.os_tag) != (to_version, os_tag):
        raise InstallFailed(f"the bundle fetched for {to_version} is {manifest.version} for {manifest.os_tag}")
    state = state_format_here(host_dir, from_version)
    if manifest.state_format < state:
        raise UpdateStateFormat(
            f"mobility {to_version} reads agent state up to format {manifest.state_format}, and the state here is "
            f"format {state} (written by {from_version}): it would not understand it"
        )
    prune_versions(host_dir / "versions", {from_version, to_version})
    place_version(staging, manifest_bytes, manifest, host_dir)


def state_format_here(host_dir: Path, running: str) -> int:
    """The format of this machine's agent state: the one the running version declares in its bundle.json (this
    program's own when that cannot be read)."""
    from agent.lifecycle.bundle_dir import read_manifest

    try:
        return read_manifest(host_dir / "versions" / running)[1].state_format
    except (BundleRefused, OSError):
        return STATE_FORMAT


def clean_staging(paths: Paths, staging: Path) -> None:
    """The staged copy and the downloaded archives, once the version is in place."""
    with contextlib.suppress(OSError):
        remove(staging)
        for old in paths.downloads_dir.glob("Mobility_UA_*"):
            remove(old)
