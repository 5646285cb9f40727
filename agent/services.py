"""Units and init scripts: written and enabled in the root (as `systemctl --root` does), started only on the
running machine. systemd on the systems that have it, a SysV script (with rc links) on the old ones."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

from agent.distros import Init
from agent.install_dir import DEFAULT_INSTALL_DIR  # the bundle's units name it; install writes -d there
from agent.paths import Paths
from agent.proc import run
from agent.shared.fsutil import atomic_write

log = logging.getLogger("mobility.services")

UNITS = ("mobility.service", "mobility-bootstrap.service", "mobility-bootstrap.timer")
_WANTED_BY = {
    "mobility.service": "multi-user.target.wants",
    "mobility-bootstrap.service": "multi-user.target.wants",
    "mobility-bootstrap.timer": "timers.target.wants",
}
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
            if name != "mobility-bootstrap.service":  # the template enables that one; the agent its daemon
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


def remove_units(paths: Paths) -> list[str]:
    """Unlink the agent's units, their enablement links and its init script (names, never link targets)."""
    removed = []
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


def stop_daemon(paths: Paths) -> None:
    if paths.root != paths.root.parent:
        return
    if live_systemd(paths):
        run(["systemctl", "disable", "--now", "mobility.service"], timeout=60, check=False)
        run(["systemctl", "daemon-reload"], check=False)
    elif Path("/etc/init.d/mobility").exists():
        run(["/etc/init.d/mobility", "stop"], timeout=60, check=False)
