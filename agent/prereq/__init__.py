"""Prerequisite checks: can the agent be installed on this system?"""

from __future__ import annotations

import os

from agent.checks import Check
from agent.distros import OsFacts, gather_facts
from agent.errors import MobilityError
from agent.install_dir import DEFAULT_INSTALL_DIR
from agent.paths import Paths
from agent.prereq.checks import (
    Architecture,
    BootDisk,
    FreeSpace,
    GlibcFloor,
    GrubDeviceNames,
    InitSystem,
    RootUser,
    SupportedOs,
)


def running_glibc() -> str:
    """The glibc this agent runs on: a binary built against it needs at least as much."""
    version = os.confstr("CS_GNU_LIBC_VERSION") or ""  # "glibc 2.36"; empty on other C libraries
    return version.split()[-1] if version.startswith("glibc ") else "0.0"


def prerequisite_checks(
    paths: Paths,
    install_dir: str = DEFAULT_INSTALL_DIR,
    glibc_floor: str | None = None,
    euid: int | None = None,
) -> list[Check]:
    """Every prerequisite check for the system at ``paths``, in the order they are shown."""
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
        GlibcFloor(paths, glibc_floor or running_glibc()),
        InitSystem(paths, facts),
        BootDisk(paths),
        GrubDeviceNames(paths),
    ]


__all__ = ["DEFAULT_INSTALL_DIR", "prerequisite_checks", "running_glibc"]
