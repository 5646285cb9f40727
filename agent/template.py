"""`mobility template-prep`: strip what makes this machine itself before an image is captured (as
`cloud-init clean` does), so that clones never share an identity. The installed agent and its configuration
stay, so a clone only registers at its first boot. /etc/machine-id belongs to the OS: clear it with the image
tool (virt-sysprep, or `truncate -s0 /etc/machine-id`) so that each clone gets its own."""

from __future__ import annotations

import shutil

from agent.paths import Paths

IDENTITY_FILES = ("identity.json", "client.key", "client.pem", "daemon.json", "last-job.json")


def template_prep(paths: Paths) -> list[str]:
    removed = []
    for name in IDENTITY_FILES:
        p = paths.state_dir / name
        if p.exists():
            p.unlink()
            removed.append(f"/var/lib/mobility/{name}")
    for directory in (paths.state_dir / "downloads", paths.state_dir / "staging"):
        if directory.exists():
            shutil.rmtree(directory)
            removed.append("/" + str(directory.relative_to(paths.root)))
    if paths.log_dir.is_dir():
        for log in sorted(paths.log_dir.iterdir()):
            if log.is_file():
                log.unlink()
                removed.append("/" + str(log.relative_to(paths.root)))
    return removed
