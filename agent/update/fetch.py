"""Fetch the target version's bundle through TUF (agent/fetch.py: never an unsigned, tampered or rolled-back one) and
unpack it into the staging directory, with the machine's own certificate."""

from __future__ import annotations

from pathlib import Path

from agent.installed import InstallRecord
from agent.paths import Paths


def download_and_unpack(paths: Paths, installed: InstallRecord, version: str) -> Path:
    """The staging directory of ``version``'s bundle for this machine's OS tag, verified and unpacked."""
    from agent.bundle_dir import unpack
    from agent.fetch import fetch_bundle
    from agent.registration import authenticated_client

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
