"""Units and init scripts: written and enabled in the root (as `systemctl --root` does), started only on the
running machine. systemd on the systems that have it, a SysV script (with rc links) on the old ones."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import sys
from pathlib import Path

from agent.host.distros import Init
from agent.host.paths import Paths
from agent.host.proc import run, spawn
from agent.host.runtime import self_command
from agent.lifecycle.install_dir import (  # the bundle's units name it; install writes -d there
    DEFAULT_INSTALL_DIR,
    parse_install_dir,
)
from agent.lifecycle.installed import load_install_record
from agent.shared.fsutil import atomic_write

log = logging.getLogger("mobility.services")

UPGRADE_UNIT = "mobility-upgrade@.service"  # the upgrade watcher, one instance per version that watches
UNITS = ("mobility.service", "mobility-bootstrap.service", "mobility-bootstrap.timer", UPGRADE_UNIT)
_WANTED_BY = {
    "mobility.service": "multi-user.target.wants",
    "mobility-bootstrap.service": "multi-user.target.wants",
    "mobility-bootstrap.timer": "timers.target.wants",
    UPGRADE_UNIT: "multi-user.target.wants",
}
# Written, not enabled: the template enables the bootstrapper; the watcher links its instance while it works.
_NOT_ENABLED = ("mobility-bootstrap.service", UPGRADE_UNIT)
_SYSV_START = ("rc2.d", "rc3.d", "rc4.d", "rc5.d")
_SYSV_STOP = ("rc0.d", "rc1.d", "rc6.d")


def live_systemd(paths: Paths) -> bool:
    return paths.root == paths.root.parent and Path("/run/systemd/system").is_dir()


def install_units(paths: Paths, bundle: Path, init: Init, install_dir: str) -> list[str]:
    """Write the bundle's units (or SysV script) into the root with the install dir filled in, and enable them.

    Every name is resolved inside the root (its directory followed as a chroot would, the name itself not), so
    a link in the root image such as etc/systemd/system -> /etc/systemd/system never reaches the host's files.
    """
    written = []
    if init is Init.SYSTEMD:
        for name in UNITS:
            text = (bundle / "units" / name).read_text().replace(DEFAULT_INSTALL_DIR, install_dir)
            unit = f"/etc/systemd/system/{name}"
            atomic_write(paths(unit), text.encode())
            written.append(unit)
            if name not in _NOT_ENABLED:
                _link(paths(f"/etc/systemd/system/{_WANTED_BY[name]}/{name}"), unit)
    else:
        script = (bundle / "init.d" / "mobility").read_text().replace(DEFAULT_INSTALL_DIR, install_dir)
        atomic_write(paths("/etc/init.d/mobility"), script.encode(), 0o755)
        written.append("/etc/init.d/mobility")
        for rc in _SYSV_START:
            _link(paths(f"/etc/{rc}/S90mobility"), "../init.d/mobility")
        for rc in _SYSV_STOP:
            _link(paths(f"/etc/{rc}/K10mobility"), "../init.d/mobility")
    return written


def unit_names() -> list[str]:
    """Every name (system path) the agent may have written for its units or init script."""
    names = []
    for name in UNITS:
        names += [f"/etc/systemd/system/{_WANTED_BY[name]}/{name}", f"/etc/systemd/system/{name}"]
    names.append("/etc/init.d/mobility")
    names += [f"/etc/{rc}/S90mobility" for rc in _SYSV_START] + [f"/etc/{rc}/K10mobility" for rc in _SYSV_STOP]
    return names


def upgrade_unit_link(paths: Paths, version: str) -> Path:
    """The link that makes systemd start the watcher of an unfinished upgrade at boot (agent/update/watcher.py)."""
    return paths(f"/etc/systemd/system/{_WANTED_BY[UPGRADE_UNIT]}/mobility-upgrade@{version}.service")


def remove_units(paths: Paths) -> list[str]:
    """Unlink the agent's units, their enablement links and its init script (names, never link targets)."""
    removed = []
    wants = paths.resolve(f"/etc/systemd/system/{_WANTED_BY[UPGRADE_UNIT]}")
    instances = sorted(wants.glob("mobility-upgrade@*.service")) if wants.is_dir() else []
    for link in instances:
        if link.is_symlink():
            link.unlink()
            removed.append(f"/etc/systemd/system/{_WANTED_BY[UPGRADE_UNIT]}/{link.name}")
    for system_path in unit_names():
        p = paths(system_path)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISDIR(p.lstat().st_mode):  # a directory by that name is not one the agent wrote
                p.unlink()
                removed.append(system_path)
    return removed


