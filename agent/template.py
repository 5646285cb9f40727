"""`mobility template-prep`: strip what makes this machine itself before an image is captured (as
`cloud-init clean` does), so that clones never share an identity. The installed agent and its configuration
stay, so a clone only registers at its first boot. /etc/machine-id belongs to the OS: clear it with the image
tool (virt-sysprep, or `truncate -s0 /etc/machine-id`) so that each clone gets its own."""

from __future__ import annotations

import stat

from agent.paths import Paths
from agent.shared.fsutil import remove

# The machine's own: its identity, and what the server told it (its target version) and its upgrades.
IDENTITY_FILES = (
    "identity.json",
    "client.key",
    "client.pem",
    "pending-enrolment.json",
    "daemon.json",
    "last-job.json",
    "target.json",
    "update.json",
    "upgrade.from",
)


def template_prep(paths: Paths) -> list[str]:
    """Remove identity, certificate, downloads and logs (names inside the root; a link is removed, not followed)."""
    removed = []
    for name in IDENTITY_FILES:
        if remove(paths(f"/var/lib/mobility/{name}")):
            removed.append(f"/var/lib/mobility/{name}")
    for system_path in ("/var/lib/mobility/downloads", "/var/lib/mobility/staging"):
        if remove(paths(system_path)):
            removed.append(system_path)
    log_dir = paths.log_dir
    if log_dir.is_dir():
        for log in sorted(log_dir.iterdir()):
            if not stat.S_ISDIR(log.lstat().st_mode):
                log.unlink()
                removed.append(f"/var/log/mobility/{log.name}")
    return removed
