"""Switch ``current`` to a version (its units and agent.json with it: agent/lifecycle/install.py ``activate_version``)
and back, and keep the watcher's systemd unit wanted at boot exactly while an upgrade is unfinished."""

from __future__ import annotations

import contextlib
import logging

from agent.host.paths import Paths
from agent.lifecycle.install import activate_version
from agent.lifecycle.install_dir import InstallDir
from agent.lifecycle.services import upgrade_unit_link
from agent.shared.errors import MobilityError
from agent.shared.fsutil import remove

logger = logging.getLogger("mobility.updater")


def switch_to(paths: Paths, install_dir: InstallDir, version: str, previous: str | None) -> None:
    """Make ``version`` current (``previous`` is kept as the way back)."""
    activate_version(paths, install_dir, version, previous)


def back_to(paths: Paths, install_dir: InstallDir, version: str, *, strict: bool = False) -> None:
    """Make ``version`` current again, with its units and record (the version rolled back from is removed)."""
    try:
        activate_version(paths, install_dir, version, None)
    except (MobilityError, OSError):
        if strict:
            raise
        logger.exception("switching back to %s", version)


def want_watcher_at_boot(paths: Paths, from_version: str, *, enable: bool) -> None:
    """systemd: the updater's unit is wanted at boot exactly while an upgrade is unfinished, so that a power cut in
    the health window resumes it even if the new version cannot start."""
    link = upgrade_unit_link(paths, from_version)
    with contextlib.suppress(OSError):
        remove(link)
        if enable:
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/etc/systemd/system/mobility-upgrade@.service")