def _link(link: Path, target: str) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def start_daemon(paths: Paths, init: Init) -> str:
    """Start (or restart) the daemon on the running machine; under --root it starts when that root boots."""
    if paths.root != paths.root.parent:
        return "enabled in the root: the daemon starts when it boots"
    if init is Init.SYSTEMD and live_systemd(paths):
        run(["systemctl", "daemon-reload"])
        run(["systemctl", "restart", "mobility.service"], timeout=120)
        return "started mobility.service"
    if init is Init.SYSV and Path("/etc/init.d/mobility").exists():
        run(["/etc/init.d/mobility", "restart"], timeout=60)
        return "started /etc/init.d/mobility"
    return "not started: no init system drives this machine (the daemon starts at the next boot)"


def init_of(os_tag: str | None) -> Init:
    """The init system of an OS tag's bundle (systemd when the tag is unknown: it is then not started at all)."""
    from agent.host.distros import BY_TAG

    row = BY_TAG.get(os_tag or "")
    return row.init if row is not None else Init.SYSTEMD


def updater_argv(paths: Paths, version: str) -> list[str]:
    """The upgrade watcher as the program of ``version``, outside systemd: that version's installed launcher when
    this is a frozen program; this checkout's own `python -m agent` when it runs from sources (development, and the
    crash tests, whose fault injection needs a Python they start)."""
    root_args = ["--root", str(paths.root)] if paths.root != paths.root.parent else []
    if not getattr(sys, "frozen", False):
        return self_command(["upgrade", *root_args])
    record = load_install_record(paths)
    recorded = record.install_dir if record is not None and isinstance(record.install_dir, str) else None
    host = paths.install_dir(
        parse_install_dir(recorded, "the recorded install directory") if recorded else DEFAULT_INSTALL_DIR
    )
    return [str(host / "versions" / version / "mobility" / "mobility"), "upgrade", *root_args]


def start_updater(paths: Paths, init: Init, version: str, argv: list[str]) -> str:
    """Start the upgrade watcher as the program of ``version`` (the one running now), outside the daemon: under
    systemd its own unit (a restart of mobility.service never stops it); otherwise ``argv``, detached."""
    if paths.root == paths.root.parent and init is Init.SYSTEMD and live_systemd(paths):
        unit = f"mobility-upgrade@{version}.service"
        run(["systemctl", "reset-failed", unit], check=False)
        run(["systemctl", "start", "--no-block", unit], timeout=60)
        return f"started {unit}"
    child = spawn(argv)
    return f"started the watcher (pid {child.pid})"


def stop_daemon(paths: Paths, *, disable: bool = True) -> bool:
    """Stop the daemon on the running machine (and, with ``disable``, take it out of the boot); under --root there is
    nothing running to stop. Whether an init system was asked to stop it."""
    if paths.root != paths.root.parent:
        return False
    if live_systemd(paths):
        if disable:
            run(["systemctl", "disable", "--now", "mobility.service"], timeout=60, check=False)
            run(["systemctl", "daemon-reload"], check=False)
        else:
            run(["systemctl", "stop", "mobility.service"], timeout=60, check=False)
        return True
    if Path("/etc/init.d/mobility").exists():
        run(["/etc/init.d/mobility", "stop"], timeout=60, check=False)
        return True
    return False
