"""Prerequisite checks: can the agent be installed on this system?"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from agent.install_dir import DEFAULT_INSTALL_DIR
from agent.paths import Paths
from agent.shared.errors import MobilityError

if TYPE_CHECKING:
    from agent.checks import Check

# Free space the agent needs where it installs (PRQ-FREE-SPACE); push checks the same on a host before it copies.
MIN_FREE_BYTES = 100 * 1024 * 1024


def prerequisite_checks(
    paths: Paths,
    install_dir: str = DEFAULT_INSTALL_DIR,
    kernel_floor: str | None = None,
    euid: int | None = None,
) -> list[Check]:
    """Every prerequisite check for the system at ``paths``, in the order they are shown. ``kernel_floor``: the
    bundle's (bundle.json); by default the one of the C library this agent runs on."""
    # Imported here, not with the package: the bootstrapper's at-boot no-op needs DEFAULT_INSTALL_DIR only.
    from agent.distros import OsFacts, gather_facts
    from agent.prereq.checks import (
        Architecture,
        BootDisk,
        FreeSpace,
        GrubDeviceNames,
        InitSystem,
        KernelFloor,
        RootUser,
        SupportedOs,
    )
    from agent.runtime import running_kernel_floor

    facts: OsFacts | MobilityError
    try:
        facts = gather_facts(paths)
    except MobilityError as e:
        facts = e
    return [
        RootUser(os.geteuid() if euid is None else euid),
        SupportedOs(facts),
        Architecture(facts),
        FreeSpace(paths.install_dir(install_dir), install_dir),
        KernelFloor(paths, kernel_floor or running_kernel_floor()),
        InitSystem(paths, facts),
        BootDisk(paths),
        GrubDeviceNames(paths),
    ]


__all__ = ["DEFAULT_INSTALL_DIR", "MIN_FREE_BYTES", "prerequisite_checks"]
