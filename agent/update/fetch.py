"""Fetch the target version's bundle through TUF (agent/lifecycle/fetch.py: never an unsigned, tampered or rolled-back
one) and unpack it into the staging directory, with the machine's own certificate."""

from __future__ import annotations

from pathlib import Path

from agent.host.paths import Paths
from agent.lifecycle.installed import InstallRecord


def download_and_unpack(paths: Paths, installed: InstallRecord, version: str) -> Path:
    """The staging directory of ``version``'s bundle for this machine's OS tag, verified and unpacked."""
    from agent.lifecycle.bundle_dir import unpack
    from agent.lifecycle.fetch import fetch_bundle
    from agent.lifecycle.registration import authenticated_client

    reg, client = authenticated_client(paths, timeout=15.0)
    try:
        bundle = fetch_bundle(
            f"https://{reg.server}",
            client.context,
            (paths.tuf_dir / "root.json").read_bytes(),
            paths.tuf_metadata_dir,
            installed.os_tag or "",
            paths.downloads_dir,
            version=version,
        )
    finally:
        client.close()
    return unpack(paths, bundle)
